"""The CLI reference, generated from ``vlmsafe.cli.build_parser()``: every command's ``--help``, verbatim.

``python docs/gen_cli.py [OUT.md]`` prints (or writes) the page; the MkDocs hook (``docs/hooks.py``) adds it
to the site at build time. Help is formatted at a fixed width (:data:`WIDTH` columns), the width
``tests/test_docs.py`` runs ``vlmsafe ... --help`` at to check the page against it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

WIDTH = 100  # argparse wraps help to $COLUMNS - 2


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = (),
             seen: set[int] | None = None) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``(("safeclip", "train"), parser)`` for ``parser`` and every subparser, depth first, in ``--help`` order
    (an alias, which maps to a parser already listed, is skipped)."""
    seen = set() if seen is None else seen
    seen.add(id(parser))
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    yield from commands(sub, (*path, name), seen)


def help_texts() -> list[tuple[str, str]]:
    """``[("vlmsafe", help), ("vlmsafe demo", help), ...]``: each command line and its ``--help`` output."""
    from vlmsafe.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    try:
        return [(" ".join(("vlmsafe", *path)), parser.format_help()) for path, parser in commands(build_parser())]
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous


def cli_reference() -> str:
    lines = [
        "# CLI reference",
        "",
        "Generated from the argument parsers when the site is built (`docs/gen_cli.py`): each section is",
        f"the command's `--help`, as printed in a {WIDTH}-column terminal. Every command takes `--help`.",
        "",
    ]
    for command, text in help_texts():
        anchor = command.replace(" ", "-")
        lines += [f"## `{command}` {{ #{anchor} }}", "", "```text", text.rstrip("\n"), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    page = cli_reference()
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(page, encoding="utf-8")
    else:
        print(page)
