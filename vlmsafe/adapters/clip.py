"""Adapters for CLIP encoders (HF ``CLIPModel`` and ``open_clip`` models).

A CLIP model has two residual streams; the adapter is bound to one ``tower`` ("text" or
"vision"), so recording and editing work on encoders exactly as on decoder LMs.

The one owner of a CLIP's tower structure: Safe-CLIP's training interface
(:mod:`vlmsafe.safeclip.backends`: tokenize, encode, LoRA targets, save) asks these adapters where a
tower's blocks are rather than knowing it a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlmsafe.adapters.base import ImageLike, ModelAdapter, register_adapter
from vlmsafe.errors import InputError
from vlmsafe.images import to_rgb

_TOWERS = ("text", "vision")


class _CLIPAdapterBase(ModelAdapter):
    supports_images = True

    def __init__(self, model: nn.Module, processor: Any | None = None, *, tower: str = "text"):
        super().__init__(model, processor)
        if tower not in _TOWERS:
            raise InputError(f"tower must be one of {_TOWERS}, got {tower!r}")
        self.tower = tower

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(input_ids, dtype=torch.bool)


@register_adapter("CLIPModel", "CLIPTextModel", "CLIPVisionModel", "CLIPTextModelWithProjection",
                  "CLIPVisionModelWithProjection")
class CLIPAdapter(_CLIPAdapterBase):
    """HF CLIP: ``text_model.encoder.layers`` / ``vision_model.encoder.layers``."""

    family = "clip"

    def _tower_module(self) -> nn.Module:
        name = "text_model" if self.tower == "text" else "vision_model"
        if hasattr(self.model, name):
            return getattr(self.model, name)
        # single-tower classes (CLIPTextModel wraps text_model, CLIPVisionModel wraps vision_model)
        raise InputError(
            f"{type(self.model).__name__} has no {self.tower} tower; pass tower='text' or 'vision' accordingly"
        )

    @property
    def entry_module(self) -> nn.Module:
        return self._tower_module()

    @property
    def layers(self) -> nn.ModuleList:
        return self._tower_module().encoder.layers

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        sub = getattr(cfg, f"{self.tower}_config", cfg)
        return int(sub.hidden_size)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def vision_tower(self) -> nn.Module | None:
        return getattr(self.model, "vision_model", None)

    @property
    def projector(self) -> nn.Module | None:
        return getattr(self.model, "visual_projection" if self.tower == "vision" else "text_projection", None)

    def build_inputs(
        self,
        prompts: Sequence[str] | None = None,
        images: Sequence[ImageLike | None] | None = None,
        *,
        padding_side: str | None = "right",
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
    ) -> dict[str, torch.Tensor]:
        processor = self._require_processor()
        if self.tower == "text":
            tokenizer = getattr(processor, "tokenizer", processor)
            batch = tokenizer(list(prompts or []), padding=True, truncation=True, return_tensors="pt")
        else:
            if not images or any(img is None for img in images):
                raise InputError("the vision tower needs one image per item; got a missing image")
            image_processor = getattr(processor, "image_processor", processor)
            batch = image_processor(images=[to_rgb(img) for img in images], return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}


@register_adapter("open_clip.model.CLIP", "open_clip.model.CustomTextCLIP")
class OpenCLIPAdapter(_CLIPAdapterBase):
    """open_clip: ``transformer.resblocks`` (text) / ``visual.transformer.resblocks`` (vision).

    ``processor`` is a dict ``{"tokenizer": open_clip tokenizer, "preprocess": image transform}``
    (what ``open_clip.get_tokenizer`` / ``create_model_and_transforms`` return). open_clip's
    forward receives already-embedded tokens, so pass ``inputs=`` to recording when a position
    rule needs token ids (``"last"`` on text means the end-of-text token, found by argmax).
    """

    family = "open_clip"

    def _transformer(self) -> nn.Module:
        if self.tower == "text":
            if hasattr(self.model, "transformer"):
                return self.model.transformer
            return self.model.text.transformer  # CustomTextCLIP
        return self.model.visual.transformer

    @property
    def batch_first(self) -> bool:  # type: ignore[override]
        return bool(getattr(self._transformer(), "batch_first", True))

    @property
    def entry_module(self) -> nn.Module:
        return self._transformer()

    @property
    def layers(self) -> nn.ModuleList:
        return self._transformer().resblocks

    @property
    def hidden_size(self) -> int:
        return int(self._transformer().width)

    @property
    def vision_tower(self) -> nn.Module | None:
        return self.model.visual

    def build_inputs(
        self,
        prompts: Sequence[str] | None = None,
        images: Sequence[ImageLike | None] | None = None,
        *,
        padding_side: str | None = None,
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
    ) -> dict[str, torch.Tensor]:
        processor = self._require_processor()
        if self.tower == "text":
            tokens = processor["tokenizer"](list(prompts or []))
            return {"input_ids": tokens.to(self.device)}
        if not images or any(img is None for img in images):
            raise InputError("the vision tower needs one image per item; got a missing image")
        pixels = torch.stack([processor["preprocess"](to_rgb(img)) for img in images])
        return {"pixel_values": pixels.to(self.device)}
