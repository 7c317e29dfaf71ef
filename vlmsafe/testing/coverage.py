"""The generic adapter's coverage of the installed transformers, and the README's support block.

:func:`walk` builds a tiny model of every image-text-to-text class transformers ships
(:func:`vlmsafe.testing.families.walk_image_text_to_text`, checked by ``tests/test_generic_adapter.py``);
:func:`coverage_section` states the counts, the coverage and every class the generic adapter refuses, leaves out
of scope or cannot build tiny, with the reason. :func:`readme_block` is the family table
(:func:`vlmsafe.adapters.support_table`, from the adapters themselves) followed by that section: the README block
between the SUPPORT-TABLE markers, which ``tests/test_readme.py`` keeps equal. It builds models with the test
kit, so it sits above the library (the library never imports :mod:`vlmsafe.testing`).

Regenerate the README block with ``python -m vlmsafe.cli.support_table --write README.md``.
"""

from __future__ import annotations

import functools
from pathlib import Path

from vlmsafe.adapters.support import support_table
from vlmsafe.io import replace_marked_block


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


def readme_block() -> str:
    """The family table, then the generic adapter's coverage of the installed transformers (the README block)."""
    return support_table() + "\n" + coverage_section(walk()[0])


START, END = "<!-- SUPPORT-TABLE-START -->\n", "\n<!-- SUPPORT-TABLE-END -->"


def write_readme(path: str | Path) -> None:
    """Replace the block between the SUPPORT-TABLE markers of ``path`` with :func:`readme_block`."""
    replace_marked_block(path, START, END, START + readme_block().strip() + END)
