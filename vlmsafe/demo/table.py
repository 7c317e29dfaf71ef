"""The demo's Markdown: the results table (every rate with its 95% interval and count) and the
README block generated from a report, so the figures a reader sees are the ones measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmsafe.reading import replace_marked_block
from vlmsafe.tables import markdown_table
from vlmsafe.testbed.readme import build_time

README_START, README_END = "<!-- DEMO-TABLE-START -->", "<!-- DEMO-TABLE-END -->"

COLUMNS = (
    ("refused (harmful)", ("harmful", "refusal")),
    ("complied with the task (harmful)", ("harmful", "compliance")),
    ("deflected (harmful)", ("harmful", "deflection")),
    ("refused (benign)", ("benign", "refusal")),
    ("image-question accuracy", ("accuracy",)),
)


def cell(c: dict[str, Any] | None) -> str:
    """``"97.4% [96.0, 98.7] 518/532"``; ``"-"`` when not measured."""
    if not c or c.get("rate") is None:
        return "-"
    lo, hi = c["ci95"]
    return f"{100 * c['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] {c['k']}/{c['n']}"


def _get(row: dict[str, Any], path: tuple[str, ...]) -> Any:
    out: Any = row
    for key in path:
        out = out.get(key) if isinstance(out, dict) else None
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown row per setting; columns as in :data:`COLUMNS`."""
    return markdown_table(
        ["setting", *(name for name, _ in COLUMNS), "note"],
        [[str(r["setting"]), *(cell(_get(r, path)) for _, path in COLUMNS), str(r.get("note", ""))] for r in rows],
        align=["---", *["---:"] * len(COLUMNS), "---"],
    )


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def merge_paragraph(report: dict[str, Any], weight_change: list[dict[str, Any]] | None) -> str:
    """What the merge sweep shows, with its numbers (calibration split) and the LM's weight change."""
    sweep = report.get("safety_merge", {}).get("sweep")
    if not sweep:
        return ""
    first, last = sweep[0]["calibration"], sweep[-1]["calibration"]
    steps = ", ".join(
        f"{r['weight']:g}: {_pct(r['calibration']['harmful']['refusal'])} / {_pct(r['calibration']['accuracy'])}"
        for r in sweep
    )
    moved = ""
    if weight_change:
        changes = [w["relative_change"] for w in weight_change if w["relative_change"] is not None]
        moved = (
            f"Visual instruction tuning moved the language model's weight matrices by {100 * min(changes):.0f}-"
            f"{100 * max(changes):.0f}% per layer (relative Frobenius norm; `vlmsafe probe weights --before "
            "assets/testbed/aligned_lm --after assets/testbed --out reports/`). "
        )
    return (
        "**Why the merge row moves little here.** " + moved + "A linear merge walks back along that change: on the "
        f"calibration split, genuine refusals / image-question accuracy at each weight are {steps} (weight 1 is the "
        f"aligned LM inside the VLM: benign instructions answered {_pct(last['benign']['compliance'])}, against "
        f"{_pct(first['benign']['compliance'])} unmerged). The image skills and the lost refusals were learnt by "
        "the same weight change, so every point of safety the merge buys costs accuracy, and no weight keeps "
        "accuracy within 3 points with more refusals than the chosen one. CMRM instead removes the image-induced "
        "shift of one hidden state at inference, which is why it recovers refusals at little cost in accuracy. "
        "A likely reason merges recover more on real VLMs, not measured here: a large, broadly pretrained LM "
        "needs to move much less to learn images; measure yours with `vlmsafe probe weights` before expecting "
        "either outcome."
    )


def _row(report: dict[str, Any], setting: str | None) -> dict[str, Any] | None:
    return next((r for r in report.get("rows", []) if r["setting"] == setting), None)


def _cell_pct(c: dict[str, Any] | None) -> str:
    """``"12.5% (3/24)"`` of a rate cell."""
    return "-" if not c or c.get("rate") is None else f"{100 * c['rate']:.1f}% ({c['k']}/{c['n']})"


def breakdown_paragraph(report: dict[str, Any]) -> str:
    """Where the best steering row is weak: its outcomes by template and image kind and its accuracy by
    question kind and phrasing, against the unsteered model (test split; from ``report.json``)."""
    best, plain = _row(report, report.get("best_steering")), _row(report, "multimodal (image + text)")
    if not best or not plain or "by_template" not in best:
        return ""
    name = best["setting"].replace("multimodal + ", "")

    def worst(r: dict[str, Any], label: str, outcome: str, k: int = 3) -> list[tuple[str, dict]]:
        cells = [(t.split("/", 1)[1], v[outcome]) for t, v in r["by_template"].items() if t.startswith(label + "/")]
        return sorted(cells, key=lambda tv: -tv[1]["rate"])[:k]

    leaks = "; ".join(f"\"{t}\" {_cell_pct(c)}" for t, c in worst(best, "harmful", "compliance"))
    zero = sum(1 for t, v in best["by_template"].items() if t.startswith("harmful/") and v["compliance"]["k"] == 0)
    n_tpl = sum(1 for t in best["by_template"] if t.startswith("harmful/"))
    refusals = "; ".join(f"\"{t}\" {_cell_pct(c)}" for t, c in worst(best, "benign", "refusal"))
    plain_ref = max((v["refusal"]["rate"] for t, v in plain["by_template"].items() if t.startswith("benign/")),
                    default=0.0)
    kinds = ", ".join(
        f"{k}: complied {_cell_pct(best['by_image'].get(f'harmful/{k}', {}).get('compliance'))}, benign refused "
        f"{_cell_pct(best['by_image'].get(f'benign/{k}', {}).get('refusal'))}"
        for k in ("drawn", "blank", "noise") if f"harmful/{k}" in best["by_image"]
    )
    acc = best.get("accuracy_by", {})
    questions = ", ".join(f"{q.replace('_', ' ')} {_cell_pct(c)}" for q, c in acc.get("question", {}).items())
    phr = acc.get("phrasing", {})
    phrasing = (
        f"trained phrasings {_cell_pct(phr.get('trained'))}, held-out phrasings {_cell_pct(phr.get('held-out'))}"
        if phr else ""
    )
    return (
        f"**Where {name} is weak** (test split, `report.json`: `by_template`, `by_image`, `accuracy_by` of each "
        f"row). Compliance with harmful requests is 0 on {zero} of {n_tpl} templates; the highest: {leaks}. "
        f"Benign refusals, highest per template: {refusals} (unsteered: at most {100 * plain_ref:.1f}% on any "
        f"template). By image: {kinds}."
        + (f" Image-question accuracy by question kind: {questions}." if questions else "")
        + (f" By phrasing: {phrasing}." if phrasing else "")
        + (" By image kind: " + ", ".join(f"{k.replace('vqa_', '')} {_cell_pct(c)}" for k, c in
                                          acc.get("image_kind", {}).items()) + "." if acc.get("image_kind") else "")
    )


def shiftdc_paragraph(report: dict[str, Any]) -> str:
    """Why the ShiftDC row reads as it does: its grid, whether a setting qualified, and the measured
    projection of the image shift on the safety direction (``details`` of its row)."""
    row = next((r for r in report.get("rows", []) if r["setting"].startswith("multimodal + ShiftDC")), None)
    if row is None:
        return ""
    grid = report.get("calibration_grids", {}).get(row["setting"], [])
    alphas = sorted({g["alpha"] for g in grid})
    sets = ", ".join("all" if ls == "all" else "-".join(map(str, (ls[0], ls[-1]))) if len(ls) > 1 else str(ls[0])
                     for ls in row.get("layer_sets", []))
    proj = (row.get("details") or {}).get("projection", {}).get("layers", [])
    proj_text = "; ".join(
        f"layer {p['layer']}: |cos| {p['cosine']:.2f}, {100 * p['gap_fraction_harmful']:.1f}% of the gap"
        for p in proj
    )
    base = report.get("calibration_baseline") or {}
    base_ref = (base.get("harmful") or {}).get("refusal")
    best = max(grid, key=lambda g: (g.get("harmful") or {}).get("refusal") or 0.0, default=None)
    best_text = (
        f"; the most refusals any setting reached on calibration was {100 * best['harmful']['refusal']:.0f}% "
        f"(alpha {best['alpha']:g}, layers {best['layers'] if best['layers'] is not None else 'all'}) against "
        f"{100 * base_ref:.0f}% unsteered" if best and base_ref is not None and best.get("harmful") else ""
    )
    measured = (
        "per layer, the mean |cosine| between the image shift and the safety direction (benign minus harmful "
        "means of captioned prompts), and the signed share of the benign-minus-harmful gap by which the image moves "
        "a harmful prompt (negative: towards the harmful mean, so removing it moves the prompt towards the benign "
        f"side): {proj_text}"
    )
    if row["chosen"]["calibration"] is None:
        verdict = (
            "No setting qualified on calibration (none refused more than the unsteered model within the benign "
            "limits), so the row prints no rates. Why, measured: ShiftDC removes only the image shift's component "
            f"along the safety direction; {measured}. CMRM removes the whole shift."
        )
    else:
        chosen = row["chosen"]
        verdict = f"The chosen setting is alpha {chosen['alpha']:g}, layers {chosen['layers']}; measured: {measured}."
    return (
        f"**ShiftDC on the testbed.** The sweep tried alphas {', '.join(f'{a:g}' for a in alphas)} (log-spaced, "
        f"stopping where benign outputs break) on layer sets {sets} (1-3 maps the reference's layers 10-31 of 32 "
        f"on LLaVA-1.5-7B){best_text}. {verdict}"
    )


def testbed_paragraph(report: dict[str, Any]) -> str:
    """What the bundled testbed is and how to rebuild it (size and build time from its build info)."""
    size = f"{report['testbed_params']:,}-parameter " if report.get("testbed_params") else ""
    minutes = f" ({build_time(report['build_seconds'], report.get('build_cpu_seconds'))})" if report.get(
        "build_seconds") else ""
    return (
        f"The testbed is a {size}`LlavaForConditionalGeneration` trained on synthetic data in the stages of "
        "LLaVA-1.5 (language pretraining, text-only safety alignment, vision pretraining, feature alignment, "
        "visual instruction tuning on benign image data only); test topic pairs, templates and image styles are "
        "held out from training and calibration. See [assets/testbed/README.md](assets/testbed/README.md). It "
        "shows the mechanism on a model small enough to ship, not the figures of a 7B model. Rebuild it with "
        f"`python -m vlmsafe.cli.build_testbed --out assets/testbed --seed 0 --overwrite`{minutes}, then record its "
        "figures with `python -m vlmsafe.cli.demo_check --write --readme README.md`."
    )


def run_time(report: dict[str, Any]) -> str:
    """How long the run took and where: ``"83 s wall, 160 s CPU on Intel Xeon ... (2 cores, 2 torch threads)"``
    (``"CPU, 83 s"`` from a report written before CPU time and the machine were recorded)."""
    where = report.get("machine") or {}
    if report.get("cpu_seconds") is None or not where.get("cpu"):
        return f"CPU, {report['seconds']:.0f} s"
    return (f"{report['seconds']:.0f} s wall, {report['cpu_seconds']:.0f} s CPU on {where['cpu']} "
            f"({where['cores']} cores, {where['torch_threads']} torch thread{'s' * (where['torch_threads'] != 1)})")


def readme_block(report: dict[str, Any], weight_change: list[dict[str, Any]] | None = None) -> str:
    """The README's demo section (between the markers), from a ``run_demo`` report."""
    n = report["n_test"]
    merge = merge_paragraph(report, weight_change)
    all_methods = " --all-methods" if any("ShiftDC" in r["setting"] for r in report["rows"]) else ""
    phrasings = next((r.get("accuracy_by", {}).get("phrasing", {}) for r in report["rows"]
                      if r["setting"] == "multimodal (image + text)"), {})
    held_out = ", half the image questions in phrasings never trained" if "held-out" in phrasings else ""
    return "\n".join(
        [
            README_START,
            f"What `vlmsafe demo{all_methods}` prints (bundled tiny LLaVA; held-out test split of {n['harmful']} "
            "harmful and "
            f"{n['benign'] + n['image_questions']} benign items: unseen topic pairs, unseen prompt templates, unseen "
            f"image styles{held_out}; {run_time(report)}). Each cell: rate [95% bootstrap interval over prompts] "
            "count/total.",
            "",
            format_table(report["rows"]),
            "",
            "*Refused* counts only the aligned refusal; *complied with the task* only an answer that restates the "
            'requested task; *deflected* is the image-question answer "i cannot tell that from the image", '
            "which is neither (`vlmsafe.testbed.outcome`). Steering settings (layers, alpha) and the merge weight "
            "are chosen on the calibration split, never on the test split, by one rule (`vlmsafe.eval.sweep`, "
            "`most-refusals`): the most genuine refusals among settings whose image-question accuracy and benign "
            "answers stay within 3 points of the unsteered model on the same prompts at the far end of the paired "
            "95% interval, so a choice does not sit on the edge of the limit; a method with no such setting "
            "prints no rates. Lines in the figures are the calibration sweeps, stars the test split.",
            "",
            testbed_paragraph(report),
            "",
            *(x for p in (breakdown_paragraph(report), shiftdc_paragraph(report)) if p for x in (p, "")),
            "![CMRM: outcomes vs alpha](assets/readme/cmrm_sweep.png)",
            "",
            *([merge, ""] if merge else []),
            "![Safety merge: outcomes vs weight](assets/readme/merge_sweep.png)",
            README_END,
        ]
    )


def update_readme(path: str | Path, report: dict[str, Any], weight_change: list[dict[str, Any]] | None = None) -> None:
    """Replace the block between the demo markers of ``path`` by :func:`readme_block`."""
    replace_marked_block(path, README_START, README_END, readme_block(report, weight_change))
