"""Adapters for chat VLMs driven by a HF processor + chat template (LLaVA, LLaVA-NeXT, Qwen2-VL)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vlmsafe.adapters.base import ImageLike, ModelAdapter, apply_template, register_adapter
from vlmsafe.errors import InputError
from vlmsafe.images import to_rgb


@contextlib.contextmanager
def padding_side(tokenizer: Any, side: str | None) -> Iterator[None]:
    """Temporarily set ``tokenizer.padding_side`` (generation wants left padding)."""
    if side is None:
        yield
        return
    if side not in ("left", "right"):
        raise InputError(f"padding_side must be 'left' or 'right', got {side!r}")
    old = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        yield
    finally:
        tokenizer.padding_side = old


class ChatVLMAdapter(ModelAdapter):
    """Shared logic for ``*ForConditionalGeneration`` VLMs whose inner model holds
    ``language_model`` (a decoder-only LM) and whose processor has a chat template.

    The conversation for an item is ``[{"role": "user", "content": [image?, text]}]`` (plus an
    optional system turn); its text-only counterpart is the same conversation without the image
    entry, rendered by the same template, so the two differ *only* by the image.
    """

    supports_images = True

    def __init__(self, model: nn.Module, processor: Any | None = None):
        super().__init__(model, processor)
        if processor is not None:
            self.check_template()

    def check_template(self) -> None:
        """Render a one-message conversation (with and without an image) through the chat template, once per
        processor and template: a template that raises is named when the model is loaded, with its file."""
        processor = self.processor
        template = getattr(processor, "chat_template", None)
        if template is None or not callable(getattr(processor, "apply_chat_template", None)):
            return  # render() says there is no template when one is needed
        key = (id(processor), str(template))
        if key in _CHECKED_TEMPLATES:
            return
        for with_image in (True, False):
            self.render("Describe the image.", with_image)
        if len(_CHECKED_TEMPLATES) > 64:
            _CHECKED_TEMPLATES.clear()
        _CHECKED_TEMPLATES.add(key)

    @property
    def inner(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.inner.language_model.layers

    @property
    def vision_tower(self) -> nn.Module | None:
        return self.inner.vision_tower

    @property
    def projector(self) -> nn.Module | None:
        return self.inner.multi_modal_projector

    @property
    def image_token_id(self) -> int | None:
        return int(self.model.config.image_token_id)

    @property
    def image_placeholder(self) -> str:
        """The string the processor expands into image tokens."""
        return self._require_processor().image_token

    def conversation(self, prompt: str, with_image: bool, system_prompt: str | None = None) -> list[dict]:
        content: list[dict] = [{"type": "image"}] if with_image else []
        content.append({"type": "text", "text": prompt})
        conv = [{"role": "user", "content": content}]
        if system_prompt:
            conv.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        return conv

    def render(self, prompt: str, with_image: bool, *, system_prompt: str | None = None,
               add_generation_prompt: bool = True) -> str:
        processor = self._require_processor()
        if getattr(processor, "chat_template", None) is None:
            where = f"{self.model_name}: " if os.path.isdir(self.model_name) else ""
            raise InputError(
                f"{where}the processor of {type(self.model).__name__} has no chat template (chat_template.jinja, or "
                "chat_template in processor_config.json / tokenizer_config.json); copy chat_template.jinja from the "
                "checkpoint the model came from, or set processor.chat_template (see the model card), so vlmsafe can "
                "build conversations"
            )
        return apply_template(
            processor,
            self.conversation(prompt, with_image, system_prompt),
            model_name=self.model_name,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def prompt_tokens(self, prompt: str, with_image: bool) -> int:
        """Tokens of the rendered conversation (the image placeholder counts as the text it is)."""
        tokenizer = self._require_processor().tokenizer
        return len(tokenizer(self.render(prompt, with_image), add_special_tokens=False, verbose=False)["input_ids"])

    def build_inputs(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageLike | None] | None = None,
        *,
        padding_side: str | None = "left",
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
    ) -> dict[str, torch.Tensor]:
        self._require_processor()
        if isinstance(prompts, str):
            prompts = [prompts]
        if images is None:
            images = [None] * len(prompts)
        if len(images) != len(prompts):
            raise InputError(
                f"got {len(prompts)} prompts but {len(images)} images; pass one image (or None) per prompt"
            )
        placeholder = self.image_placeholder
        texts = []
        for prompt in prompts:
            if placeholder in prompt:
                raise InputError(
                    f"prompt already contains the image placeholder {placeholder!r}; pass the plain "
                    "instruction and the image separately (vlmsafe inserts the placeholder via the chat template)"
                )
        for prompt, image in zip(prompts, images):
            texts.append(
                self.render(prompt, image is not None, system_prompt=system_prompt,
                            add_generation_prompt=add_generation_prompt)
            )
        return self._process(texts, images, padding_side)

    def build_raw_inputs(
        self, texts: Sequence[str], images: Sequence[ImageLike | None], *, padding_side: str | None = "left"
    ) -> dict[str, torch.Tensor]:
        """Batch already-templated texts; each text with an image must contain the placeholder."""
        self._require_processor()
        placeholder = self.image_placeholder
        for i, (text, image) in enumerate(zip(texts, images)):
            if image is not None and placeholder not in text:
                raise InputError(
                    f"prompt {i} has an image but no image placeholder {placeholder!r}; add it where the "
                    "image belongs, or use build_inputs() which applies the chat template for you"
                )
            if image is None and placeholder in text:
                raise InputError(f"prompt {i} contains {placeholder!r} but no image was given for it")
        return self._process(list(texts), images, padding_side)

    def _process(self, texts: list[str], images: Sequence[ImageLike | None],
                 padding_side: str | None) -> dict[str, torch.Tensor]:
        """Run the processor on rendered texts (+ the non-missing images) and check image tokens."""
        processor = self._require_processor()
        flat_images = self._processor_images(images)
        with _padding(processor, padding_side):
            batch = processor(text=texts, images=flat_images or None, padding=True, return_tensors="pt",
                              verbose=False)  # an over-long prompt: _check_lengths says so, in one line
        self._check_image_tokens(batch["input_ids"], images)
        self._check_lengths(batch)
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _processor_images(self, images: Sequence[ImageLike | None]) -> list:
        """The images as the processor takes them for a batch: the non-missing ones, in order."""
        return [to_rgb(img) for img in images if img is not None]

    def _check_lengths(self, batch: Any) -> None:
        """Refuse a row whose text alone exceeds the model's context, before the model runs on it (what
        :meth:`check_prompts` checks for a whole data set up front; this catches direct library calls)."""
        limit = self.context_length
        mask = batch.get("attention_mask")
        if limit is None or mask is None:
            return
        text_tokens = mask.sum(dim=1) - (self.image_token_mask(batch["input_ids"]) & mask.bool()).sum(dim=1)
        for i, n in enumerate(text_tokens.tolist()):
            if n > limit:
                raise InputError(
                    f"prompt {i} is {n} tokens long with the chat template, over the {limit}-token context of "
                    f"{self.model_name or type(self.model).__name__}; shorten it"
                )

    def _check_image_tokens(self, input_ids: torch.Tensor, images: Sequence[ImageLike | None]) -> None:
        has_tokens = self.image_token_mask(input_ids).any(dim=1)
        for i, image in enumerate(images):
            if (image is not None) != bool(has_tokens[i]):
                raise InputError(
                    f"row {i}: {'an image was given but no' if image is not None else 'no image was given but'} "
                    f"image tokens (id {self.image_token_id}) are in the tokenised prompt; check that the "
                    "processor's image token matches model.config.image_token_id"
                )


#: ``(id(processor), template)`` pairs whose template rendered a probe conversation (checked once each).
_CHECKED_TEMPLATES: set[tuple[int, str]] = set()


@contextlib.contextmanager
def _padding(processor: Any, side: str | None) -> Iterator[None]:
    with padding_side(processor.tokenizer, side):
        yield


@register_adapter("LlavaForConditionalGeneration")
class LlavaAdapter(ChatVLMAdapter):
    """llava-1.5 (``LlavaForConditionalGeneration``): CLIP ViT + MLP projector + Llama/Vicuna."""

    family = "llava"


@register_adapter("LlavaNextForConditionalGeneration")
class LlavaNextAdapter(ChatVLMAdapter):
    """llava-next / llava-1.6 (``LlavaNextForConditionalGeneration``): AnyRes tiling."""

    family = "llava_next"


@register_adapter("Qwen2VLForConditionalGeneration")
class Qwen2VLAdapter(ChatVLMAdapter):
    """Qwen2-VL: native-resolution ViT (``model.visual``) with a patch merger."""

    family = "qwen2_vl"

    @property
    def vision_tower(self) -> nn.Module | None:
        return self.inner.visual

    @property
    def projector(self) -> nn.Module | None:
        return getattr(self.inner.visual, "merger", None)


@register_adapter("Qwen2_5_VLForConditionalGeneration")
class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL's layout with a windowed-attention ViT; its own family, because vectors
    calibrated on one are meaningless on the other even where the 7B models share depth and width."""

    family = "qwen2_5_vl"
