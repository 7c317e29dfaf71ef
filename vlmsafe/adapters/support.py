"""What works on which VLM family: the table the README shows, built from the adapters themselves.

Each explicit family's row comes from its adapter (:attr:`ModelAdapter.refusals`: what it refuses and why) and
from :data:`ALIGNED_LLMS` / :data:`MERGE_GAPS`, which ``tests/test_families.py`` parametrises its merge test
with, so the table states what the tests check. ``tests/test_families.py`` and ``tests/test_generic_adapter.py``
exercise every "yes" on a tiny model of the family's real transformers class.

Below the table, :func:`coverage_section` states what the generic adapter makes of every image-text-to-text
class of the installed transformers (:func:`vlmsafe.testing.families.walk_image_text_to_text`, which
``tests/test_generic_adapter.py`` checks): the counts, the coverage, and every class it refuses, leaves out
of scope or cannot build tiny, with the reason.

Regenerate the README block with ``python -m vlmsafe.adapters.support`` (prints it) or
``python -m vlmsafe.adapters.support --write README.md``.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

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


@functools.lru_cache(maxsize=1)
def walk() -> tuple[list[tuple[str, str, str, str]], dict]:
    """The walk over the installed transformers' image-text-to-text classes (rows, built meta models); once."""
    from vlmsafe.testing.families import walk_image_text_to_text

    models: dict = {}
    rows = walk_image_text_to_text(models=models)
    return rows, models


def coverage(rows) -> tuple[int, int, float]:
    """``(generic, refused, share)``: the generic adapter's share of the decoder-only VLM classes that have no
    explicit adapter (out-of-scope and unbuildable classes are not counted)."""
    generic = sum(r[2] == "generic" for r in rows)
    refused = sum(r[2] == "refused" for r in rows)
    return generic, refused, generic / max(1, generic + refused)


def strict_coverage(rows) -> tuple[int, int, float]:
    """``(generic, not covered, share)`` counting every buildable class without an explicit adapter, the out-of-
    scope ones (encoder-decoders, models without image input) as not covered: the stricter reading."""
    generic = sum(r[2] == "generic" for r in rows)
    missed = sum(r[2] in ("refused", "out of scope") for r in rows)
    return generic, missed, generic / max(1, generic + missed)


def coverage_section(rows) -> str:
    """Markdown: what the walk found, the generic adapter's coverage, and every class it does not cover."""
    import transformers

    counts = {s: sum(r[2] == s for r in rows) for s in ("explicit", "generic", "refused", "out of scope",
                                                        "unbuildable")}
    generic, refused, share = coverage(rows)
    _, missed, strict = strict_coverage(rows)
    lines = [
        f"Every image-text-to-text model class of the installed transformers ({transformers.__version__}), built "
        f"from its default config shrunk to 2 layers: {len(rows)} classes; {counts['explicit']} explicit, "
        f"{counts['generic']} generic, {counts['refused']} refused, {counts['out of scope']} out of scope, "
        f"{counts['unbuildable']} whose default config does not build. The generic adapter covers {generic} of "
        f"the {generic + refused} decoder-only VLM classes without an explicit adapter ({share:.0%}); counting "
        f"the out-of-scope classes as uncovered too, {generic} of the {generic + missed} buildable classes without "
        f"an explicit adapter ({strict:.0%}). Out of scope, and not counted in the first share: encoder-decoders "
        "(their decoder reads the image through cross-attention to an encoder; no image positions, no text-only "
        "twin) and classes with neither a vision config nor an image "
        "token (text-only, protein-text and robot-action models listed under image-text-to-text). Generic: "
        + ", ".join(f"`{r[0]}`" for r in rows if r[2] == "generic") + ".",
        "",
        "| model type | class | status | why |",
        "|---|---|---|---|",
    ]
    for model_type, cls, status, detail in rows:
        if status in ("refused", "out of scope", "unbuildable"):
            lines.append(f"| `{model_type}` | `{cls}` | {status} | {detail.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def support_table() -> str:
    """The family table, then the generic adapter's coverage of the installed transformers (the README block)."""
    return _family_table() + "\n" + coverage_section(walk()[0])


def _family_table() -> str:
    """The support table as Markdown (family x {steering, sample-level, ShiftDC, merge with its LLM, probes})."""
    head = ("family", *COLUMNS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in support_rows()]
    return "\n".join(lines) + "\n"


START, END = "<!-- SUPPORT-TABLE-START -->\n", "\n<!-- SUPPORT-TABLE-END -->"


def write_readme(path: str | Path) -> None:
    """Replace the block between the SUPPORT-TABLE markers of ``path`` with :func:`support_table`."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(head + START + support_table().strip() + END + tail, encoding="utf-8")


if __name__ == "__main__":  # python -m vlmsafe.adapters.support [--write README.md]
    if sys.argv[1:2] == ["--write"]:
        write_readme(sys.argv[2] if len(sys.argv) > 2 else "README.md")
    else:
        sys.stdout.write(support_table())
