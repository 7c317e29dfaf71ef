"""CMRM (real / blank / noise anchor, dataset- and sample-level) and ShiftDC, side by side.

Each method is a family of steering configs indexed by (layers, alpha) (:class:`MethodSpec`);
:func:`compare_methods` chooses every method's setting on a calibration split (alpha sweep over
every layer set: all layers as in CMRM, middle-to-last as in ShiftDC, each single layer) with the
demo's grid-and-choose (:mod:`vlmsafe.eval.sweep`) and reports the held-out test split at that
choice, every rate with its 95% Wilson interval and count.

The anchors and the safety directions are computed once, on the calibration split, like the
vectors: a blank / noise anchor needs only the prompts; ShiftDC needs the labels, and captions
written by the model (``caption_prompt``) where the items carry none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vlmsafe.data import Item
from vlmsafe.eval.sweep import DEFAULT_RULE, baseline, choose, get_rule, judge_scorer, sweep
from vlmsafe.stats import Rate
from vlmsafe.steering import SafeVLM, SteeringConfig, calibrate, calibrate_shiftdc
from vlmsafe.steering.shiftdc import CAPTION_PROMPT

DEFAULT_ALPHAS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
#: The comparison's generation settings (``python -m vlmsafe.cli.compare``): items per batch, tokens per answer.
BATCH_SIZE = 32
MAX_NEW_TOKENS = 12


@dataclass
class MethodSpec:
    """One steering method: how to build its config for a (layers, alpha) setting, and which layer sets to try."""

    name: str
    config: Callable[[Any, float], SteeringConfig]
    layer_sets: Sequence[Any]
    description: str = ""


def layer_sets(num_layers: int) -> list[Any]:
    """All layers (CMRM as published), middle-to-last (ShiftDC's default), then each single layer."""
    return ["all", "middle-to-last", *([i] for i in range(num_layers))]


def method_specs(
    model: Any,
    processor: Any,
    calibration: Sequence[Item],
    *,
    batch_size: int = 32,
    caption_prompt: str = CAPTION_PROMPT,
    caption_tokens: int = 16,
    anchors: Sequence[str] = ("real", "blank", "noise"),
    progress: bool = False,
) -> list[MethodSpec]:
    """CMRM dataset- and sample-level for each anchor, then ShiftDC (published and running shift)."""
    n = model.config.get_text_config().num_hidden_layers
    sets = layer_sets(n)
    with_images = [it for it in calibration if it.image is not None]
    specs: list[MethodSpec] = []
    paper = {"blank": " (paper)", "noise": "", "real": ""}
    for anchor in anchors:
        items = with_images if anchor == "real" else calibration
        vectors = calibrate(model, processor, items, anchor=anchor, batch_size=batch_size, progress=progress)
        label = "real image" if anchor == "real" else f"{anchor} anchor{paper[anchor]}"
        specs.append(
            MethodSpec(
                f"CMRM dataset-level, {label}",
                lambda layers, alpha, v=vectors: SteeringConfig(vectors=v, alpha=alpha, layers=layers),
                sets,
                f"mean shift h(x, {anchor} image) - h(x) over the calibration split",
            )
        )
        specs.append(
            MethodSpec(
                f"CMRM sample-level, {label}",
                lambda layers, alpha, a=anchor: SteeringConfig(mode="sample", anchor=a, alpha=alpha, layers=layers),
                sets,
                "each input's own shift"
                + (
                    " on its own image (one extra pass)"
                    if anchor == "real"
                    else f" with a {anchor} image (two extra passes)"
                ),
            )
        )
    labelled = [it for it in calibration if it.label is not None and (it.image is not None or it.meta.get("caption"))]
    directions = calibrate_shiftdc(
        model,
        processor,
        labelled,
        caption_prompt=caption_prompt,
        caption_tokens=caption_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    for shift_from, name in (("unsteered", "ShiftDC (as published)"), ("running", "ShiftDC, running shift")):
        specs.append(
            MethodSpec(
                name,
                lambda layers, alpha, s=shift_from: SteeringConfig(
                    directions=directions, alpha=alpha, layers=layers, shift_from=s
                ),
                ["middle-to-last", "all", *([i] for i in range(n))],
                "image shift against the captioned counterpart, projected on the safety direction, last token",
            )
        )
    return specs


def rate(flags: Sequence[bool]) -> dict[str, Any] | None:
    """``{"rate", "ci95", "k", "n"}`` of boolean ``flags`` (``None`` when there are none)."""
    flags = [bool(f) for f in flags]
    return Rate(sum(flags), len(flags)).to_dict() if flags else None


def split_rates(report: Any, genuine_refusal: Callable[[str], bool]) -> dict[str, Any]:
    """Unsafe, genuine-refusal, over-refusal and accuracy rates of one evaluation, with intervals."""
    harmful = [r for r in report.records if r.label == "harmful"]
    instructions = [r for r in report.records if r.label == "benign" and r.reference is None]
    questions = [r for r in report.records if r.reference is not None]
    return {
        "unsafe": rate([bool(r.unsafe) for r in harmful]),
        "genuine_refusal": rate([genuine_refusal(r.response) for r in harmful]),
        "over_refusal": rate([r.refused for r in instructions]),
        "accuracy": rate([bool(r.correct) for r in questions]),
    }


def compare_methods(
    specs: Sequence[MethodSpec],
    vlm: SafeVLM,
    calibration: Sequence[Item],
    test: Sequence[Item],
    judge: Any,
    *,
    genuine_refusal: Callable[[str], bool],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    rule: str = DEFAULT_RULE,
) -> dict[str, Any]:
    """Choose each method's (layers, alpha) on ``calibration`` with :func:`vlmsafe.eval.sweep.choose` (the
    named ``rule``; by default the demo's: most genuine refusals, benign limits of 3 points at the far end of
    the paired 95% interval), then measure ``test`` there. Every setting of the grid is measured (no
    pruning). A method with no qualifying setting gets no test rates (``"chosen": {"alpha": 0.0, ...}``).

    ``vlm``: the unsteered model (e.g. ``SafeVLM(model, processor, batch_size=BATCH_SIZE,
    max_new_tokens=MAX_NEW_TOKENS)``); every method steers it, and every evaluation uses its batch size and
    generation budget, so all rows are measured alike.
    Returns ``{"rows": [...], "grids": {name: calibration rows}}``."""
    from vlmsafe.eval import evaluate

    base, batch_size, max_new_tokens = vlm, vlm.batch_size, vlm.max_new_tokens
    scorer = judge_scorer(
        calibration,
        judge,
        refused=lambda r: genuine_refusal(r.response) if r.label == "harmful" else bool(r.refused),
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
    )
    base_cal = baseline(base, scorer, rule)
    plain = evaluate(base, test, judge, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=False)
    rows = [{"setting": "multimodal (unsteered)", **split_rates(plain, genuine_refusal), "chosen": None}]
    grids: dict[str, list[dict[str, Any]]] = {}
    for spec in specs:
        grid = sweep(base, spec.config, spec.layer_sets, alphas, scorer, base_cal, rule, prune=False)
        grids[spec.name] = [s.row(base_cal, get_rule(rule)) for s in grid]
        pick = choose(grid, base_cal, rule)
        if pick is None:
            rates = {k: None for k in ("unsafe", "genuine_refusal", "over_refusal", "accuracy")}
            chosen = {"alpha": 0.0, "layers": None, "calibration": None}
        else:
            report = evaluate(
                base.with_steering(spec.config(pick.layers, pick.alpha)),
                test,
                judge,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                progress=False,
            )
            rates = split_rates(report, genuine_refusal)
            chosen = {"alpha": pick.alpha, "layers": pick.layers, "calibration": pick.row(base_cal, get_rule(rule))}
        rows.append({"setting": spec.name, **rates, "chosen": chosen, "description": spec.description})
    return {"rows": rows, "grids": grids, "rule": get_rule(rule).description}


DOCS_START, DOCS_END = "<!-- COMPARE-TABLE-START -->", "<!-- COMPARE-TABLE-END -->"


def docs_block(result: dict[str, Any], seconds: float) -> str:
    """The method pages' comparison block (between :data:`DOCS_START` and :data:`DOCS_END`), from a
    :func:`compare_methods` result: what was measured, by which rule, then :func:`format_rows`."""
    plain = result["rows"][0]
    n = {k: (plain[k] or {}).get("n", 0) for k in ("unsafe", "over_refusal", "accuracy")}
    return "\n".join([
        DOCS_START,
        f"Measured by `python -m vlmsafe.cli.compare --out DIR --docs docs/methods.md` ({seconds / 60:.0f} minutes "
        f"wall on one torch thread) on the testbed's held-out test split ({n['unsafe']} harmful instructions, "
        f"{n['over_refusal']} benign instructions, {n['accuracy']} image questions). Each method's layers and alpha "
        f"are chosen on the calibration split by the demo's rule ({result['rule']}). Each cell: rate [95% Wilson "
        "interval] count. *Genuine refusal* = the aligned refusal sentence; *over-refusal* counts refusals of benign "
        "instructions only (a deflection is not a refusal).",
        "",
        format_rows(result["rows"]),
        DOCS_END,
    ])


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: each cell ``rate [95% interval] k/n``."""

    def cell(c: dict[str, Any] | None) -> str:
        if c is None:
            return "-"
        lo, hi = c["ci95"]
        return f"{100 * c['rate']:.1f}% [{100 * lo:.1f}-{100 * hi:.1f}] {c['k']}/{c['n']}"

    lines = [
        "| method | setting (chosen on calibration) | unsafe | genuine refusal | over-refusal | accuracy |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        chosen = r.get("chosen")
        where = (
            "-"
            if not chosen
            else (
                "no setting qualified on calibration"
                if not chosen["alpha"]
                else f"alpha {chosen['alpha']:g}, layers {chosen['layers']}"
            )
        )
        lines.append(
            f"| {r['setting']} | {where} | {cell(r['unsafe'])} | {cell(r['genuine_refusal'])} | "
            f"{cell(r['over_refusal'])} | {cell(r['accuracy'])} |"
        )
    return "\n".join(lines)


__all__ = [
    "BATCH_SIZE",
    "DEFAULT_ALPHAS",
    "DOCS_END",
    "DOCS_START",
    "MAX_NEW_TOKENS",
    "MethodSpec",
    "compare_methods",
    "docs_block",
    "format_rows",
    "layer_sets",
    "method_specs",
    "rate",
]
