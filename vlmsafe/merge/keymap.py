"""Map a VLM checkpoint's tensor names onto the text-only LLM's names.

LLaVA-style checkpoints nest the language model under a prefix that differs between
transformers versions; the aligned LLM (``LlamaForCausalLM`` & co.) uses the bare names:

====================================================  ==============================
VLM checkpoint name                                   LLM name
====================================================  ==============================
``model.language_model.layers.N.*`` (transformers 5)   ``model.layers.N.*``
``language_model.model.layers.N.*`` (original format)  ``model.layers.N.*``
``model.language_model.embed_tokens.weight``          ``model.embed_tokens.weight``
``language_model.lm_head.weight``                     ``lm_head.weight``
``lm_head.weight``                                    ``lm_head.weight``
====================================================  ==============================

Names outside these prefixes (``vision_tower``, ``multi_modal_projector``, ...) have no LLM
counterpart and pass through. An exact name match always wins, so merging two checkpoints of the
same architecture works too. If the LLM ties ``lm_head`` to its embeddings (no ``lm_head.weight``
stored), the VLM's ``lm_head`` is merged with ``model.embed_tokens.weight``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

#: (VLM prefix, LLM prefix), most specific first.
LLAVA_PREFIX_RULES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("language_model.", ""),
    ("model.layers.", "model.layers."),
    ("model.embed_tokens.", "model.embed_tokens."),
    ("model.norm.", "model.norm."),
    ("lm_head.", "lm_head."),
)

_VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "lm_head.bias")


@dataclass(frozen=True)
class KeyMap:
    """Prefix rewriting from VLM tensor names to LLM tensor names.

    ``extra_rules`` (e.g. from a config's ``key_rules``) are tried before the LLaVA defaults.
    """

    extra_rules: tuple[tuple[str, str], ...] = ()

    @property
    def rules(self) -> tuple[tuple[str, str], ...]:
        return tuple(self.extra_rules) + LLAVA_PREFIX_RULES

    def lm_name(self, vlm_name: str) -> str | None:
        """The LLM name for a VLM tensor, or None if it is not part of the language model."""
        for src, dst in self.rules:
            if vlm_name.startswith(src):
                return dst + vlm_name[len(src) :]
        return None

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


def is_vocab_tensor(name: str) -> bool:
    """True for token-indexed tensors (embeddings, LM head): their row count is the vocabulary size."""
    return name.endswith(_VOCAB_SUFFIXES)

