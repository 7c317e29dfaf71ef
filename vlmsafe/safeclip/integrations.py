"""Put Safe-CLIP encoders where they are used: diffusion text encoders and VLM vision towers.

* :func:`apply_safe_text_encoder` — replace a ``diffusers`` Stable Diffusion pipeline's
  ``text_encoder`` (``CLIPTextModel``) and, for SDXL, ``text_encoder_2``
  (``CLIPTextModelWithProjection``) with the text tower of a Safe-CLIP checkpoint.
* :func:`apply_safe_vision_encoder` — replace a LLaVA model's CLIP vision tower with the vision
  tower of a Safe-CLIP checkpoint.

Both take a directory written by :meth:`SafeCLIPTrainer.save_pretrained` (an HF ``CLIPModel``
with LoRA merged). The new module has the same class, config, dtype and device as the one it
replaces; the replaced module object itself is left untouched, so callers holding a reference to
it can still compare. Architectures must match exactly (fine-tune the same CLIP the pipeline or
VLM was built on), otherwise an :class:`~vlmsafe.errors.InputError` names the differing fields.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmsafe.errors import FileFormatError, InputError, UnsupportedModelError

_TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "image_size",
    "patch_size",
    "num_channels",
)


def _load_clip(path: str | os.PathLike[str]):
    from transformers import CLIPModel

    p = Path(path)
    if (p / "open_clip_config.json").is_file():
        raise UnsupportedModelError(
            f"{p} is an open_clip checkpoint; diffusers and LLaVA use transformers CLIP modules. Train Safe-CLIP on "
            "the transformers CLIPModel the pipeline/VLM was built from (e.g. openai/clip-vit-large-patch14)"
        )
    try:
        return CLIPModel.from_pretrained(str(p))
    except (OSError, ValueError) as exc:
        raise FileFormatError(
            f"cannot load a Safe-CLIP CLIPModel from {p}: {exc}. Pass the folder written by `vlmsafe safeclip "
            "train` / SafeCLIPTrainer.save_pretrained"
        ) from exc


def _check_config(target: Any, source: Any, fields: tuple[str, ...], what: str) -> None:
    diff = {
        f: (getattr(target, f, None), getattr(source, f, None))
        for f in fields
        if getattr(target, f, None) != getattr(source, f, None)
    }
    if diff:
        desc = ", ".join(f"{k}: {a} vs {b}" for k, a, b in ((k, *v) for k, v in diff.items()))
        raise InputError(
            f"the Safe-CLIP {what} does not match the model's ({desc}); fine-tune the same CLIP architecture the "
            "model uses"
        )


def _like(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module`` (same class, config, dtype, device) holding ``state``."""
    param = next(module.parameters())
    new = copy.deepcopy(module)
    try:
        new.load_state_dict(
            {k: v.to(dtype=param.dtype) if v.is_floating_point() else v for k, v in state.items()}, strict=True
        )
    except RuntimeError as exc:
        raise InputError(f"Safe-CLIP weights do not fit {type(module).__name__}: {str(exc).splitlines()[0]}") from exc
    return new.to(param.device).eval()


def load_safe_text_encoder(
    path: str | os.PathLike[str], like: nn.Module | None = None, *, with_projection: bool = False
) -> nn.Module:
    """The Safe-CLIP text tower as ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``).

    With ``like`` (an existing text encoder) the result copies its class, config, dtype and
    device; otherwise a float32 CPU module is built from the checkpoint's text config.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    clip = _load_clip(path)
    text_sd = {k: v for k, v in clip.text_model.state_dict().items()}
    proj_sd = {f"text_projection.{k}": v for k, v in clip.text_projection.state_dict().items()}
    if like is None:
        cfg = copy.deepcopy(clip.config.text_config)
        if with_projection:
            cfg.projection_dim = clip.config.projection_dim
            like = CLIPTextModelWithProjection(cfg)
        else:
            like = CLIPTextModel(cfg)
    if isinstance(like, CLIPTextModelWithProjection):
        _check_config(like.config, clip.config.text_config, _TEXT_FIELDS, "text tower")
        return _like(like, {**{f"text_model.{k}": v for k, v in text_sd.items()}, **proj_sd})
    if isinstance(like, CLIPTextModel):
        _check_config(like.config, clip.config.text_config, _TEXT_FIELDS, "text tower")
        return _like(like, text_sd)
    raise UnsupportedModelError(
        f"cannot put a CLIP text tower in place of {type(like).__name__}; expected CLIPTextModel or "
        "CLIPTextModelWithProjection"
    )


def apply_safe_text_encoder(
    pipe: Any, path: str | os.PathLike[str], *, path_2: str | os.PathLike[str] | None = None
) -> Any:
    """Swap a diffusers pipeline's text encoder(s) for Safe-CLIP's; returns ``pipe``.

    ``path`` replaces ``pipe.text_encoder``; for SDXL, ``path_2`` replaces ``pipe.text_encoder_2``
    (a Safe-CLIP run on the second encoder's CLIP, e.g. OpenCLIP ViT-bigG in HF format).
    The new modules are registered with ``pipe.register_modules`` so ``pipe.components`` and
    ``pipe.save_pretrained`` see them.
    """
    if getattr(pipe, "text_encoder", None) is None:
        raise UnsupportedModelError(f"{type(pipe).__name__} has no text_encoder to replace")
    new = {"text_encoder": load_safe_text_encoder(path, like=pipe.text_encoder)}
    if path_2 is not None:
        if getattr(pipe, "text_encoder_2", None) is None:
            raise UnsupportedModelError(
                f"path_2 was given but {type(pipe).__name__} has no text_encoder_2 (only SDXL-style pipelines do)"
            )
        new["text_encoder_2"] = load_safe_text_encoder(path_2, like=pipe.text_encoder_2)
    if hasattr(pipe, "register_modules"):
        pipe.register_modules(**new)
    else:
        for k, v in new.items():
            setattr(pipe, k, v)
    return pipe


def _vision_tower_owner(model: nn.Module) -> tuple[nn.Module, str]:
    for owner in (getattr(model, "model", None), model):
        if owner is not None and isinstance(getattr(owner, "vision_tower", None), nn.Module):
            return owner, "vision_tower"
    raise UnsupportedModelError(
        f"{type(model).__name__} has no vision_tower; apply_safe_vision_encoder supports LLaVA-style models "
        "(LlavaForConditionalGeneration, LlavaNext...)"
    )


def apply_safe_vision_encoder(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Swap a LLaVA-style model's CLIP vision tower for Safe-CLIP's; returns ``model``.

    The projector and language model are untouched: Safe-CLIP keeps the vision embedding space
    (its preservation terms), so the projector trained on the original tower stays valid.
    """
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    owner, attr = _vision_tower_owner(model)
    tower = getattr(owner, attr)
    clip = _load_clip(path)
    _check_config(tower.config, clip.config.vision_config, _VISION_FIELDS, "vision tower")
    vision_sd = clip.vision_model.state_dict()
    if isinstance(tower, CLIPVisionModelWithProjection):
        state = {
            **{f"vision_model.{k}": v for k, v in vision_sd.items()},
            **{f"visual_projection.{k}": v for k, v in clip.visual_projection.state_dict().items()},
        }
    elif isinstance(tower, CLIPVisionModel):
        state = vision_sd
    else:
        raise UnsupportedModelError(
            f"the vision tower is a {type(tower).__name__}; Safe-CLIP vision encoders replace CLIPVisionModel towers"
        )
    setattr(owner, attr, _like(tower, state))
    return model
