"""What works on which VLM family: the table the README shows, built from the adapters themselves.

Each explicit family's row comes from its adapter (:attr:`ModelAdapter.refusals`: what it refuses and why) and
from :data:`ALIGNED_LLMS` / :data:`MERGE_GAPS`, which ``tests/test_families.py`` parametrises its merge test
with, so the table states what the tests check. ``tests/test_families.py`` and ``tests/test_generic_adapter.py``
exercise every "yes" on a tiny model of the family's real transformers class.

The README block adds, below this table, what the generic adapter makes of every image-text-to-text class of
the installed transformers: that walk builds tiny models with the test kit, so it lives above the library
(:mod:`vlmsafe.testing.coverage`); regenerate the block with ``python -m vlmsafe.cli.support_table --write
README.md``.
"""

from __future__ import annotations

from vlmsafe.adapters.base import _REGISTRY, ModelAdapter

#: Family -> (model classes, the aligned text-only LLM layout its language model is merged with).
ALIGNED_LLMS: dict[str, tuple[str, str]] = {
    "llava": ("LLaVA-1.5", "Llama 2 / Vicuna (`LlamaForCausalLM`)"),
    "llava_next": ("LLaVA-NeXT", "Mistral / Vicuna (`MistralForCausalLM`, `LlamaForCausalLM`)"),
    "llava_onevision": ("LLaVA-OneVision", "Qwen2 (`Qwen2ForCausalLM`)"),
    "qwen2_vl": ("Qwen2-VL", "Qwen2 (`Qwen2ForCausalLM`)"),
    "qwen2_5_vl": ("Qwen2.5-VL", "Qwen2.5 (`Qwen2ForCausalLM`)"),
    "qwen3_vl": ("Qwen3-VL", "Qwen3 (`Qwen3ForCausalLM`)"),
    "qwen3_vl_moe": ("Qwen3-VL-MoE", "Qwen3-MoE (`Qwen3MoeForCausalLM`), fused experts matched to per-expert "
                                     "tensors in either stored orientation"),
    "gemma3": ("Gemma 3", "Gemma 3 text, tied embeddings (`Gemma3ForCausalLM`)"),
    "mistral3": ("Mistral 3 (Pixtral)", "Mistral Small (`MistralForCausalLM`)"),
    "smolvlm": ("SmolVLM / Idefics3", "SmolLM2 / Llama (`LlamaForCausalLM`)"),
    "idefics2": ("Idefics2", "Mistral (`MistralForCausalLM`)"),
    "aya_vision": ("Aya Vision", "Command R7B (`Cohere2ForCausalLM`)"),
    "glm4v": ("GLM-4.1V", "GLM-4 (`Glm4ForCausalLM`)"),
    "internvl": ("InternVL (HF-native)", "its Qwen2 LLM (`Qwen2ForCausalLM`)"),
    "paligemma": ("PaliGemma", "Gemma (`GemmaForCausalLM`)"),
    "mllama": ("Llama 3.2 Vision (mllama)", "Llama 3.1 (`LlamaForCausalLM`), cross-attention layers kept"),
}

#: Families whose merge with the aligned LLM is not supported yet, and why.
MERGE_GAPS: dict[str, str] = {}

COLUMNS = ("steering", "sample-level", "ShiftDC", "merge with its LLM", "probes")

#: What holds for every family, below the table (``tests/test_stranger_models.py`` checks each clause).
LOADING_NOTE = (
    "Every family loads the same way (`vlmsafe.loading`): in float32 unless `--dtype` says otherwise (`auto`: the "
    "checkpoint's own dtype), from safetensors only, never running code from the folder; and `generate`, `evaluate` "
    "and `calibrate` decode greedily whatever a checkpoint's `generation_config.json` suggests (its `do_sample`, "
    "`temperature` and `top_p` are ignored), so answers and rates are reproducible."
)


def _family_adapters() -> dict[str, type[ModelAdapter]]:
    out: dict[str, type[ModelAdapter]] = {}
    for cls in _REGISTRY.values():
        if cls.supports_images and cls.family in ALIGNED_LLMS:
            out.setdefault(cls.family, cls)
    return out


def support_rows() -> list[tuple[str, ...]]:
    """``(family, steering, sample-level, ShiftDC, merge, probes)`` per explicit family, then the generic row;
    a gap reads ``no: <why>``."""
    rows = []
    adapters = _family_adapters()
    for family, (name, llm) in ALIGNED_LLMS.items():
        adapter = adapters[family]
        twin = adapter.refusals.get("text-only twin")
        steering = "yes (given vectors; CMRM calibration: no, the text-only twin)" if twin else "yes"
        sample = shiftdc = f"no: {twin}" if twin else "yes"
        merge = f"no: {MERGE_GAPS[family]}" if family in MERGE_GAPS else f"yes, {llm}"
        rows.append((f"{name} (`{family}`)", steering, sample, shiftdc, merge, "yes"))
    rows.append(("any other decoder-only VLM transformers ships (generic adapter, warns what it guessed; see "
                 "the coverage below)", "yes", "yes", "yes", "yes where the tensor names follow the transformers "
                 "layout", "yes"))
    return rows


def support_table() -> str:
    """The support table as Markdown (family x {steering, sample-level, ShiftDC, merge with its LLM, probes}), then
    :data:`LOADING_NOTE`."""
    head = ("family", *COLUMNS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in support_rows()]
    return "\n".join(lines) + "\n\n" + LOADING_NOTE + "\n"
