"""MkDocs hook: the CLI reference page (``cli.md``), generated from the argument parsers at build time.

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


def on_files(files, config):
    files.append(File.generated(config, "cli.md", content=gen_cli.cli_reference()))
    return files
