"""Tables as text: the one place that lays out rows for a terminal (fixed width) or for Markdown.

Every report's table (the demo's, Safe-CLIP's retrieval table, the probes' summaries) is built from
these two, so a column is aligned and a missing value shown the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["markdown_table", "text_table"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 0) -> str:
    """Fixed-width columns two spaces apart, a dashed rule under the header.

    The first ``left`` columns (names) are left-aligned, the others (numbers) right-aligned.
    """
    cells = [[str(h) for h in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *(line(r) for r in cells[1:])])


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, align: Sequence[str] | None = None) -> str:
    """A Markdown table; ``align`` gives each column's rule (``"---"``, ``"---:"``), left-aligned by default."""
    rule = align or ["---"] * len(header)
    return "\n".join(
        ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|", *("| " + " | ".join(r) + " |" for r in rows)]
    )
