"""The demo's Markdown: the results table (every rate with its 95% interval and count) and the
README block generated from a report, so the figures a reader sees are the ones measured."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmsafe.errors import FileFormatError
from vlmsafe.io import write_text_atomic

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
    lo, hi = c["ci"]
    return f"{100 * c['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] {c['count']}/{c['n']}"


def _get(row: dict[str, Any], path: tuple[str, ...]) -> Any:
    out: Any = row
    for key in path:
        out = out.get(key) if isinstance(out, dict) else None
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown row per setting; columns as in :data:`COLUMNS`."""
    lines = ["| setting | " + " | ".join(name for name, _ in COLUMNS) + " | note |",
             "|---|" + "---:|" * len(COLUMNS) + "---|"]
    for r in rows:
        cells = " | ".join(cell(_get(r, path)) for _, path in COLUMNS)
        lines.append(f"| {r['setting']} | {cells} | {r.get('note', '')} |")
    return "\n".join(lines)


def readme_block(report: dict[str, Any]) -> str:
    """The README's demo section (between the markers), from a ``run_demo`` report."""
    n = report["n_test"]
    return "\n".join([
        README_START,
        f"What `vlmsafe demo` prints (bundled tiny LLaVA; held-out test split of {n['harmful']} harmful and "
        f"{n['benign'] + n['image_questions']} benign items: unseen topic pairs, unseen prompt templates, unseen "
        f"image styles; CPU, about {report['seconds']:.0f} s). Each cell: rate [95% bootstrap interval over prompts] "
        "count/total.",
        "",
        format_table(report["rows"]),
        "",
        "*Refused* counts only the aligned refusal; *complied with the task* only an answer that restates the "
        "requested task; *deflected* is the image-question answer \"I cannot tell that from the image\", which is "
        "neither (`vlmsafe.testbed.outcome`). CMRM settings (layers, alpha) and the merge weight are chosen on the "
        "calibration split, by genuine refusals with benign behaviour kept (accuracy and benign answers within 3 "
        "points), never on the test split.",
        "",
        "![CMRM: outcomes vs alpha](assets/readme/cmrm_sweep.png)",
        "",
        "![Safety merge: outcomes vs weight](assets/readme/merge_sweep.png)",
        README_END,
    ])


def update_readme(path: str | Path, report: dict[str, Any]) -> None:
    """Replace the block between the demo markers of ``path`` by :func:`readme_block`."""
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise FileFormatError(f"{p} has no {README_START} ... {README_END} block; add the two markers where the table goes")
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    write_text_atomic(p, head + readme_block(report) + tail, overwrite=True)
