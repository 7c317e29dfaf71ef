"""MkDocs hook: the CLI reference page (``cli.md``), generated from the argument parsers at build time; the
README's figures and the model support table, taken from the repository at build time too.

Nothing of it is written by hand: :func:`docs.gen_cli.cli_reference` walks ``vlmsafe.cli.build_parser()``
and every subparser, and the page is added to the build in memory, so it can never go stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "docs")]  # this checkout's vlmsafe, and gen_cli beside this file

import gen_cli  # noqa: E402

#: The README's figures (assets/readme/*.png), which pages show as ``../assets/readme/NAME.png`` (the path that
#: works where the Markdown is read in the repository); the site carries them as ``img/NAME.png``.
FIGURES = ROOT / "assets" / "readme"


def on_page_markdown(markdown, page, config, files):
    """The figures' site path, and the support block of ``models.md`` (the README's:
    ``vlmsafe.testing.coverage.readme_block()``), at build time."""
    markdown = markdown.replace("](../assets/readme/", "](img/")
    if "<!-- SUPPORT-TABLE -->" in markdown:
        from vlmsafe.testing.coverage import readme_block

        markdown = markdown.replace("<!-- SUPPORT-TABLE -->", readme_block().strip())
    return markdown


def on_files(files, config):
    files.append(File.generated(config, "cli.md", content=gen_cli.cli_reference()))
    for figure in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"img/{figure.name}", abs_src_path=str(figure)))
    return files
