"""The demo's Markdown: the results table (every rate with its 95% interval and count) and the
README block generated from a report, so the figures a reader sees are the ones measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmsafe.errors import FileFormatError
from vlmsafe.io import write_text_atomic
from vlmsafe.tables import markdown_table

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
            "assets/testbed/aligned_lm --after assets/testbed`). "
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


def testbed_paragraph(report: dict[str, Any]) -> str:
    """What the bundled testbed is and how to rebuild it (size and build time from its build info)."""
    size = f"{report['testbed_params']:,}-parameter " if report.get("testbed_params") else ""
    minutes = (
        f" ({report['build_seconds'] / 60:.0f} minutes with one torch thread)" if report.get("build_seconds") else ""
    )
    return (
        f"The testbed is a {size}`LlavaForConditionalGeneration` trained on synthetic data in the stages of "
        "LLaVA-1.5 (language pretraining, text-only safety alignment, vision pretraining, feature alignment, "
        "visual instruction tuning on benign image data only); test topic pairs, templates and image styles are "
        "held out from training and calibration. See [assets/testbed/README.md](assets/testbed/README.md). It "
        "shows the mechanism on a model small enough to ship, not the figures of a 7B model. Rebuild it with "
        f"`python -m vlmsafe.cli.build_testbed --out assets/testbed --seed 0 --overwrite`{minutes}, then record its "
        "figures with `python -m vlmsafe.cli.demo_check --write --readme README.md`."
    )


def readme_block(report: dict[str, Any], weight_change: list[dict[str, Any]] | None = None) -> str:
    """The README's demo section (between the markers), from a ``run_demo`` report."""
    n = report["n_test"]
    merge = merge_paragraph(report, weight_change)
    return "\n".join(
        [
            README_START,
            f"What `vlmsafe demo` prints (bundled tiny LLaVA; held-out test split of {n['harmful']} harmful and "
            f"{n['benign'] + n['image_questions']} benign items: unseen topic pairs, unseen prompt templates, unseen "
            f"image styles; CPU, {report['seconds']:.0f} s). Each cell: rate [95% bootstrap interval over prompts] "
            "count/total.",
            "",
            format_table(report["rows"]),
            "",
            "*Refused* counts only the aligned refusal; *complied with the task* only an answer that restates the "
            'requested task; *deflected* is the image-question answer "i cannot tell that from the image", '
            "which is neither (`vlmsafe.testbed.outcome`). CMRM settings (layers, alpha) and the merge weight are "
            "chosen on the calibration split by genuine refusals, with image-question accuracy and benign answers "
            "kept within 3 points, never on the test split. Lines in the figures are the calibration sweeps, "
            "stars the test split.",
            "",
            testbed_paragraph(report),
            "",
            "![CMRM: outcomes vs alpha](assets/readme/cmrm_sweep.png)",
            "",
            *([merge, ""] if merge else []),
            "![Safety merge: outcomes vs weight](assets/readme/merge_sweep.png)",
            README_END,
        ]
    )


def update_readme(path: str | Path, report: dict[str, Any], weight_change: list[dict[str, Any]] | None = None) -> None:
    """Replace the block between the demo markers of ``path`` by :func:`readme_block`."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise FileFormatError(
            f"{p} has no {README_START} ... {README_END} block; add the two markers where the table goes"
        )
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    write_text_atomic(p, head + readme_block(report, weight_change) + tail, overwrite=True)
