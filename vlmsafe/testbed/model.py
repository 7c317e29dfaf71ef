"""The testbed's model and processor: a real ``LlavaForConditionalGeneration``, tiny.

A Llama language model, a CLIP vision tower read at its penultimate layer (as LLaVA-1.5 does), a
two-layer GELU projector, a word-level tokenizer with the llava-1.5 chat template and a
``CLIPImageProcessor``, so every code path that serves a real LLaVA serves the testbed unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from vlmsafe.testbed.data import vocabulary
from vlmsafe.testing.tokenization import IMAGE_TOKEN, build_word_tokenizer


def build_processor(cfg: Any) -> LlavaProcessor:
    """Word-level tokenizer (llava-1.5 chat template) + CLIP image processor, sized to ``cfg``."""
    tok = build_word_tokenizer(sorted(vocabulary()))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tok.chat_template,
    )


def build_model(cfg: Any, tok: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    """A freshly initialised LLaVA of the sizes in ``cfg`` (a :class:`~vlmsafe.testbed.build.BuildConfig`)."""
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        hidden_size=cfg.vision_hidden,
        intermediate_size=cfg.vision_hidden * 2,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=4,
        projection_dim=cfg.vision_hidden,
    )
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=cfg.num_image_tokens,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlavaForConditionalGeneration(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    return model


def extract_language_model(model: LlavaForConditionalGeneration) -> LlamaForCausalLM:
    """The VLM's language model as a standalone ``LlamaForCausalLM`` (weights copied)."""
    lm = LlamaForCausalLM(model.config.text_config)
    lm.model.load_state_dict(model.model.language_model.state_dict())
    lm.lm_head.load_state_dict(model.lm_head.state_dict())
    lm.generation_config = model.generation_config
    return lm
