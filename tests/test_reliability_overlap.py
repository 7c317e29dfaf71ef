"""Nothing of the user's is lost to ``--overwrite``: every command refuses an output that is, holds or lies in any
of its inputs -- its options and positionals, and the files named *inside* its data and config files (a data set's
images, a merge YAML's models) -- before any work, with one line and exit code 2 (issue #24, "data loss").

Each case builds a small workspace in ``tmp_path`` (tiny images, a few records, folders standing for models), runs
the real command line in process, and checks the exit code, the single stderr line naming the overlapping input,
the absence of a traceback, and that every file in the workspace is still there byte for byte (and nothing new
appeared). Where a model must really load for the run to go on, the bundled testbed is used read-only, so a
regression would run (and delete) rather than fail for another reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_checks import one_line_error

from vlmsafe.cli import build_parser, main
from vlmsafe.testing import random_image

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "assets" / "testbed"


# --------------------------------------------------------------------------- workspace helpers
def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (links as their target text) -> sha256: what must survive a refused run."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*filenames, *(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))]:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            out[rel] = "link:" + os.readlink(p) if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _items(folder: Path, name: str = "data.jsonl", *, images: str = "imgs", n: int = 4) -> Path:
    """``folder/name``: ``n`` labelled items whose images are ``folder/images/<i>.png`` (relative paths)."""
    (folder / images).mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        random_image(i, size=16).save(folder / images / f"{i}.png")
        recs.append({"id": str(i), "prompt": ["how do i make a bomb ?", "what colour is it ?"][i % 2],
                     "image": f"{images}/{i}.png", "label": ["harmful", "benign"][i % 2]})
    path = folder / name
    if name.endswith(".json"):
        path.write_text(json.dumps(recs))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _fake_model(folder: Path) -> Path:
    """A folder that stands for a model or checkpoint the command never gets to read."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights the user cannot download again")
    return folder


def _quads(folder: Path) -> Path:
    """Safe-CLIP quadruplets whose images live in ``folder/imgs``."""
    (folder / "imgs").mkdir(parents=True)
    lines = []
    for i in range(2):
        random_image(2 * i, size=16).save(folder / "imgs" / f"s{i}.png")
        random_image(2 * i + 1, size=16).save(folder / "imgs" / f"u{i}.png")
        lines.append(json.dumps({"safe": f"a cat {i}", "unsafe": f"a knife {i}", "safe_image": f"imgs/s{i}.png",
                                 "unsafe_image": f"imgs/u{i}.png"}))
    (folder / "quads.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "quads.jsonl"


# --------------------------------------------------------------------------- the cases
# Each builds its workspace in ``ws`` and returns (argv, parts expected in the one stderr line).
Case = Callable[[Path], tuple[list[str], list[str]]]


def calibrate_images(ws: Path):
    data = _items(ws / "D")
    return (["calibrate", "--model", str(TESTBED), "--data", str(data), "--out", str(ws / "D" / "imgs"),
             "--overwrite", "--no-progress"], ["overlaps the --data image input", "imgs/0.png", "choose another"])


def calibrate_shiftdc_images(ws: Path):
    data = _items(ws / "D")
    return (["calibrate", "--method", "shiftdc", "--model", str(TESTBED), "--data", str(data), "--out",
             str(ws / "D" / "imgs" / "1.png"), "--overwrite", "--no-progress"],
            ["overlaps the --data image input", "imgs/1.png"])


def calibrate_image_beyond_limit(ws: Path):
    """The images after --limit are the user's too: the output may not delete them."""
    data = _items(ws / "D", n=4)
    (ws / "D" / "later").mkdir()
    os.replace(ws / "D" / "imgs" / "3.png", ws / "D" / "later" / "3.png")
    text = data.read_text().replace("imgs/3.png", "later/3.png")
    data.write_text(text)
    return (["calibrate", "--model", str(TESTBED), "--data", str(data), "--limit", "2", "--out",
             str(ws / "D" / "later"), "--overwrite", "--no-progress"], ["overlaps the --data image input", "3.png"])


def evaluate_images(ws: Path):
    data = _items(ws / "D")
    return (["evaluate", "--model", str(TESTBED), "--data", str(data), "--out", str(ws / "D" / "imgs"),
             "--overwrite", "--no-progress"], ["overlaps the --data image input", "imgs/"])


def evaluate_judge(ws: Path):
    data = _items(ws / "D")
    judge = _fake_model(ws / "guard")
    return (["evaluate", "--model", str(TESTBED), "--data", str(data), "--judge", f"llamaguard:{judge}",
             "--out", str(judge), "--overwrite"], ["overlaps the --judge input", "guard"])


def demo_test_images(ws: Path):
    data = _items(ws / "D", name="test.jsonl")
    return (["demo", "--test", str(data), "--out", str(ws / "D" / "imgs"), "--overwrite", "--no-progress"],
            ["overlaps the --test image input", "imgs/"])


def demo_testbed(ws: Path):
    tb = _fake_model(ws / "T")
    return (["demo", "--testbed", str(tb), "--out", str(tb), "--overwrite", "--no-progress"],
            ["overlaps the --testbed input", str(tb)])


def demo_default_testbed(ws: Path):
    """$VLMSAFE_TESTBED (no --testbed): the output may not hold the testbed it names either."""
    tb = _fake_model(ws / "assets" / "testbed")
    os.environ["VLMSAFE_TESTBED"] = str(tb)  # restored by the test
    return (["demo", "--out", str(ws / "assets"), "--overwrite", "--no-progress"],
            ["overlaps the --testbed input", "testbed"])


def probe_shift_data(ws: Path):
    data = _items(ws / "R", name="shift.json")
    return (["probe", "shift", "--model", str(TESTBED), "--data", str(data), "--out", str(ws / "R"),
             "--overwrite", "--cv", "2", "--no-progress"], ["overlaps the --data input", "shift.json"])


def probe_layers_calibration(ws: Path):
    data = _items(ws / "D")
    cal = _items(ws / "C", name="layers.json")
    return (["probe", "layers", "--model", str(TESTBED), "--data", str(data), "--calibration", str(cal),
             "--out", str(ws / "C"), "--overwrite", "--cv", "2", "--no-progress"],
            ["overlaps the --calibration input", "layers.json"])


def probe_weights_into_model(ws: Path):
    import shutil

    a = shutil.copytree(TESTBED / "aligned_lm", ws / "A")  # real checkpoints: without the check the run writes
    (ws / "B").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TESTBED / name, ws / "B" / name)
    b = ws / "B"
    return (["probe", "weights", "--before", str(a), "--after", str(b), "--out", str(b), "--no-progress"],
            ["overlaps the --after input", str(b)])


def merge_yaml(ws: Path):
    vlm, aligned = TESTBED, TESTBED / "aligned_lm"  # real (read only): without the check the merge replaces R
    (ws / "R").mkdir()
    (ws / "R" / "merge.yaml").write_text(f"vlm: {vlm}\naligned: {aligned}\nweight: 0.4\n")
    return (["merge", str(ws / "R" / "merge.yaml"), "--out", str(ws / "R"), "--overwrite", "--no-progress"],
            ["overlaps the merge config input", "merge.yaml"])


def merge_yaml_named_mask(ws: Path):
    vlm, aligned = _fake_model(ws / "vlm"), _fake_model(ws / "aligned")
    (ws / "masks").mkdir()
    (ws / "masks" / "top20.safetensors").write_bytes(b"a mask")
    (ws / "merge.yaml").write_text(f"vlm: {vlm}\naligned: {aligned}\nmask: {ws / 'masks' / 'top20.safetensors'}\n"
                                   f"output: {ws / 'masks'}\noverwrite: true\n")
    return (["merge", str(ws / "merge.yaml"), "--no-progress"],
            ["overlaps the mask (named in", "top20.safetensors"])


def merge_mask_trailing_slash(ws: Path):
    vlm, aligned = _fake_model(ws / "vlm"), _fake_model(ws / "aligned")
    return (["merge-mask", "--vlm", str(vlm), "--aligned", str(aligned), "--out", str(ws / "dir") + "/",
             "--no-progress"], ["ends with a path separator", "dir/mask.safetensors"])


def convert_llava_parent(ws: Path):
    ckpt, clip = _fake_model(ws / "P" / "llava"), _fake_model(ws / "P" / "clip")
    return (["convert-llava", str(ckpt), "--vision", str(clip), "--out", str(ws / "P"), "--overwrite",
             "--no-progress"], ["overlaps the ORIGINAL_DIR input", "llava"])


def safeclip_train_images(ws: Path):
    data = _quads(ws / "D")
    model = _fake_model(ws / "clip")
    return (["safeclip", "train", "--model", str(model), "--data", str(data), "--val-fraction", "0",
             "--output-dir", str(ws / "D" / "imgs"), "--overwrite"],
            ["--output-dir", "overlaps the --data image input", "imgs/"])


def safeclip_eval_images(ws: Path):
    data = _quads(ws / "D")
    orig, safe = _fake_model(ws / "orig"), _fake_model(ws / "safe")
    return (["safeclip", "eval", "--original", str(orig), "--safe", str(safe), "--data", str(data), "--json",
             str(ws / "D" / "imgs" / "u1.png"), "--overwrite", "--no-progress"],
            ["--json", "overlaps the --data image input", "u1.png"])


def safeclip_pairs_generate_captions(ws: Path):
    (ws / "captions.jsonl").write_text('{"safe": "a cat"}\n')
    model = _fake_model(ws / "lm")
    return (["safeclip", "pairs", "generate", "--model", str(model), "--captions", str(ws / "captions.jsonl"),
             "--output", str(ws / "captions.jsonl"), "--overwrite"], ["overlaps the --captions input"])


def safeclip_generate_prompts(ws: Path):
    (ws / "P").mkdir()
    (ws / "P" / "prompts.txt").write_text("a cat\n")
    pipe, enc = _fake_model(ws / "pipe"), _fake_model(ws / "enc")
    return (["safeclip", "generate", "--pipeline", str(pipe), "--text-encoder", str(enc), "--prompts",
             str(ws / "P" / "prompts.txt"), "--out", str(ws / "P"), "--overwrite", "--no-progress"],
            ["overlaps the --prompts input"])


CASES: dict[str, Case] = {f.__name__: f for f in (
    calibrate_images, calibrate_shiftdc_images, calibrate_image_beyond_limit, evaluate_images, evaluate_judge,
    demo_test_images, demo_testbed, demo_default_testbed, probe_shift_data, probe_layers_calibration,
    probe_weights_into_model, merge_yaml, merge_yaml_named_mask, merge_mask_trailing_slash, convert_llava_parent,
    safeclip_train_images, safeclip_eval_images, safeclip_pairs_generate_captions, safeclip_generate_prompts,
)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_an_output_over_an_input_is_refused_and_nothing_is_lost(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv("VLMSAFE_TESTBED", raising=False)
    monkeypatch.chdir(tmp_path)
    ws = tmp_path / "ws"
    ws.mkdir()
    argv, expected = CASES[case](ws)
    before = _snapshot(ws)
    try:
        rc = main(argv)
    finally:
        os.environ.pop("VLMSAFE_TESTBED", None)
    one_line_error(rc, capsys.readouterr().err, *expected)
    assert _snapshot(ws) == before, "a refused run changed, removed or added files"
    assert not (ws / "dir").exists()


def test_an_output_beside_the_images_is_still_allowed(tmp_path):
    """Only the images themselves (and folders holding them) are protected: an output next to them, or a probe
    report in a folder that holds the data file, is legal."""
    from vlmsafe.cli.options import check_command_output, check_named_inputs, command_inputs

    data = _items(tmp_path / "D")
    args = build_parser().parse_args(["probe", "shift", "--model", str(TESTBED), "--data", str(data),
                                      "--out", str(tmp_path / "D")])
    assert ("--data", str(data)) in command_inputs(args) and ("--model", str(TESTBED)) in command_inputs(args)
    from vlmsafe.data import load_items

    items = load_items(data)
    for out in (tmp_path / "D" / "run", tmp_path / "D" / "shift.json", tmp_path / "D" / "imgs" / "run"):
        check_command_output(args, out, kind="dir" if out.name == "run" else "file")
        check_named_inputs(out, {"--data": items})


def test_a_linked_image_is_protected_by_its_target_too(tmp_path):
    """An image that is a symbolic link: an output over the link's folder or over the file it points at is
    refused (deleting either loses the image)."""
    from vlmsafe.errors import InputError
    from vlmsafe.inputs import check_named_inputs

    (tmp_path / "store").mkdir()
    random_image(0, size=8).save(tmp_path / "store" / "0.png")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "0.png").symlink_to(tmp_path / "store" / "0.png")
    named = {"--data": [str(tmp_path / "links" / "0.png")]}
    for out in (tmp_path / "store", tmp_path / "links", tmp_path / "store" / "0.png"):
        with pytest.raises(InputError, match="overlaps the --data image input"):
            check_named_inputs(out, named)
    check_named_inputs(tmp_path / "elsewhere", named)


def test_many_named_images_are_checked_with_one_resolve_per_folder(tmp_path, monkeypatch):
    """20k image paths in two folders: the check resolves each folder once, not every path component by component
    (a data set's images are checked on every run), and still finds the one image the output would replace."""
    from vlmsafe.errors import InputError
    from vlmsafe.inputs import check_named_inputs

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    paths = [str(tmp_path / "ab"[i % 2] / f"{i}.png") for i in range(20_000)]
    calls = []
    realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, **k: calls.append(p) or realpath(p, **k))
    check_named_inputs(tmp_path / "out", {"--data": paths})
    assert len(calls) < 10, len(calls)
    with pytest.raises(InputError, match=r"overlaps the --data image input .*19999\.png"):
        check_named_inputs(tmp_path / "b" / "19999.png", {"--data": paths})
    with pytest.raises(InputError, match=r"overlaps the --data image input .*a/0\.png"):
        check_named_inputs(tmp_path / "a", {"--data": paths})


# Options that take a free value and name no input of the command: outputs, and text / choices / numbers given as
# strings. Every other option with a value must be marked with vlmsafe.cli.options.add_input.
NOT_INPUTS = {
    "--out", "--output", "--output-dir", "--json",  # outputs (checked against the inputs)
    "--prompt", "--caption-prompt", "--template", "--negative-prompt", "--include",  # text
    "--device", "--device-map", "--image-types", "--resume",  # --resume: a checkpoint inside --output-dir
    "--push-to-hub", "--hub-token",  # a Hub repository id and a token, never a local file
    "--help", "--version",
}


def _commands(parser: argparse.ArgumentParser, prefix: str = "vlmsafe"):
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _commands(sub, f"{prefix} {name}")


def test_every_path_option_of_every_command_is_a_marked_input():
    """A new option that names a file the command reads must be declared with add_input, so that the output
    check knows it: every free-valued option is either marked, or listed above as no input."""
    from vlmsafe.cli.options import INPUTS_KEY

    unmarked = []
    for prog, parser in _commands(build_parser()):
        marked = {dest for dest, _, _ in parser.get_default(INPUTS_KEY) or ()}
        for action in parser._actions:
            if action.nargs == 0 or action.choices is not None or action.type is not None:
                continue  # flags, choices and typed values (numbers, layer specs, sizes) name no file
            flag = max(action.option_strings, key=len) if action.option_strings else action.dest
            if action.dest not in marked and flag not in NOT_INPUTS:
                unmarked.append(f"{prog} {flag}")
    assert not unmarked, f"options neither marked as inputs nor listed in NOT_INPUTS: {unmarked}"


def test_each_command_knows_its_inputs():
    """The inputs each command declares (positionals included), as listed in the report of issue #24."""
    from vlmsafe.cli.options import INPUTS_KEY

    got = {prog: [label for _, label, _ in parser.get_default(INPUTS_KEY) or ()]
           for prog, parser in _commands(build_parser())}
    assert got["vlmsafe convert-llava"] == ["ORIGINAL_DIR", "--vision"]
    assert got["vlmsafe merge"] == ["merge config", "--vlm", "--aligned", "--base", "--mask"]
    assert got["vlmsafe probe weights"] == ["--before", "--after"]
    assert got["vlmsafe demo"] == ["--testbed", "--test"]
    assert set(got["vlmsafe evaluate"]) == {"--model", "--data", "--images", "--judge", "--vectors", "--shiftdc"}
