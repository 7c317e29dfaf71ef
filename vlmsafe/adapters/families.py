"""Explicit adapters for the VLM families transformers 5 ships natively, beyond LLaVA and Qwen2(-.5)-VL.

Each names, for its family: the language model's decoder layers (counted by ``config.get_text_config()``),
the vision tower and projector, the image token, the anchor-image size its processor keeps as is, and
how a text-only twin is rendered (the same conversation through the model's own chat template, without
the image). Where a remedy cannot apply to a family, the adapter refuses it in one line saying why
(:attr:`ModelAdapter.refusals`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from vlmsafe.adapters.base import DYNAMIC_RESOLUTION_SIDE, ImageLike, register_adapter
from vlmsafe.adapters.chat import ChatVLMAdapter, Qwen2VLAdapter
from vlmsafe.errors import InputError
from vlmsafe.images import to_rgb


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)


@register_adapter("LlavaOnevisionForConditionalGeneration")
class LlavaOnevisionAdapter(ChatVLMAdapter):
    """LLaVA-OneVision (SigLIP + Qwen2, AnyRes-max tiling): the llava-next layout; anchors at one tile's size."""

    family = "llava_onevision"


@register_adapter("Qwen3VLForConditionalGeneration")
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL (dense): Qwen2-VL's layout (``model.visual`` with its merger). The vision tower also adds
    DeepStack features to the image positions of the first decoder layers, so those layers' image-position
    states differ from a plain embedding-path model: steering still edits layer outputs only."""

    family = "qwen3_vl"


@register_adapter("Qwen3VLMoeForConditionalGeneration")
class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    """Qwen3-VL MoE: the dense layout with sparse MLP blocks (the residual stream is the same)."""

    family = "qwen3_vl_moe"


@register_adapter("Glm4vForConditionalGeneration")
class Glm4vAdapter(Qwen2VLAdapter):
    """GLM-4.1V / GLM-4V: Qwen2-VL's layout (``model.visual`` with its merger, ``model.language_model``) around the
    GLM-4 text model; ``<|image|>`` marks the image positions between ``<|begin_of_image|>`` and
    ``<|end_of_image|>``."""

    family = "glm4v"


@register_adapter("Gemma3ForConditionalGeneration")
class Gemma3Adapter(ChatVLMAdapter):
    """Gemma 3 (SigLIP pooled to a fixed number of soft tokens + Gemma 3 text). The template's image
    placeholder is ``<start_of_image>`` (the processor expands it around ``<image_soft_token>`` s, which
    :attr:`image_token_id` marks); a system turn is folded into the first user turn by the template."""

    family = "gemma3"

    def _processor_images(self, images: Sequence[ImageLike | None]) -> list:
        return _images_per_row(images)


def _images_per_row(images: Sequence[ImageLike | None]) -> list:
    """One list per row (empty for a text-only row), for processors that count images per prompt (Gemma 3,
    mllama) and refuse a flat list when a batch mixes rows with and without an image."""
    if all(img is None for img in images):
        return []
    return [[to_rgb(img)] if img is not None else [] for img in images]


@register_adapter("Mistral3ForConditionalGeneration")
class Mistral3Adapter(ChatVLMAdapter):
    """Mistral 3 / Mistral Small 3.1 (Pixtral ViT at native resolution + patch merger + Mistral).

    Image positions are the ``[IMG]`` tokens; ``[IMG_BREAK]``/``[IMG_END]`` are text embeddings the
    processor puts between rows and are not image features.
    """

    family = "mistral3"

    @property
    def image_input_size(self) -> tuple[int, int]:
        """Pixtral keeps an image's resolution up to ``size["longest_edge"]``: the anchor is a square of
        :data:`DYNAMIC_RESOLUTION_SIDE` (capped there), in whole merged patches."""
        processor = self._require_processor()
        image_processor = processor.image_processor
        longest = int(_get(image_processor.size, "longest_edge") or DYNAMIC_RESOLUTION_SIDE)
        patch = _get(image_processor, "patch_size") or getattr(processor, "patch_size", 16)
        patch = int(_get(patch, "height") or patch)
        unit = patch * int(getattr(processor, "spatial_merge_size", 1) or 1)
        side = max(unit, min(DYNAMIC_RESOLUTION_SIDE, longest) // unit * unit)
        return side, side


@register_adapter("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration")
class SmolVLMAdapter(ChatVLMAdapter):
    """SmolVLM / Idefics3: SigLIP + pixel-shuffle connector; the language model is ``model.text_model``.

    SmolVLM's own processor needs the ``num2words`` package (transformers says so when it is missing).
    """

    family = "smolvlm"

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.text_model.layers

    @property
    def vision_tower(self) -> nn.Module | None:
        return self.inner.vision_model

    @property
    def projector(self) -> nn.Module | None:
        return self.inner.connector

    @property
    def image_input_size(self) -> tuple[int, int]:
        """One unsplit tile: a square of the processor's ``max_image_size`` (what it resizes each tile to)."""
        image_processor = self._require_processor().image_processor
        side = _get(getattr(image_processor, "max_image_size", None) or {}, "longest_edge") or _get(
            image_processor.size, "longest_edge")
        return int(side), int(side)


@register_adapter("Idefics2ForConditionalGeneration")
class Idefics2Adapter(SmolVLMAdapter):
    """Idefics2: SmolVLM's layout (``model.text_model``, ``model.vision_model``), with a perceiver resampler as its
    connector (a fixed number of image latents per image or tile) and a Mistral language model."""

    family = "idefics2"

    @property
    def image_input_size(self) -> tuple[int, int]:
        """One unsplit image: a square of the processor's ``size["longest_edge"]`` (980 published; images are
        resized to fit it)."""
        side = int(_get(self._require_processor().image_processor.size, "longest_edge"))
        return side, side


@register_adapter("AyaVisionForConditionalGeneration")
class AyaVisionAdapter(ChatVLMAdapter):
    """Aya Vision (SigLIP 2, pixel-shuffle + SwiGLU projector, Command R7B / Cohere2 text): the llava layout. The
    processor expands ``<image>`` into ``<|START_OF_IMG|>`` + tiles (``TILE_n`` / ``TILE_GLOBAL``, rows of
    ``<|IMG_PATCH|>`` ended by ``<|IMG_LINE_BREAK|>``) + ``<|END_OF_IMG|>``; the image positions are the
    ``<|IMG_PATCH|>`` tokens (``config.image_token_index``)."""

    family = "aya_vision"

    @property
    def image_input_size(self) -> tuple[int, int]:
        """One tile: a square of the processor's ``img_size`` (364 published; larger images are tiled)."""
        side = int(getattr(self._require_processor(), "img_size", 0) or 364)
        return side, side


@register_adapter("InternVLForConditionalGeneration")
class InternVLAdapter(ChatVLMAdapter):
    """InternVL 2.5 / 3 in the HF-native layout (``OpenGVLab/InternVL3-*-hf``): InternViT, pixel-shuffle MLP
    projector, Qwen2 (or InternLM) text; ``<IMG_CONTEXT>`` marks image positions."""

    family = "internvl"


@register_adapter("PaliGemmaForConditionalGeneration")
class PaliGemmaAdapter(ChatVLMAdapter):
    """PaliGemma (1 and 2): SigLIP + linear projector + Gemma, a prefix-LM with no chat template.

    The processor builds ``<image>*N<bos>{prompt}\\n`` and refuses text without an image, so the text-only
    twin ``<bos>{prompt}\\n`` is tokenised here with the processor's tokenizer, exactly as the processor
    tokenises the text after the image tokens. PaliGemma has no system turn: a system prompt is refused.
    """

    family = "paligemma"

    def render(self, prompt: str, with_image: bool, *, system_prompt: str | None = None,
               add_generation_prompt: bool = True) -> str:
        processor = self._require_processor()
        if system_prompt:
            raise InputError("PaliGemma has no system turn (its prompt is '<image><bos>{prompt}\\n'); "
                             "drop the system prompt or put it into the prompt itself")
        return (processor.image_token if with_image else "") + processor.tokenizer.bos_token + prompt + "\n"

    def _process(self, texts: list[str], images: Sequence[ImageLike | None],
                 padding_side: str | None) -> dict[str, torch.Tensor]:
        processor = self._require_processor()
        tokenizer = processor.tokenizer
        rows: list[list[int]] = []
        pixels = []
        for text, image in zip(texts, images):
            if image is None:
                rows.append(tokenizer(text, add_special_tokens=False)["input_ids"])
                continue
            prefix = processor.image_token + tokenizer.bos_token
            if not text.startswith(prefix) or not text.endswith("\n"):
                raise InputError(f"a PaliGemma prompt with an image is '{prefix}{{prompt}}\\n'; got {text!r}")
            # '<image>{prompt}': the processor adds <bos> and '\n' itself; given no <image> it would guess the
            # layout, with a warning on stderr for every batch
            out = processor(text=[processor.image_token + text[len(prefix):-1]], images=[to_rgb(image)],
                            return_tensors="pt")
            rows.append(out["input_ids"][0].tolist())
            pixels.append(out["pixel_values"])
        batch = _pad(rows, tokenizer.pad_token_id, padding_side or tokenizer.padding_side)
        batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])  # all prefix: attends bidirectionally
        if pixels:
            batch["pixel_values"] = torch.cat(pixels)
        self._check_image_tokens(batch["input_ids"], images)
        self._check_lengths(batch)
        return {k: v.to(self.device) for k, v in batch.items()}


def _pad(rows: list[list[int]], pad_id: int, side: str) -> dict[str, torch.Tensor]:
    """Stack token rows into ``input_ids``/``attention_mask``, padded on ``side``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return {"input_ids": ids, "attention_mask": mask}


@register_adapter("MllamaForConditionalGeneration")
class MllamaAdapter(ChatVLMAdapter):
    """Llama 3.2 Vision (mllama): the image enters through cross-attention layers interleaved with Llama 3.1's
    self-attention layers (``text_config.cross_attention_layers``), not through image tokens in the sequence.

    Steering with given vectors and recording work on the text positions. CMRM calibration, sample-level
    CMRM and ShiftDC need a text-only twin that differs from the multimodal prompt only by the image; here
    the image is one ``<|image|>`` token read by cross-attention (the twin has no image positions to
    compare), and the published template adds a system block only when there is no image, so the twin
    differs by more than the image: they are refused (:attr:`refusals`).
    """

    family = "mllama"
    refusals: ClassVar[dict[str, str]] = {
        "text-only twin": "Llama 3.2 Vision (mllama) reads the image through cross-attention, so its text-only "
                          "twin has no image tokens (and its template adds a system block without an image): CMRM "
                          "calibration, sample-level CMRM and ShiftDC cannot apply",
    }

    @property
    def cross_attention_layers(self) -> list[int]:
        """Indices (in :attr:`layers`) of the layers that read the image."""
        return [int(i) for i in self.model.config.get_text_config().cross_attention_layers]

    def build_pair(self, prompts, images, **kwargs):
        self.refuse("text-only twin")
        raise AssertionError("unreachable")

    def _processor_images(self, images: Sequence[ImageLike | None]) -> list:
        return _images_per_row(images)

    def _process(self, texts: list[str], images: Sequence[ImageLike | None],
                 padding_side: str | None) -> dict[str, torch.Tensor]:
        if len({img is None for img in images}) > 1:
            raise InputError("Llama 3.2 Vision (mllama) cannot batch prompts with and without an image together "
                             "(its cross-attention inputs are per image); pass them in separate batches (or batch "
                             "size 1)")
        return super()._process(texts, images, padding_side)

    @property
    def image_input_size(self) -> tuple[int, int]:
        """One tile: the processor's ``size`` (tiles of that size, up to ``max_image_tiles``)."""
        size = self._require_processor().image_processor.size
        return int(_get(size, "width")), int(_get(size, "height"))


__all__ = [
    "AyaVisionAdapter",
    "Gemma3Adapter",
    "Glm4vAdapter",
    "Idefics2Adapter",
    "InternVLAdapter",
    "LlavaOnevisionAdapter",
    "Mistral3Adapter",
    "MllamaAdapter",
    "PaliGemmaAdapter",
    "Qwen3VLAdapter",
    "Qwen3VLMoeAdapter",
    "SmolVLMAdapter",
]
