"""The aligned text-only LLM of each family: the other side of a safety merge, with the VLM's language-model shapes."""

from __future__ import annotations

from vlmsafe.testing import _seed

#: The aligned text-only LLM of each family (the safety merge's other side), as a transformers causal-LM class.
ALIGNED_LLM_CLASSES = {
    "llava_onevision": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3_vl": ("Qwen3Config", "Qwen3ForCausalLM"),
    "qwen3_vl_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "mistral3": ("MistralConfig", "MistralForCausalLM"),
    "smolvlm": ("LlamaConfig", "LlamaForCausalLM"),
    "idefics3": ("LlamaConfig", "LlamaForCausalLM"),
    "idefics2": ("MistralConfig", "MistralForCausalLM"),
    "aya_vision": ("Cohere2Config", "Cohere2ForCausalLM"),
    "glm4v": ("Glm4Config", "Glm4ForCausalLM"),
    "internvl": ("Qwen2Config", "Qwen2ForCausalLM"),
    "paligemma": ("GemmaConfig", "GemmaForCausalLM"),
    "mllama": ("LlamaConfig", "LlamaForCausalLM"),
}


def tiny_aligned_llm(family: str, vlm, seed: int = 1, extra_rows: int = 0):
    """A random text-only LLM with ``vlm``'s language-model shapes (``Qwen3ForCausalLM`` for Qwen3-VL, ...):
    the aligned model a safety merge pulls the VLM's language model toward. ``extra_rows``: a larger vocabulary
    (InternVL's released embeddings have fewer rows than its LLM's)."""
    import transformers as t

    config_name, model_name = ALIGNED_LLM_CLASSES[family]
    text = vlm.config.get_text_config().to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    text["tie_word_embeddings"] = bool(getattr(vlm.config, "tie_word_embeddings", False))
    text["vocab_size"] += extra_rows
    if family == "mllama":  # Llama 3.1: the self-attention layers only
        text["num_hidden_layers"] -= len(text.pop("cross_attention_layers"))
    _seed(seed)
    config = getattr(t, config_name)(**text)
    return getattr(t, model_name)(config).eval()
