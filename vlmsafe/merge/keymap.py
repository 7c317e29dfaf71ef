"""The one table of checkpoint layouts and tensor names: VLM names -> the text-only LLM's names.

A VLM nests its language model under a prefix that depends on who saved it; the aligned LLM
(``LlamaForCausalLM`` & co.) uses the bare names. Every reader of checkpoint names in vlmsafe (the
merge, the safety masks, ``probes`` weight comparison) maps names through this module.

* **transformers in-memory names** (``save_pretrained(save_original_format=False)``): language model
  ``model.language_model.layers.N.*``, ``model.language_model.embed_tokens|norm.*``, ``lm_head.*``;
  ``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``model.image_newline``.
* **llava-hf Hub layout** (``llava-hf/*``; transformers' default ``save_pretrained``; the output of
  ``vlmsafe convert-llava``): ``language_model.model.layers.N.*``,
  ``language_model.model.embed_tokens|norm.*``, ``language_model.lm_head.*``; ``vision_tower.*``,
  ``multi_modal_projector.*``, ``image_newline``.
* **original LLaVA** (``liuhaotian/llava-v1.5-*`` and ``-v1.6-*``, ``LlavaLlamaForCausalLM``):
  ``model.layers.N.*`` (with ``rotary_emb.inv_freq`` buffers), ``model.embed_tokens|norm.*``,
  ``lm_head.*``; ``model.mm_projector.{0,2}.*``, ``model.vision_tower.vision_tower.*``,
  ``model.image_newline``.
* **Qwen2-VL / Qwen2.5-VL**: ``model.language_model.*`` (older: ``model.*``), ``lm_head.*``;
  ``model.visual.*`` (older: ``visual.*``).
* **SmolVLM / Idefics3**: ``model.text_model.*``, ``lm_head.*``; ``model.vision_model.*``, ``model.connector.*``.
* **text-only LLM** (the aligned model): ``model.layers.N.*``, ``model.embed_tokens|norm.*``, ``lm_head.*``.

* **Llama 3.2 Vision (mllama)**: as llava-hf, with cross-attention layers interleaved; :func:`family_rules` renumbers
  the layers from the folder's ``config.json`` (:meth:`KeyMap.for_checkpoint`).

Names outside these prefixes (vision tower, projector, ``image_newline``) have no LLM counterpart.
An exact name match always wins, so merging two checkpoints of the same architecture works too. If
the LLM ties ``lm_head`` to its embeddings (no ``lm_head.weight`` stored), the VLM's ``lm_head`` is
merged with ``model.embed_tokens.weight``.

Buffers (:func:`is_buffer`: rotary ``inv_freq``, ``position_ids`` ...) are stored by some savers
(the original LLaVA checkpoints carry ``model.layers.N.self_attn.rotary_emb.inv_freq``) but are not
weights: they are derived from the config, never merged, and need no counterpart.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

#: (VLM prefix, LLM prefix), most specific first.
LLAVA_PREFIX_RULES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    ("model.text_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", ""),
    ("model.layers.", "model.layers."),
    ("model.embed_tokens.", "model.embed_tokens."),
    ("model.norm.", "model.norm."),
    ("lm_head.", "lm_head."),
)

#: Token-indexed tensors: their row count is the vocabulary size.
VOCAB_SUFFIXES: tuple[str, ...] = ("embed_tokens.weight", "lm_head.weight", "lm_head.bias")

#: Last name components of non-persistent buffers that some checkpoints store (not weights).
BUFFER_NAMES: frozenset[str] = frozenset(
    {"inv_freq", "original_inv_freq", "cos_cached", "sin_cached", "position_ids", "masked_bias"}
)

#: The language model's decoder layers in every layout above (not the vision tower's layers).
DECODER_LAYERS = r"^(model\.language_model\.|model\.text_model\.|language_model\.model\.|model\.)layers\.\d+\."

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class KeyMap:
    """Prefix rewriting from VLM tensor names to LLM tensor names.

    ``extra_rules`` (e.g. from a config's ``key_rules``) are tried before the defaults.
    """

    extra_rules: tuple[tuple[str, str | None], ...] = ()

    @property
    def rules(self) -> tuple[tuple[str, str | None], ...]:
        return tuple(self.extra_rules) + LLAVA_PREFIX_RULES

    def lm_name(self, vlm_name: str) -> str | None:
        """The LLM name for a VLM tensor, or None if it is not part of the language model (a rule whose
        LLM prefix is None: e.g. mllama's cross-attention layers, which the text-only LLM does not have)."""
        for src, dst in self.rules:
            if vlm_name.startswith(src):
                return None if dst is None else dst + vlm_name[len(src) :]
        return None

    @classmethod
    def for_checkpoint(cls, folder: str | os.PathLike[str], extra_rules: tuple = ()) -> KeyMap:
        """The key map for the VLM saved in ``folder``: ``extra_rules``, then the rules its ``config.json`` calls
        for (:func:`family_rules`), then the defaults."""
        return cls(tuple(extra_rules) + family_rules(folder))

    def candidates(self, vlm_name: str) -> list[str]:
        """Names to look up in the other checkpoint, best first."""
        out = [vlm_name]
        lm = self.lm_name(vlm_name)
        if lm is not None and lm not in out:
            out.append(lm)
        if lm == "lm_head.weight":
            out.append("model.embed_tokens.weight")  # tied LLM: embeddings double as lm_head
        return out

    def find(self, vlm_name: str, available: Collection[str]) -> str | None:
        """The counterpart of ``vlm_name`` among ``available`` names, or None.

        The tied-embedding fallback is only used when ``available`` has no ``lm_head.weight``.
        """
        for c in self.candidates(vlm_name):
            if c in available:
                return c
        return None


_DEFAULT = KeyMap()


def family_rules(folder: str | os.PathLike[str]) -> tuple[tuple[str, str | None], ...]:
    """Layer renumbering a VLM's ``config.json`` calls for, else ``()``.

    Llama 3.2 Vision (``model_type: mllama``) interleaves cross-attention layers
    (``text_config.cross_attention_layers``) with Llama 3.1's layers: VLM layer ``i`` is LLM layer ``i`` minus
    the cross-attention layers before it, and the cross-attention layers have no LLM counterpart (kept as is).
    """
    path = Path(folder) / "config.json"
    if not path.is_file():
        return ()
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return ()  # the merge's own config checks name the problem
    if not isinstance(config, dict) or config.get("model_type") != "mllama":
        return ()
    text = config.get("text_config") or {}
    cross = set(text.get("cross_attention_layers") or ())
    rules: list[tuple[str, str | None]] = []
    llm_layer = 0
    for i in range(int(text.get("num_hidden_layers", 0))):
        dst = None if i in cross else f"model.layers.{llm_layer}."
        llm_layer += i not in cross
        for prefix in ("model.language_model.", "language_model.model."):
            rules.append((f"{prefix}layers.{i}.", dst))
    return tuple(rules)


def canonical_name(name: str, keymap: KeyMap | None = None) -> str:
    """The LLM name of a language-model tensor (``model.layers.N.*``); other names unchanged."""
    return (keymap or _DEFAULT).lm_name(name) or name


def is_vocab_tensor(name: str) -> bool:
    """True for token-indexed tensors (embeddings, LM head): their row count is the vocabulary size."""
    return name.endswith(VOCAB_SUFFIXES)


def is_buffer(name: str) -> bool:
    """True for stored non-persistent buffers (rotary ``inv_freq``, ``position_ids``...): not weights."""
    return name.rpartition(".")[2] in BUFFER_NAMES


def layer_index(lm_name: str | None) -> int | None:
    """Decoder-layer index of a language-model tensor name (``model.layers.N.*``), else None."""
    if lm_name is None:
        return None
    m = _LAYER_RE.match(lm_name)
    return int(m.group(1)) if m else None
