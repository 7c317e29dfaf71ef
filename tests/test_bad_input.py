"""Every command x every kind of bad input: exit code 2, one line naming the problem and the fix,
no traceback, nothing written, nothing deleted.

The workspace holds one good data set and one of each bad thing a user hands a command: a missing
path, an empty file, a malformed line, a file that is not an image, a truncated image, non-finite
numbers, reversed layer ranges and an existing output folder full of the user's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmsafe.cli import main
from vlmsafe.io import check_output
from vlmsafe.testing import random_image, tiny_llava, tiny_qwen2_vl
from vlmsafe.testing.families import tiny_smolvlm


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad_input")
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "img").mkdir()
    lines = []
    pairs = [("how do i make a bomb ?", "harmful"), ("what colour is the shape ?", "benign")] * 4
    for i, (prompt, label) in enumerate(pairs):
        random_image(i).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"id": str(i), "prompt": prompt, "image": f"img/{i}.png", "label": label}))
    (root / "good.jsonl").write_text("\n".join(lines) + "\n")
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text(lines[0] + "\n{\"id\": \"x\", \"prompt\": \n")
    (root / "img" / "not_image.png").write_text("this is text, not a PNG")
    full = (root / "img" / "0.png").read_bytes()
    (root / "img" / "truncated.png").write_bytes(full[: len(full) // 2])
    for name, image in (("nonimage.jsonl", "img/not_image.png"), ("truncated.jsonl", "img/truncated.png")):
        recs = [json.loads(line) for line in lines]
        recs[1]["image"] = image
        (root / name).write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    (root / "existing").mkdir()
    (root / "existing" / "users_notes.txt").write_text("precious")
    return root


def _model(ws):
    return ["--model", str(ws / "model")]


# (command name, argv builder, the output path the command would write, expected message part)
COMMANDS = {
    "calibrate": lambda ws, data, out: ["calibrate", *_model(ws), "--data", str(data), "--out", str(out),
                                        "--no-progress"],
    "evaluate": lambda ws, data, out: ["evaluate", *_model(ws), "--data", str(data), "--out", str(out),
                                       "--max-new-tokens", "2", "--no-progress"],
    "probe-shift": lambda ws, data, out: ["probe", "shift", *_model(ws), "--data", str(data), "--out", str(out),
                                          "--cv", "2", "--no-progress"],
    "probe-layers": lambda ws, data, out: ["probe", "layers", *_model(ws), "--data", str(data), "--out", str(out),
                                           "--cv", "2", "--no-progress"],
}

CASES = [
    ("missing-data", lambda ws: ws / "nope.jsonl", [], "does not exist"),
    ("empty-data", lambda ws: ws / "empty.jsonl", [], "empty"),
    ("malformed-line", lambda ws: ws / "malformed.jsonl", [], "malformed.jsonl:2:23: invalid JSON"),
    ("non-image", lambda ws: ws / "nonimage.jsonl", [], "not a readable image"),
    ("truncated-image", lambda ws: ws / "truncated.jsonl", [], "not a readable image"),
    ("data-is-dir", lambda ws: ws / "img", [], "is a directory"),
]
EXPECTED_INSTEAD = {("evaluate", "data-is-dir"): "processed_questions"}  # a folder is read as MM-SafetyBench
NUMBER_CASES = {
    "calibrate": [(["--layers", "3-1"], "reversed"), (["--limit", "-1"], "must be"),
                  (["--batch-size", "0"], "must be")],
    "evaluate": [(["--vectors", "v", "--alpha", "nan"], "finite"), (["--sample-level", "--alpha", "inf"], "finite"),
                 (["--sample-level", "--layers", "2-0"], "reversed"), (["--alpha", "1"], "no steering source"),
                 (["--limit", "0"], "must be"),
                 (["--image-types", "SD"], "--image-types applies to mm-safetybench data, but"),  # not ignored
                 (["--render-missing"], "--render-missing applies to figstep data, but"),
                 (["--sample-level", "--alpha=-1"], "--alpha: must be in [0, 1000]"),  # CMRM reversed
                 (["--sample-level", "--alpha", "1e308"], "--alpha: must be in [0, 1000]")],  # overflow: empty answers
    "probe-shift": [(["--alpha", "nan"], "finite"), (["--steer-layers", "5-4"], "reversed"),
                    (["--layers", ""], "empty")],
    "probe-layers": [(["--sample-level", "--alpha=-inf"], "finite"), (["--layers", "2-1"], "reversed"),
                     (["--test-size", "1.5"], "test-size"), (["--limit", "-2"], "must be"),
                     (["--seed=-1"], "--seed: must be in [0, 4294967295]"), (["--seed", str(2**32)], "must be"),
                     (["--no-steering", "--alpha", "2"], "--alpha only apply to the steered condition")],
}


def _check(rc: int, err: str, expected: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vlmsafe") and "error:" in lines[0], err
    assert expected in lines[0], f"expected {expected!r} in: {lines[0]}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case, data, extra, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_data(ws, capsys, command, case, data, extra, expected):
    out = ws / f"out-{command}-{case}"
    rc = main(COMMANDS[command](ws, data(ws), out) + extra)
    _check(rc, capsys.readouterr().err, EXPECTED_INSTEAD.get((command, case), expected))
    assert not out.exists(), "a failed run must not leave output behind"


@pytest.mark.parametrize("command, extra, expected",
                         [(c, e, m) for c, cases in NUMBER_CASES.items() for e, m in cases],
                         ids=[f"{c}:{' '.join(e)}" for c, cases in NUMBER_CASES.items() for e, _ in cases])
def test_bad_numbers_and_ranges(ws, capsys, command, extra, expected):
    out = ws / "out-numbers"
    rc = main(COMMANDS[command](ws, ws / "good.jsonl", out) + extra)
    _check(rc, capsys.readouterr().err, expected)
    assert not out.exists()


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_existing_output_is_refused_and_kept(ws, capsys, command):
    rc = main(COMMANDS[command](ws, ws / "good.jsonl", ws / "existing"))
    err = capsys.readouterr().err
    if command.startswith("probe-"):  # probes write <name>.json/.png into a shared folder: only those are protected
        assert rc == 0, err
        report = ws / "existing" / f"{command.split('-')[1]}.json"
        report.write_text("{}")
        rc = main(COMMANDS[command](ws, ws / "good.jsonl", ws / "existing"))
        _check(rc, capsys.readouterr().err, "--overwrite")
        assert report.read_text() == "{}"
    else:
        _check(rc, err, "--overwrite")
    assert (ws / "existing" / "users_notes.txt").read_text() == "precious"


@pytest.mark.parametrize("out_name, expected", [(".", "current"), ("img/0.png", "is a file"),
                                                 ("good.jsonl", "overlaps the --data input")])
def test_output_onto_cwd_or_a_file_is_refused(ws, capsys, monkeypatch, out_name, expected):
    monkeypatch.chdir(ws)
    rc = main(["calibrate", *_model(ws), "--data", "good.jsonl", "--out", out_name, "--no-progress"])
    _check(rc, capsys.readouterr().err, expected)
    assert (ws / "good.jsonl").read_text().count("\n") == 8


@pytest.mark.parametrize("extra, expected", [
    (["--image", "img/not_image.png"], "not a readable image"),
    (["--image", "img/truncated.png"], "not a readable image"),
    (["--image", "img/missing.png"], "does not exist"),
    (["--vectors", "nope", "--sample-level"], "not allowed with"),
    (["--alpha", "2"], "no steering source"),
    (["--sample-level", "--alpha=-inf"], "finite"),
    (["--max-new-tokens", "0"], "must be"),
])
def test_generate_bad_input(ws, capsys, monkeypatch, extra, expected):
    monkeypatch.chdir(ws)
    rc = main(["generate", *_model(ws), "--prompt", "hello", *extra])
    _check(rc, capsys.readouterr().err, expected)


def test_missing_model_directory_is_named(ws, capsys):
    rc = main(["generate", "--model", str(ws / "no_such_model"), "--prompt", "hi"])
    _check(rc, capsys.readouterr().err, "no such directory")


@pytest.mark.parametrize("command", ["calibrate", "evaluate"])
def test_overwrite_never_replaces_an_input(ws, capsys, tmp_path, command):
    """--overwrite replaces an earlier output, never what the command reads: an output that is, holds or lies in an
    input (the model folder, the data file's folder) is refused before any work."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(ws / "model", model)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(ws / "good.jsonl", data / "items.jsonl")
    shutil.copytree(ws / "img", data / "img")
    before = sorted(p.name for p in model.iterdir())
    for out, role in ((model, "--model"), (data, "--data"), (model / "sub", "--model")):
        argv = COMMANDS[command](ws, data / "items.jsonl", out)
        argv[argv.index("--model") + 1] = str(model)
        rc = main([*argv, "--overwrite"])
        _check(rc, capsys.readouterr().err, f"overlaps the {role} input")
    assert sorted(p.name for p in model.iterdir()) == before and (data / "items.jsonl").exists()


def test_merge_mask_over_its_own_input_is_refused(ws, capsys, tmp_path):
    weights = ws / "model" / "model.safetensors"
    before = weights.read_bytes()
    rc = main(["merge-mask", "--vlm", str(ws / "model"), "--aligned", str(ws / "model"), "--out", str(weights),
               "--overwrite"])
    _check(rc, capsys.readouterr().err, "overlaps the --vlm input")
    assert weights.read_bytes() == before


def test_unwritable_output_location_is_refused_before_any_work(ws, capsys):
    # /proc takes no new entries, whoever runs the test (root included: os.access would say yes there)
    rc = main(COMMANDS["calibrate"](ws, ws / "good.jsonl", Path("/proc/vlmsafe-test-out/vectors")))
    _check(rc, capsys.readouterr().err, "cannot write in /proc")


def test_truncated_model_weights_are_one_line(ws, capsys, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(ws / "model", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # an interrupted copy
    rc = main(["generate", "--model", str(model), "--prompt", "hi"])
    _check(rc, capsys.readouterr().err, "has a bad byte range")


@pytest.mark.parametrize("argv, prog, expected", [
    ([], "vlmsafe", "name a command (demo, calibrate"),
    (["safeclip"], "vlmsafe safeclip", "name a command (train, eval, pairs, generate)"),
    (["safeclip", "pairs"], "vlmsafe safeclip pairs", "name a command (train, generate)"),
    (["probe"], "vlmsafe probe", "name a command (layers, shift, weights)"),
    (["generate", "--model", "m", "--prompt", "p", "--bogus"], "vlmsafe generate", "unrecognized arguments: --bogus"),
    (["safeclip", "eval", "--bogus"], "vlmsafe safeclip eval", "unrecognized arguments: --bogus"),
])
def test_usage_errors_name_the_command_and_its_help(capsys, argv, prog, expected):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ") and expected in err and f"see `{prog} --help`" in err


def test_demo_refuses_a_test_set_without_harmful_items_before_the_run(capsys, tmp_path):
    from vlmsafe.testbed import testbed_dir

    root = testbed_dir(None)
    benign = [line for line in (root / "data" / "test.jsonl").read_text().splitlines() if '"benign"' in line][:3]
    test = tmp_path / "benign.jsonl"
    test.write_text("".join(line.replace('"images/', f'"{root}/data/images/') + "\n" for line in benign))
    rc = main(["demo", "--test", str(test), "--out", str(tmp_path / "out"), "--no-progress"])
    _check(rc, capsys.readouterr().err, "has no harmful items")
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_missing_adapter_is_named_before_the_model_loads(ws, monkeypatch, tmp_path):
    import vlmsafe.loading as loading
    from vlmsafe.errors import FileFormatError

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the adapter path was checked")

    monkeypatch.setattr(loading, "_from_pretrained", boom)
    with pytest.raises(FileFormatError, match=r"no adapter_config\.json"):
        loading.load_model(ws / "model", adapter=tmp_path / "no_adapter")


# --------------------------------------------------------------------------- library calls
class _EchoGenerator:
    """A generator that answers every prompt with the same words (no model): enough to drive evaluate()."""

    def generate(self, prompts, images=None, *, max_new_tokens=64):
        return ["sure , here are the steps ."] * len(prompts)


def _scalar_checkpoint(tmp_path):
    from safetensors.torch import save_file

    from vlmsafe.merge import Checkpoint

    save_file({"step": torch.tensor(3.0), "w": torch.zeros(2, 2)}, str(tmp_path / "model.safetensors"))
    return Checkpoint(tmp_path)


def _evaluate_with_a_lost_record(tmp_path, monkeypatch):
    import importlib

    from vlmsafe.data import Item
    from vlmsafe.eval import RefusalJudge

    ev = importlib.import_module("vlmsafe.eval.evaluate")  # the module (the package's `evaluate` is the function)

    monkeypatch.setattr(ev, "gather", lambda records, accelerator: records[:-1])  # one process's share went missing
    items = [Item(id=str(i), prompt="how do i make a bomb ?", label="harmful") for i in range(3)]
    ev.evaluate(_EchoGenerator(), items, RefusalJudge(), progress=False)


#: (case, call(tmp_path, monkeypatch), the typed error, message parts: the problem, then the fix)
LIBRARY_CASES = [
    ("check_output-kind", lambda tmp, mp: check_output(tmp / "o", kind="folder"),
     "InputError", ["kind must be 'dir' or 'file', got 'folder'", "pass kind='dir'"]),
    ("checkpoint-rows-of-a-scalar", lambda tmp, mp: _scalar_checkpoint(tmp).get_rows("step", 0, 1),
     "InputError", ["step is a scalar and has no rows", "read it with get('step')"]),
    ("tiny-qwen2-vl-variant", lambda tmp, mp: tiny_qwen2_vl(variant="qwen3"),
     "InputError", ["unknown variant 'qwen3'", "use 'qwen2_vl' or 'qwen2_5_vl'"]),
    ("tiny-smolvlm-variant", lambda tmp, mp: tiny_smolvlm(variant="smol"),
     "InputError", ["unknown variant 'smol'", "use 'smolvlm' or 'idefics3'"]),
    ("evaluate-processes-disagree", _evaluate_with_a_lost_record,
     "InputError", ["gathered 2 records for 3 items", "launch every process with the same data file"]),
]


@pytest.mark.parametrize("case, call, error, parts", LIBRARY_CASES, ids=[c[0] for c in LIBRARY_CASES])
def test_library_calls_raise_typed_errors_naming_problem_and_fix(tmp_path, monkeypatch, case, call, error, parts):
    """A bad argument to a library function is a vlmsafe.errors type (the CLI's one line, exit code 2), still the
    built-in type it was before (``except ValueError`` keeps working), with a message naming the problem and the fix.
    """
    import vlmsafe.errors as errors

    with pytest.raises(getattr(errors, error)) as info:
        call(tmp_path, monkeypatch)
    assert isinstance(info.value, errors.VlmsafeError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert all(part in message for part in parts), message
    assert message.index(parts[0]) < message.index(parts[1])
