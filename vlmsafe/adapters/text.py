"""Adapter for plain decoder-only causal LMs (text only), e.g. the safety-aligned original LLM."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlmsafe.adapters.base import ImageLike, ModelAdapter, apply_template, register_adapter
from vlmsafe.adapters.chat import padding_side as _padding_side
from vlmsafe.errors import InputError


@register_adapter(
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "GPT2LMHeadModel",
)
class CausalLMAdapter(ModelAdapter):
    """Decoder-only LMs whose decoder blocks live at ``model.model.layers`` (GPT-2: ``transformer.h``)."""

    family = "causal_lm"
    supports_images = False

    @property
    def layers(self) -> nn.ModuleList:
        if hasattr(self.model, "model") and hasattr(self.model.model, "layers"):
            return self.model.model.layers
        return self.model.transformer.h

    def build_inputs(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageLike | None] | None = None,
        *,
        padding_side: str | None = "left",
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
    ) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if images is not None and any(img is not None for img in images):
            raise InputError(
                f"{type(self.model).__name__} is a text-only model and cannot take images; pass images=None "
                "(or use a VLM such as LlavaForConditionalGeneration)"
            )
        tokenizer = self._require_processor()
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        if getattr(tokenizer, "chat_template", None):
            texts = []
            for prompt in prompts:
                # Plain-string content: the form every causal-LM chat template accepts.
                conv = [{"role": "user", "content": prompt}]
                if system_prompt:
                    conv.insert(0, {"role": "system", "content": system_prompt})
                texts.append(apply_template(tokenizer, conv, model_name=self.model_name,
                                            add_generation_prompt=add_generation_prompt, tokenize=False))
        else:
            texts = list(prompts)
        if tokenizer.pad_token is None:
            raise InputError(
                "the tokenizer has no pad token; set tokenizer.pad_token = tokenizer.eos_token to batch prompts"
            )
        with _padding_side(tokenizer, padding_side):
            batch = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        return {k: v.to(self.device) for k, v in batch.items()}
