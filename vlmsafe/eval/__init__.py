"""Safety evaluation: data sets, judges, unsafe-rate / over-refusal / utility reports.

Typical use::

    from vlmsafe.eval import load_items, RefusalJudge, evaluate, compare_reports

    items = load_items("eval.jsonl")
    mm = evaluate(model, items, RefusalJudge())                  # model: a Generator, e.g. SafeVLM
    text = evaluate(model, items, RefusalJudge(), text_only=True)
    print(compare_reports({"text-only": text, "multimodal": mm}))   # rates with 95% intervals and counts

How far the refusal judge can be trusted: :mod:`vlmsafe.eval.judge_check`
(``python -m vlmsafe.cli.judge_check assets/judge/heldout.jsonl``). See :mod:`vlmsafe.eval.loaders`
for MM-SafetyBench, FigStep/SafeBench and VLSafe, and :mod:`vlmsafe.eval.figstep` for rendering
FigStep-style typographic attacks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmsafe._lazy import attach

if TYPE_CHECKING:  # the public names and their modules, for static tools; at run time
    # vlmsafe._lazy.attach reads this block and loads each name's module on first access
    from vlmsafe.data import LABELS, Item, load_items, save_items
    from vlmsafe.eval.evaluate import EvalOptions, Generator, contains_reference, evaluate
    from vlmsafe.eval.figstep import FIGSTEP_PROMPT, figstep_text, make_figstep_items, render_typographic
    from vlmsafe.eval.judges import (
        DEFAULT_REFUSAL_PHRASES,
        HARMBENCH_PROMPT,
        HarmBenchJudge,
        Judge,
        JudgeOptions,
        LlamaGuardJudge,
        RefusalJudge,
        Verdict,
        is_degenerate,
        load_judge,
        parse_guard_output,
        parse_yes_no,
    )
    from vlmsafe.eval.loaders import load_figstep, load_mm_safetybench, load_vlsafe
    from vlmsafe.eval.refusal import RefusalRules
    from vlmsafe.eval.report import EvalReport, ItemRecord, compare_reports, fmt_rate
    from vlmsafe.stats import Rate, wilson_interval

__all__ = [
    "DEFAULT_REFUSAL_PHRASES",
    "FIGSTEP_PROMPT",
    "HARMBENCH_PROMPT",
    "LABELS",
    "EvalOptions",
    "EvalReport",
    "Generator",
    "HarmBenchJudge",
    "Item",
    "ItemRecord",
    "Judge",
    "JudgeOptions",
    "LlamaGuardJudge",
    "Rate",
    "RefusalJudge",
    "RefusalRules",
    "Verdict",
    "compare_reports",
    "contains_reference",
    "evaluate",
    "figstep_text",
    "fmt_rate",
    "is_degenerate",
    "load_figstep",
    "load_items",
    "load_judge",
    "load_mm_safetybench",
    "load_vlsafe",
    "make_figstep_items",
    "parse_guard_output",
    "parse_yes_no",
    "render_typographic",
    "save_items",
    "wilson_interval",
]

__getattr__, __dir__ = attach(__name__)
