"""Model adapters: explicit, per-family knowledge of where the residual stream lives.

>>> adapter = get_adapter(model, processor)        # the VLM families of adapters.families, causal LMs, CLIP
>>> mm, text_only = adapter.build_pair(["how do I ...?"], [image])
"""

from __future__ import annotations

from typing import Any

from torch import nn

from vlmsafe.adapters.base import (
    ModelAdapter,
    adapter_class_for,
    check_prompt_lengths,
    parse_layer_spec,
    register_adapter,
    supported_model_classes,
)
from vlmsafe.adapters.chat import ChatVLMAdapter, LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter, Qwen25VLAdapter
from vlmsafe.adapters.clip import CLIPAdapter, OpenCLIPAdapter
from vlmsafe.adapters.families import (
    AyaVisionAdapter,
    Gemma3Adapter,
    Glm4vAdapter,
    Idefics2Adapter,
    InternVLAdapter,
    LlavaOnevisionAdapter,
    Mistral3Adapter,
    MllamaAdapter,
    PaliGemmaAdapter,
    Qwen3VLAdapter,
    Qwen3VLMoeAdapter,
    SmolVLMAdapter,
)
from vlmsafe.adapters.generic import GenericVLMAdapter, GuessedAdapterWarning
from vlmsafe.adapters.support import support_table
from vlmsafe.adapters.text import CausalLMAdapter


def get_adapter(model: nn.Module | ModelAdapter, processor: Any | None = None, **kwargs: Any) -> ModelAdapter:
    """Return the adapter for ``model`` (an adapter passes through unchanged).

    Raises :class:`vlmsafe.errors.UnsupportedModelError` naming the class and the supported ones.
    ``kwargs`` go to the adapter (e.g. ``tower="vision"`` for CLIP).
    """
    if isinstance(model, ModelAdapter):
        if processor is not None and model.processor is None:
            model.processor = processor
        return model
    return adapter_class_for(model)(model, processor, **kwargs)


__all__ = [
    "AyaVisionAdapter",
    "CLIPAdapter",
    "CausalLMAdapter",
    "ChatVLMAdapter",
    "Gemma3Adapter",
    "GenericVLMAdapter",
    "Glm4vAdapter",
    "GuessedAdapterWarning",
    "Idefics2Adapter",
    "InternVLAdapter",
    "LlavaAdapter",
    "LlavaNextAdapter",
    "LlavaOnevisionAdapter",
    "Mistral3Adapter",
    "MllamaAdapter",
    "ModelAdapter",
    "OpenCLIPAdapter",
    "PaliGemmaAdapter",
    "Qwen2VLAdapter",
    "Qwen3VLAdapter",
    "Qwen3VLMoeAdapter",
    "Qwen25VLAdapter",
    "SmolVLMAdapter",
    "check_prompt_lengths",
    "get_adapter",
    "parse_layer_spec",
    "register_adapter",
    "support_table",
    "supported_model_classes",
]
