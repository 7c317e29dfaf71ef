"""`vlmsafe --help` and every subcommand's `--help` answer without importing torch or transformers.

Importing torch alone takes seconds; a help screen should take a fraction of one. The help text of every
flag (choices, ranges, defaults) comes from modules that import nothing heavy (``vlmsafe.steering.choices``,
``vlmsafe.merge.choices``, ``vlmsafe.safeclip.terms``), and the packages export their names lazily
(``vlmsafe._lazy``). This checks the cause, not a time: a timed test would be flaky on a loaded machine.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "safetensors", "diffusers", "peft", "open_clip", "sklearn", "matplotlib")


def _commands() -> list[list[str]]:
    from vlmsafe.cli import build_parser

    out: list[list[str]] = [[]]

    def walk(parser, prefix):
        for action in parser._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                for name, sub in action.choices.items():
                    out.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return out


def test_every_help_screen_imports_nothing_heavy():
    commands = _commands()
    assert ["safeclip", "pairs", "generate"] in commands and ["probe", "weights"] in commands
    code = f"""
import contextlib, io, json, sys
from vlmsafe.cli import main
loaded = {{}}
for cmd in {commands!r}:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            main([*cmd, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (cmd, exc.code)
    assert "usage:" in out.getvalue(), cmd
    loaded[" ".join(cmd)] = sorted(m for m in {HEAVY!r} if m in sys.modules)
print(json.dumps(loaded))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(loaded) == len(commands)
    heavy = {cmd: mods for cmd, mods in loaded.items() if mods}
    assert not heavy, f"help screens that import heavy modules: {heavy}"


def test_lazy_package_exports_resolve_to_the_defining_module():
    """Every name a package lists in __all__ loads on access, from the module its table names."""
    import importlib

    from vlmsafe._lazy import exports_of

    for pkg in ("vlmsafe.steering", "vlmsafe.eval", "vlmsafe.merge", "vlmsafe.safeclip", "vlmsafe.convert",
                "vlmsafe.demo"):
        module = importlib.import_module(pkg)
        table = exports_of(pkg)
        assert sorted(module.__all__) == sorted(table), pkg
        for name in module.__all__:
            value = getattr(module, name)
            target, _, attr = table[name].partition(":")
            assert value is getattr(importlib.import_module(target), attr or name), (pkg, name)
        assert set(module.__all__) <= set(dir(module))
    import vlmsafe.eval

    assert not hasattr(vlmsafe.eval, "EvalItem")  # one name for the item: vlmsafe.data.Item (vlmsafe.eval.Item)


@pytest.mark.parametrize("all_line, problem", [
    ('__all__ = ["shout"]', "not in __all__: ['whisper']"),
    ('__all__ = ["shout", "whisper", "sing"]', "not importable: ['sing']"),
])
def test_lazy_exports_and_all_must_agree(tmp_path, monkeypatch, all_line, problem):
    """A package whose ``__all__`` and ``TYPE_CHECKING`` block disagree fails at import (an InternalError, a bug of
    the package), so a forgotten export cannot ship; when they agree each name loads on access, aliases included."""
    import importlib

    from vlmsafe.errors import InternalError, VlmsafeError

    pkg = tmp_path / "lazypkg"
    pkg.mkdir()
    (pkg / "words.py").write_text("def shout(): return 'HI'\ndef say(): return 'hi'\n")
    block = ("from typing import TYPE_CHECKING\nfrom vlmsafe._lazy import attach\nif TYPE_CHECKING:\n"
             "    from lazypkg.words import shout\n    from lazypkg.words import say as whisper\n")
    (pkg / "__init__.py").write_text(block + all_line + "\n__getattr__, __dir__ = attach(__name__)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("lazypkg", "lazypkg.words"):  # taken out again at the end of the test
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(InternalError, match=re.escape(problem)) as info:
        importlib.import_module("lazypkg")
    assert not isinstance(info.value, VlmsafeError)  # a bug: the CLI keeps its traceback
    (pkg / "__init__.py").write_text(block + '__all__ = ["shout", "whisper"]\n'
                                     "__getattr__, __dir__ = attach(__name__)\n")
    module = importlib.import_module("lazypkg")
    assert "lazypkg.words" not in sys.modules  # nothing loaded before a name is used
    assert module.shout() == "HI" and module.whisper() == "hi" and "whisper" in dir(module)

def test_import_vlmsafe_is_light_and_exposes_the_public_face():
    code = """
import sys

import pytest
import vlmsafe
assert "torch" not in sys.modules, "import vlmsafe loaded torch"
names = [n for n in vlmsafe.__all__ if n not in ("VlmsafeError", "__version__")]
assert len(names) >= 15, names
for name in names:
    assert getattr(vlmsafe, name) is not None, name
from vlmsafe import SafeVLM, ShiftVectors, calibrate, evaluate, load_model, merge_checkpoints
from vlmsafe.eval.evaluate import evaluate as ev
from vlmsafe.steering.safevlm import SafeVLM as S
assert evaluate is ev and SafeVLM is S
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
