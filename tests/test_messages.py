"""Library errors name Python parameters; the command line names its flags (issue 23, item 3).

A remedy raises "`out_dir` 'x' is a non-empty directory; pass `overwrite=True` ..." and the ``vlmsafe`` command
(or a ``python -m vlmsafe.cli.X`` script) prints the same error as "--out 'x' ...; pass --overwrite ...":
:func:`vlmsafe.cli.parsing.flags_for_parameters` translates, from the command's own parser. The first test keeps
``--flags`` out of the remedies' errors; the others check the same error read from both sides, word for word.
"""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import pytest

from vlmsafe.cli import flags_for_parameters, main
from vlmsafe.errors import InputError, OutputExistsError

ROOT = Path(__file__).resolve().parents[1]
#: The application above the library: its errors may name the command to run (e.g. a testbed's build script).
APPLICATION = ("vlmsafe/cli/", "vlmsafe/demo/", "vlmsafe/testbed/", "vlmsafe/experiments/", "vlmsafe/testing/")
#: Modules whose messages are being converted on another branch (empty: none).
PENDING: set[str] = set()
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
#: Strings of remedy modules that name flags on purpose: none is an error (``KEPT[path]``: a part of each string).
KEPT = {
    # model cards: the artefact's usage, in Python and on the command line
    "vlmsafe/steering/vectors.py": ("Or on the command line: `vlmsafe generate",
                                    "compare others with `vlmsafe evaluate"),
    "vlmsafe/steering/shiftdc/directions.py": ("or on the command line:",),
    "vlmsafe/safeclip/card.py": ("vlmsafe safeclip generate --pipeline",),
    # recorded in vectors.json and the card, and printed by `vlmsafe calibrate`, as the reason tuning was skipped
    "vlmsafe/steering/recommend.py": ("not tuned (--tune-share 0)", "held-out items at --tune-share"),
    # printed by `vlmsafe convert-llava` and recorded in the output's provenance
    "vlmsafe/convert/llava.py": ("--vision ",),
    # the README's support block (generated from this module): how every family loads, for command-line users
    "vlmsafe/adapters/support.py": ("in float32 unless `--dtype`",),
}
#: Keywords and dict keys whose string is a flag declaration or its --help text, not a message.
DECLARATIONS = {"flag", "flag_help", "help"}


def _strings(tree: ast.AST):
    """Every string literal of a module that is not a docstring, a flag declaration or --help text."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        declared = [k.value for k in getattr(node, "keywords", ()) if k.arg in DECLARATIONS]
        if isinstance(node, ast.Dict):
            declared += [v for k, v in zip(node.keys, node.values)
                         if isinstance(k, ast.Constant) and k.value in DECLARATIONS]
        skip.update(id(n) for d in declared for n in ast.walk(d))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def test_remedies_name_parameters_not_flags():
    """No string a library module builds a message from names a ``--flag`` (a Python caller never typed one):
    not in a ``raise``, an error helper's ``fix=``/``option=`` or a message kept in a variable. A message
    that sends the user to another command names it without flags: ``vlmsafe.convert.convert_llava (the
    `vlmsafe convert-llava` command)``. The application (demo, testbeds, experiments) may name its scripts."""
    found, kept = [], set()
    for path in sorted([*(ROOT / "vlmsafe").rglob("*.py"), *(ROOT / "probes").rglob("*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(APPLICATION) or rel in PENDING:
            continue
        for line, text in _strings(ast.parse(path.read_text(), filename=rel)):
            if not FLAG.search(text):
                continue
            allowed = [part for part in KEPT.get(rel, ()) if part in text]
            kept.update((rel, part) for part in allowed)
            if not allowed:
                found.append(f"{rel}:{line}: {FLAG.findall(text)} in {text[:80]!r}")
    assert not found, "library messages naming flags (name the parameter in backticks):\n" + "\n".join(found)
    assert kept == {(rel, part) for rel, parts in KEPT.items() for part in parts}, "a KEPT entry matches nothing"


def test_the_message_scan_sees_raises_helpers_and_fix_variables():
    """The scan above is not vacuous: it finds a flag in each place a message is built, and skips declarations."""
    source = '''
def check(path, option: str = "--out"):
    """Docstrings may say --anything."""
    fix = "pass --overwrite"
    problems.append("or --cast-dtype")
    raise InputError(f"{option} is taken; {fix}")
check_output(p, option="--json", inputs=(("--data", d),))
read_json(p, fix="re-run with --force")
lr: float = float_option(1e-3, "AdamW learning rate", flag="--lr")
mode: str = field(default=None, metadata={"help": "dataset (--vectors)"})
'''
    texts = [t for _, t in _strings(ast.parse(source)) if FLAG.search(t)]
    assert sorted(FLAG.findall(" ".join(texts))) == ["--cast-dtype", "--data", "--force", "--json", "--out",
                                                     "--overwrite"]


def test_settings_become_the_flags_that_set_them():
    parser = argparse.ArgumentParser()
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--no-hash", dest="hash_inputs", action="store_false")
    parser.add_argument("--modality", choices=("image", "text"))
    parser.add_argument("--blank-image", action="store_true")
    parser.set_defaults(parameter_flags={"out_dir": "--out", "image=blank_image()": "--blank-image"})
    message = ("pass `overwrite=True`, not `overwrite=False`; `hash_inputs=False`; `modality='text'`; "
               "`out_dir`; `image=blank_image()`; `steps=3`")
    assert flags_for_parameters(message, parser) == (
        "pass --overwrite, not `overwrite=False`; --no-hash; --modality text; --out; --blank-image; `steps=3`"
    )


# --------------------------------------------------------------------------- one error, read from both sides
def _cli_error(capsys, argv, prefix):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(prefix), err
    return err[len(prefix):]


def test_merge_option_reads_as_a_config_field_and_as_a_flag(capsys):
    from vlmsafe.merge import MergeConfig

    with pytest.raises(InputError) as info:
        MergeConfig.from_dict({})
    assert str(info.value) == ("merge config is missing ['vlm', 'aligned', 'output']; set them in the YAML or with "
                               "`vlm`/`aligned`/`output`.")
    assert _cli_error(capsys, ["merge"], "vlmsafe merge: error: ") == (
        "merge config is missing ['vlm', 'aligned', 'output']; set them in the YAML or with --vlm/--aligned/--out.")


def test_eval_parameter_reads_as_a_parameter_and_as_a_flag(tmp_path, capsys):
    from vlmsafe.eval.loaders import load_benchmark

    data = tmp_path / "items.jsonl"
    data.write_text('{"id": "1", "prompt": "hi", "label": "benign"}\n')
    with pytest.raises(InputError) as info:
        load_benchmark(data, image_types=["SD"])
    assert str(info.value) == (f"`image_types` applies to mm-safetybench data, but {data} is jsonl data; "
                               "remove `image_types`")
    argv = ["evaluate", "--model", str(ROOT / "assets" / "testbed"), "--data", str(data), "--out",
            str(tmp_path / "out"), "--image-types", "SD", "--no-progress"]
    assert _cli_error(capsys, argv, "vlmsafe evaluate: error: ") == (
        f"--image-types applies to mm-safetybench data, but {data} is jsonl data; remove --image-types")
    assert not (tmp_path / "out").exists()


def test_steering_setting_reads_as_a_field_and_as_a_flag(tmp_path, capsys):
    """Sample-level CMRM with ``decode``: ``SteeringConfig`` names its fields, ``vlmsafe generate`` its flags."""
    from vlmsafe.steering import SteeringConfig

    with pytest.raises(InputError) as info:
        SteeringConfig(mode="sample", decode=True)
    assert str(info.value) == ("sample-level steering cannot steer generated tokens (they have no text-only "
                               "counterpart); drop `decode=True`, or use dataset-level vectors (`vectors`) to steer "
                               "them")
    argv = ["generate", "--model", str(ROOT / "assets" / "testbed"), "--prompt", "hi", "--sample-level", "--decode"]
    assert _cli_error(capsys, argv, "vlmsafe generate: error: ") == (
        "sample-level steering cannot steer generated tokens (they have no text-only counterpart); drop --decode, "
        "or use dataset-level vectors (--vectors) to steer them")


def test_output_parameter_reads_as_a_parameter_and_as_the_scripts_flag(tmp_path, capsys):
    """A ``python -m vlmsafe.cli.X`` script translates like the ``vlmsafe`` command (``run_script``)."""
    from vlmsafe.cli.build_t2i_testbed import main as build_main
    from vlmsafe.testbed.t2i import build_t2i_testbed

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputExistsError) as info:
        build_t2i_testbed(out, clip_dir=ROOT / "assets" / "safeclip")
    assert str(info.value) == (f"`out_dir` {str(out)!r} is a non-empty directory; pass `overwrite=True` to replace "
                               "it, or choose another `out_dir` path")
    assert build_main(["--out", str(out), "--clip", str(ROOT / "assets" / "safeclip")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m vlmsafe.cli.build_t2i_testbed: error: --out {str(out)!r} is a non-empty directory; pass "
        "--overwrite to replace it, or choose another --out path")
    assert (out / "keep.txt").read_text() == "user data"


def test_compare_script_reports_a_taken_output_through_run_script(tmp_path, capsys):
    from vlmsafe.cli.compare import main as compare_main

    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert compare_main(["--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m vlmsafe.cli.compare: error: --out {str(out)!r} is a non-empty directory; pass --overwrite to "
        "replace it, or choose another --out path")


def test_a_warning_during_a_command_is_one_line_naming_the_command():
    """Python shows a warning in two lines (a source path, a line of vlmsafe's or PIL's code); during a command it
    is one line like its errors, with the flag for a parameter and the kind of a warning other than UserWarning.
    A subprocess: pytest records warnings instead of showing them."""
    import subprocess
    import sys

    code = """if True:
        import warnings
        from PIL import Image
        from vlmsafe.cli.parsing import ArgumentParser, flags_in_warnings
        parser = ArgumentParser(prog="vlmsafe safeclip")
        parser.add_argument("--max-length")
        original = warnings.formatwarning
        with flags_in_warnings(parser):
            warnings.warn("raise `max_length` to train on them\\n  (2 pairs)")
            warnings.warn("Image size (100 pixels) exceeds limit", Image.DecompressionBombWarning)
        assert warnings.formatwarning is original
        warnings.warn("after the command")
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    lines = proc.stderr.splitlines()
    assert proc.returncode == 0, proc.stderr
    assert lines[:2] == ["vlmsafe safeclip: warning: raise --max-length to train on them (2 pairs)",
                         "vlmsafe safeclip: warning: (DecompressionBombWarning) Image size (100 pixels) exceeds limit"]
    assert "UserWarning: after the command" in lines[2]  # Python's own display is back
