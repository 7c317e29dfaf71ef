"""One interface over the two CLIP implementations Safe-CLIP fine-tunes.

* :class:`HFCLIPBackend` — ``transformers.CLIPModel`` (+ tokenizer and image processor), saved
  with ``save_pretrained`` so ``CLIPModel`` / ``CLIPTextModel`` / ``CLIPVisionModel`` /
  ``diffusers`` / LLaVA can load the result.
* :class:`OpenCLIPBackend` — an ``open_clip`` ``CLIP`` model, saved as a safetensors state dict
  plus the JSON model config needed to rebuild it.

The trainer only talks to this interface: tokenize, preprocess, encode text/images into the
projected embedding space, name the modules of each tower (for LoRA targeting and full
fine-tuning), and save. :meth:`CLIPBackend.encode_text_states` also returns the text tower's per-token
states as a diffusion pipeline reads them (for the optional ``text_safe_tokens`` loss term). Encoding
methods take the ``model`` explicitly because during training the module that runs is the
LoRA-injected (or DDP-wrapped) copy, not ``backend.model``.

Where a tower's residual blocks are (and whether they run batch-first) has one owner, the CLIP
adapters of :mod:`vlmsafe.adapters.clip` that recording and editing use; the backends ask them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmsafe.adapters.clip import OpenCLIPAdapter
from vlmsafe.errors import FileFormatError, InputError, UnsupportedModelError
from vlmsafe.io import atomic_path
from vlmsafe.reading import read_json
from vlmsafe.safeclip.terms import TOKEN_STATE_LAYERS  # which token states encode_text_states returns
from vlmsafe.validation import check_choice
from vlmsafe.weights import read_safetensors_header

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


class CLIPBackend(ABC):
    """What Safe-CLIP needs from a CLIP implementation."""

    #: ``"hf"`` or ``"open_clip"``; stored in checkpoints.
    kind: str
    #: Module-name leaves LoRA targets by default (the reference: k/v/out projections, MLP, patch embedding).
    default_lora_modules: tuple[str, ...]
    model: nn.Module

    @abstractmethod
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token tensors for ``texts`` (a dict, so it travels through ``accelerate`` unchanged)."""

    @abstractmethod
    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """Pixel tensor ``[N, 3, H, W]`` for PIL images."""

    @abstractmethod
    def encode_text(self, model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected, un-normalised text embeddings ``[N, D]``."""

    @abstractmethod
    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected, un-normalised image embeddings ``[N, D]``."""

    def tokenize_padded(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Token ids padded to the full context length, without an attention mask.

        What a diffusers pipeline's ``encode_prompt`` gives the text encoder (``padding="max_length"``, no
        mask for CLIP), so :meth:`encode_text_states` sees every position a UNet reads.
        """
        return {"input_ids": self.tokenize(texts)["input_ids"]}

    @abstractmethod
    def encode_text_states(
        self, model: nn.Module, tokens: dict[str, torch.Tensor], layer: str = "last"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(projected embeddings [N, D], token states [N, L, W])`` from one text-tower pass.

        ``layer`` picks the states: ``"last"`` (the final layer norm's output, SD 1.x/2.x's
        ``last_hidden_state``) or ``"penultimate"`` (the second-to-last block's output, what SDXL reads as
        ``hidden_states[-2]``). Give it :meth:`tokenize_padded` tokens to see what a diffusion UNet sees.
        """

    @abstractmethod
    def tower_prefixes(self, tower: str) -> tuple[str, ...]:
        """Parameter-name prefixes of ``tower`` (``"text"`` or ``"vision"``) incl. its projection."""

    @abstractmethod
    def _layer_pattern(self, tower: str) -> str:
        """Regex (no anchors) of the names of a tower's blocks, e.g. ``text_model\\.encoder\\.layers\\.\\d+``."""

    @abstractmethod
    def save_pretrained(
        self, path: str | os.PathLike[str], model: nn.Module | None = None, *, overwrite: bool = False,
        extra_files: Mapping[str, str] | None = None,
    ) -> None:
        """Write ``model`` (default: ``self.model``) as a standard checkpoint, atomically
        (an existing non-empty ``path`` is replaced only with ``overwrite=True``); ``extra_files``
        (``{name: text}``, e.g. the model card) are written in the same atomic output."""

    def lora_target_regex(self, towers: Sequence[str], modules: Sequence[str] | None = None) -> str:
        """A ``peft`` ``target_modules`` regex limited to ``towers``.

        ``modules`` are leaf names (``"k_proj"``, ``"fc1"``, ``"patch_embedding"``...); they are
        matched inside the towers' transformer blocks, and an embedding-level module (the patch
        embedding) is matched anywhere inside the vision tower.
        """
        modules = tuple(modules or self.default_lora_modules)
        if not towers:
            raise InputError("nothing to train: enable the text and/or the vision tower")
        alts = []
        leaf = "|".join(re.escape(m) for m in modules)
        for tower in towers:
            alts.append(rf"{self._layer_pattern(tower)}\.(?:.*\.)?(?:{leaf})")
            if tower == "vision":
                alts.append(rf"{self._vision_embed_pattern()}\.(?:{leaf})")
        return "^(?:" + "|".join(alts) + ")$"

    @abstractmethod
    def _vision_embed_pattern(self) -> str: ...

    def tower_parameters(self, model: nn.Module, towers: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
        prefixes = tuple(p for t in towers for p in self.tower_prefixes(t))
        return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]

    def config_dict(self) -> dict[str, Any]:
        """JSON-able description stored in checkpoints."""
        return {"kind": self.kind}


# ---------------------------------------------------------------------------------------------
# transformers
# ---------------------------------------------------------------------------------------------


class HFCLIPBackend(CLIPBackend):
    """``transformers.CLIPModel`` with its tokenizer and image processor."""

    kind = "hf"
    default_lora_modules = ("k_proj", "v_proj", "out_proj", "fc1", "fc2", "patch_embedding")

    def __init__(
        self, model: nn.Module, tokenizer: Any = None, image_processor: Any = None, max_length: int | None = None
    ):
        from transformers import CLIPModel

        if not isinstance(model, CLIPModel):
            raise UnsupportedModelError(
                f"HFCLIPBackend needs a transformers CLIPModel, got {type(model).__name__}; "
                "for open_clip models use OpenCLIPBackend"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        cfg_len = model.config.text_config.max_position_embeddings
        tok_len = getattr(tokenizer, "model_max_length", None) or cfg_len
        self.max_length = int(max_length or min(cfg_len, tok_len if tok_len < 10**6 else cfg_len))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> HFCLIPBackend:
        """Load model, tokenizer and image processor from a local directory or hub id."""
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        from vlmsafe.loading import check_clip_folder

        check_clip_folder(path)  # no code, safetensors only, valid headers, a CLIP config
        try:
            model = CLIPModel.from_pretrained(str(path), **{"trust_remote_code": False, **kwargs})
        except OSError as exc:
            raise FileFormatError(
                f"cannot load a CLIPModel from {path!s}: {exc}. Pass a directory written by save_pretrained "
                "(config.json + model.safetensors) or a hub id"
            ) from exc
        tokenizer = image_processor = None
        with contextlib.suppress(OSError, ValueError, TypeError):
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        with contextlib.suppress(OSError, ValueError, TypeError):
            image_processor = AutoImageProcessor.from_pretrained(str(path), trust_remote_code=False)
        return cls(model, tokenizer, image_processor)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self._tokenizer()(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise InputError(
                "this CLIP model has no tokenizer; save one next to the model (tokenizer.save_pretrained) or pass "
                "tokenizer="
            )
        return self.tokenizer

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        if self.image_processor is None:
            raise InputError(
                "this CLIP model has no image processor; save one next to the model or pass image_processor="
            )
        return self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]

    def encode_text(self, model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(model.parameters()).dtype
        out = model.get_image_features(pixel_values=pixel_values.to(dtype))
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def tokenize_padded(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self._tokenizer()(
            list(texts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"]}

    def encode_text_states(
        self, model: nn.Module, tokens: dict[str, torch.Tensor], layer: str = "last"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_choice(layer, "token state layer", TOKEN_STATE_LAYERS)
        out = model.text_model(
            input_ids=tokens["input_ids"],
            attention_mask=tokens.get("attention_mask"),
            output_hidden_states=layer == "penultimate",
        )
        states = out.last_hidden_state if layer == "last" else out.hidden_states[-2]
        return model.text_projection(out.pooler_output), states

    def tower_prefixes(self, tower: str) -> tuple[str, ...]:
        return {"text": ("text_model.", "text_projection."), "vision": ("vision_model.", "visual_projection.")}[tower]

    def _layer_pattern(self, tower: str) -> str:
        return {"text": r"text_model\.encoder\.layers\.\d+", "vision": r"vision_model\.encoder\.layers\.\d+"}[tower]

    def _vision_embed_pattern(self) -> str:
        return r"vision_model\.embeddings"

    def save_pretrained(
        self, path: str | os.PathLike[str], model: nn.Module | None = None, *, overwrite: bool = False,
        extra_files: Mapping[str, str] | None = None,
    ) -> None:
        model = self.model if model is None else model
        with atomic_path(path, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            if self.image_processor is not None:
                self.image_processor.save_pretrained(tmp)
            _write_extra(tmp, extra_files)


# ---------------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------------


class OpenCLIPBackend(CLIPBackend):
    """An ``open_clip`` ``CLIP`` model (standard text tower) with its tokenizer and transform.

    ``model_cfg`` is the dict ``open_clip.CLIP(**model_cfg)`` was built from (``embed_dim``,
    ``vision_cfg``, ``text_cfg``...); ``model_name`` the registered name, if any. One of them is
    needed to save a checkpoint that can be rebuilt.
    """

    kind = "open_clip"
    default_lora_modules = ("attn", "c_fc", "c_proj", "conv1")

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        preprocess: Any = None,
        *,
        model_name: str | None = None,
        model_cfg: dict[str, Any] | None = None,
    ):
        import open_clip

        if not isinstance(model, open_clip.CLIP):
            raise UnsupportedModelError(
                f"OpenCLIPBackend supports open_clip.CLIP models (built-in text tower), got {type(model).__name__}"
            )
        self.model = model
        self.model_name = model_name
        self.model_cfg = model_cfg
        if tokenizer is None:
            ctx = int(model.positional_embedding.shape[0])
            tokenizer = (
                open_clip.get_tokenizer(model_name, context_length=ctx)
                if model_name
                else open_clip.SimpleTokenizer(context_length=ctx)
            )
            _check_token_rows(model, tokenizer, model_name)
        self.tokenizer = tokenizer
        if preprocess is None:
            size = model.visual.image_size
            preprocess = open_clip.image_transform(
                size,
                is_train=False,
                mean=getattr(model.visual, "image_mean", None),
                std=getattr(model.visual, "image_std", None),
            )
        self.transform = preprocess

    @classmethod
    def create(cls, model_name: str, pretrained: str | None = None, **kwargs: Any) -> OpenCLIPBackend:
        """``open_clip.create_model_and_transforms(model_name, pretrained)`` wrapped in a backend."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, **kwargs)
        return cls(
            model,
            open_clip.get_tokenizer(model_name),
            preprocess,
            model_name=model_name,
            model_cfg=open_clip.get_model_config(model_name),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> OpenCLIPBackend:
        """Rebuild a model saved by :meth:`save_pretrained` (safetensors + JSON, no pickle)."""
        import open_clip
        from safetensors.torch import load_model

        path = Path(path)
        cfg_file, weights = path / OPEN_CLIP_CONFIG, path / OPEN_CLIP_WEIGHTS
        if not cfg_file.is_file() or not weights.is_file():
            raise FileFormatError(
                f"{path} is not an open_clip Safe-CLIP checkpoint: expected {OPEN_CLIP_CONFIG} and {OPEN_CLIP_WEIGHTS}"
            )
        meta = read_json(cfg_file, what="open_clip config",
                         fix="re-save the model with OpenCLIPBackend.save_pretrained")
        model_cfg = meta.get("model_cfg")
        if model_cfg is None:
            raise FileFormatError(
                f"{cfg_file} has no 'model_cfg'; re-save the model with OpenCLIPBackend(model_cfg=...)"
            )
        read_safetensors_header(weights, "open_clip weights")  # a truncated file: one line, not safetensors' error
        model = open_clip.CLIP(**model_cfg)
        load_model(model, str(weights), strict=True)
        model.eval()
        return cls(model, model_name=meta.get("model_name"), model_cfg=model_cfg)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokenizer(list(texts))}

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        return torch.stack([self.transform(im) for im in images])

    def encode_text(self, model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.encode_text(tokens["input_ids"])

    def encode_image(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return model.encode_image(pixel_values)

    def encode_text_states(
        self, model: nn.Module, tokens: dict[str, torch.Tensor], layer: str = "last"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The states are caught by a forward hook on ``ln_final`` (``"last"``) or on the second-to-last
        residual block (``"penultimate"``) while ``encode_text`` runs, so open_clip's own pooling is kept."""
        check_choice(layer, "token state layer", TOKEN_STATE_LAYERS)
        tower = OpenCLIPAdapter(model, tower="text")
        blocks = tower.layers
        if layer == "penultimate" and len(blocks) < 2:
            raise InputError(f"token_layer 'penultimate' needs a text tower of 2 or more blocks, this one has "
                             f"{len(blocks)}; use token_layer 'last'")
        module = model.ln_final if layer == "last" else blocks[-2]
        caught: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            pooled = model.encode_text(tokens["input_ids"])
        finally:
            handle.remove()
        states = caught[-1]
        if layer == "penultimate" and not tower.batch_first:
            states = states.transpose(0, 1)  # older open_clip runs its blocks sequence-first
        return pooled, states

    def tower_prefixes(self, tower: str) -> tuple[str, ...]:
        if tower == "vision":
            return ("visual.",)
        return ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")

    def _layer_pattern(self, tower: str) -> str:
        return {"text": r"transformer\.resblocks\.\d+", "vision": r"visual\.transformer\.resblocks\.\d+"}[tower]

    def _vision_embed_pattern(self) -> str:
        return r"visual"

    def config_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_name": self.model_name, "model_cfg": self.model_cfg}

    def save_pretrained(
        self, path: str | os.PathLike[str], model: nn.Module | None = None, *, overwrite: bool = False,
        extra_files: Mapping[str, str] | None = None,
    ) -> None:
        from safetensors.torch import save_model

        if self.model_cfg is None:
            raise InputError(
                "cannot save an open_clip model without its config: build the backend with model_cfg= (the dict "
                "given to open_clip.CLIP) or via OpenCLIPBackend.create"
            )
        model = self.model if model is None else model
        with atomic_path(path, overwrite=overwrite) as tmp:
            tmp.mkdir()
            save_model(model, str(tmp / OPEN_CLIP_WEIGHTS))
            (tmp / OPEN_CLIP_CONFIG).write_text(
                json.dumps({"model_name": self.model_name, "model_cfg": self.model_cfg}, indent=2) + "\n"
            )
            _write_extra(tmp, extra_files)


def _check_token_rows(model: nn.Module, tokenizer: Any, model_name: str | None) -> None:
    """Refuse a text tower with fewer token rows than the default tokenizer's ids (an embedding lookup out of range
    at the first caption, as a traceback): a model saved without the model_name of the tokenizer it was built for."""
    rows = int(model.token_embedding.num_embeddings)
    vocab = getattr(tokenizer, "vocab_size", None)
    if isinstance(vocab, int) and vocab > rows:
        of = f"open_clip's tokenizer of {model_name}" if model_name else "open_clip's default SimpleTokenizer"
        raise FileFormatError(
            f"the open_clip text tower has {rows} token rows but {of} makes ids up to {vocab - 1}; save the model "
            "with the model_name whose tokenizer it was built for (OpenCLIPBackend(model_name=...)), or pass that "
            "tokenizer as tokenizer="
        )


def _write_extra(folder: Path, files: Mapping[str, str] | None) -> None:
    for name, text in (files or {}).items():
        (folder / name).write_text(text, encoding="utf-8")


def load_backend(spec: str | os.PathLike[str]) -> CLIPBackend:
    """Load a backend from a path or name.

    * a directory with ``open_clip_config.json`` → :meth:`OpenCLIPBackend.from_pretrained`
    * ``open_clip:NAME`` or ``open_clip:NAME@PRETRAINED`` → :meth:`OpenCLIPBackend.create`
    * anything else → :meth:`HFCLIPBackend.from_pretrained` (local dir or hub id)
    """
    spec = str(spec)
    from vlmsafe.cards import CHECKPOINT_PATTERNS, remote_id, resolve

    if not spec.startswith("open_clip:") and remote_id(spec):  # a Hub id: its checkpoint files, then folder checks
        spec = str(resolve(spec, patterns=CHECKPOINT_PATTERNS, what="a CLIP model folder written by save_pretrained"))
    if spec.startswith("open_clip:") or (Path(spec) / OPEN_CLIP_CONFIG).is_file():
        from vlmsafe.extras import require_extra

        require_extra("safeclip", "open_clip", feature=f"the open_clip model {spec}")
    if spec.startswith("open_clip:"):
        name, _, pretrained = spec[len("open_clip:") :].partition("@")
        return OpenCLIPBackend.create(name, pretrained or None)
    if (Path(spec) / OPEN_CLIP_CONFIG).is_file():
        return OpenCLIPBackend.from_pretrained(spec)
    if Path(spec).exists() and not (Path(spec) / "config.json").is_file():
        raise FileFormatError(
            f"{spec} holds neither a transformers CLIP checkpoint (config.json) nor an open_clip one "
            f"({OPEN_CLIP_CONFIG}); pass a folder written by save_pretrained"
        )
    return HFCLIPBackend.from_pretrained(spec)
