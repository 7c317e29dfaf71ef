"""Help texts audit: every option of every ``vlmsafe`` command has help that states its default, help is current
(``safeclip`` lists ``generate``, ``calibrate --anchor`` describes calibration) and no help repeats its prefix.

The walk is the CLI reference's (``docs/gen_cli.py``), so a command the reference shows cannot escape it.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from vlmsafe.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
gen_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_cli)

_NOT_OPTIONS = (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)


def every_option() -> list[tuple[str, argparse.ArgumentParser, argparse.Action]]:
    out = []
    for path, parser in gen_cli.commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, _NOT_OPTIONS) or action.help == argparse.SUPPRESS:
                continue
            name = " ".join(("vlmsafe", *path, max(action.option_strings, key=len) if action.option_strings
                             else action.dest))
            out.append((name, parser, action))
    return out


def shown_help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help line ``--help`` prints for ``action`` (the formatter's additions included, unwrapped)."""
    formatter = parser._get_formatter()
    return formatter._expand_help(action) if action.help else ""


def test_the_walk_sees_every_command():
    names = {name.rsplit(" ", 1)[0] for name, _, _ in every_option()}
    for command in ("vlmsafe calibrate", "vlmsafe safeclip generate", "vlmsafe safeclip pairs generate",
                    "vlmsafe probe weights", "vlmsafe merge-mask", "vlmsafe demo"):
        assert command in names
    assert len(every_option()) > 150


def test_every_option_has_help_stating_its_default():
    """An option that takes a value and is not required says what it is without being given: argparse's
    ``%(default)s`` appended by the shared formatter, or the help's own "(default: ...)". A flag (no value) is
    off unless given; a required option or a positional has no default."""
    missing_help, missing_default = [], []
    for name, parser, action in every_option():
        text = shown_help(parser, action)
        if not text.strip():
            missing_help.append(name)
        elif action.option_strings and action.nargs != 0 and not action.required and "default" not in text.lower():
            missing_default.append(f"{name}: {text}")
    assert not missing_help, f"options without help: {missing_help}"
    assert not missing_default, "options whose help does not state the default:\n" + "\n".join(missing_default)


def test_a_default_is_shown_with_its_value():
    helps = {name: shown_help(parser, action) for name, parser, action in every_option()}
    assert helps["vlmsafe safeclip eval --batch-size"] == "embedding batch size (default: 64)"
    assert helps["vlmsafe merge-mask --scope"].endswith("(default: row)")
    assert helps["vlmsafe safeclip generate --images-per-prompt"].endswith("(default: 1)")
    # a help that already names its default is not given a second one
    assert helps["vlmsafe calibrate --batch-size"] == "items per forward pass (default 8)"


def test_no_help_repeats_its_prefix():
    """"with --sample-level: sample-level: ..." (a caller's prefix before a field help that has its own)."""
    prefix = re.compile(r"(?:with )?(?:--)?([\w-]+): (?:with )?(?:--)?([\w-]+):")
    repeated = []
    for name, parser, action in every_option():
        match = prefix.match(shown_help(parser, action))
        if match and match[1].lower().replace("-", "") == match[2].lower().replace("-", ""):
            repeated.append(f"{name}: {shown_help(parser, action)}")
    assert not repeated, repeated
    helps = {name: shown_help(parser, action) for name, parser, action in every_option()}
    assert helps["vlmsafe generate --anchor"].startswith("with --sample-level: the image each input's shift")
    assert helps["vlmsafe generate --shift-from"].startswith("with --shiftdc: read each layer's image shift")


def test_calibrate_anchor_help_describes_calibration():
    helps = {name: shown_help(parser, action) for name, parser, action in every_option()}
    text = helps["vlmsafe calibrate --anchor"]
    assert "sample-level" not in text
    assert "each item's shift" in text and "calibration set" in text and "(default real)" in text


def test_safeclip_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["safeclip", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "pairs", "generate"):
        assert re.search(rf"^\s+{command}\s+\S", out, re.M), command
