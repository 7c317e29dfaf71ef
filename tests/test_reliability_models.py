"""Hostile and mistaken model folders and weight files (issue #24): every reader refuses them before the
work with exit code 2 and one stderr line naming the problem and the fix, no traceback, nothing written,
and no code from a model folder ever runs -- not even when a terminal answers "y".

Every case starts from a copy of the bundled testbed (``assets/testbed``) changed in one way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlmsafe.cli import main
from vlmsafe.errors import FileFormatError, IncompatibleVectorsError
from vlmsafe.weights import fingerprint, read_safetensors_header

ROOT = Path(__file__).resolve().parents[1]
TESTBED = ROOT / "assets" / "testbed"
REFUSAL = "vlmsafe never runs code from a model folder"


def _copy_testbed(dest: Path) -> Path:
    shutil.copytree(TESTBED, dest, ignore=shutil.ignore_patterns("data", "aligned_lm", "build_info.json", "README.md"))
    return dest


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace of model folders, each the testbed with one thing wrong."""
    root = tmp_path_factory.mktemp("rel_models")
    good = _copy_testbed(root / "testbed")
    shutil.copytree(TESTBED / "aligned_lm", root / "aligned")
    shutil.copytree(good, root / "testbed_copy")

    # auto_map pointing at a Python file that would leave a marker if it ever ran; an unknown
    # model_type, so transformers has no built-in class and would ask [y/N] on a terminal.
    evil = _copy_testbed(root / "automap")
    cfg = json.loads((evil / "config.json").read_text())
    cfg.update(model_type="evil_llava", auto_map={"AutoConfig": "evil.EvilConfig",
                                                  "AutoModelForImageTextToText": "evil.EvilModel"})
    (evil / "config.json").write_text(json.dumps(cfg))
    (evil / "evil.py").write_text(f"import pathlib\npathlib.Path({str(root / 'MARKER')!r}).write_text('ran')\n")
    tok = _copy_testbed(root / "automap_tokenizer")  # a known architecture; only the tokenizer points at code
    tcfg = json.loads((tok / "tokenizer_config.json").read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (tok / "tokenizer_config.json").write_text(json.dumps(tcfg))
    shutil.copy(evil / "evil.py", tok / "evil.py")

    # Two tensors of one shape whose data_offsets point at the same bytes.
    overlap = _copy_testbed(root / "overlap")
    raw = (overlap / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["language_model.lm_head.weight"]["data_offsets"] = header["language_model.model.embed_tokens.weight"][
        "data_offsets"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (overlap / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])

    # A tensor whose shape is not the one config.json implies.
    shape = _copy_testbed(root / "shape")
    sd = load_file(str(shape / "model.safetensors"))
    sd["language_model.model.layers.0.self_attn.q_proj.weight"] = sd[
        "language_model.model.layers.0.self_attn.q_proj.weight"][:-8].contiguous()
    save_file(sd, str(shape / "model.safetensors"), metadata={"format": "pt"})

    # A pickle checkpoint whose unpickling would run a command.
    pickled = _copy_testbed(root / "pickle")
    sd = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    sd["evil"] = _Evil(str(root / "MARKER"))
    torch.save(sd, str(pickled / "pytorch_model.bin"))
    return root


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _check(rc: int, err: str, expected: str) -> str:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vlmsafe") and "error:" in lines[0], err
    assert expected in lines[0], f"expected {expected!r} in: {lines[0]}"
    return lines[0]


def _generate(model: Path | str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "hi", "--max-new-tokens", "2"]


# (case id, argv builder (ws, out), expected part of the one line)
CASES = [
    ("generate-auto_map", lambda ws, out: _generate(ws / "automap"), REFUSAL),
    ("generate-auto_map-in-tokenizer_config", lambda ws, out: _generate(ws / "automap_tokenizer"),
     "tokenizer_config.json has `auto_map`"),
    ("calibrate-auto_map", lambda ws, out: ["calibrate", "--model", str(ws / "automap"), "--data",
                                            str(TESTBED / "data" / "calibration.jsonl"), "--out", str(out)], REFUSAL),
    ("convert-llava-auto_map", lambda ws, out: ["convert-llava", str(ws / "automap_tokenizer"), "--vision",
                                                str(ws / "testbed"), "--out", str(out)], REFUSAL),
    ("generate-overlapping-offsets", lambda ws, out: _generate(ws / "overlap"),
     "tensors language_model.lm_head.weight and language_model.model.embed_tokens.weight overlap"),
    ("merge-overlapping-offsets", lambda ws, out: ["merge", "--vlm", str(ws / "overlap"), "--aligned",
                                                   str(ws / "aligned"), "--out", str(out), "--no-progress"],
     "tensors language_model.lm_head.weight and language_model.model.embed_tokens.weight overlap"),
    ("merge-mask-overlapping-offsets", lambda ws, out: ["merge-mask", "--vlm", str(ws / "overlap"), "--aligned",
                                                        str(ws / "aligned"), "--out", str(out), "--no-progress"],
     "overlap (their data_offsets share bytes"),
    ("probe-weights-overlapping-offsets", lambda ws, out: ["probe", "weights", "--before", str(ws / "aligned"),
                                                           "--after", str(ws / "overlap"), "--out", str(out),
                                                           "--no-progress"],
     "overlap (their data_offsets share bytes"),
    ("generate-shape-vs-config", lambda ws, out: _generate(ws / "shape"),
     "tensor language_model.model.layers.0.self_attn.q_proj.weight has shape [88, 96] in the weights but "
     "config.json implies [96, 96]; the weights and config.json are of "
     "different models"),
    ("generate-pickle-bin", lambda ws, out: _generate(ws / "pickle"),
     "holds pytorch_model.bin but no model.safetensors; vlmsafe loads safetensors only"),
    ("generate-mistyped-local-folder", lambda ws, out: _generate(ws / "testbd"), "testbd: no such directory (did you "
                                                                                 "mean"),
    ("generate-mistyped-relative-folder", lambda ws, out: _generate(os.path.relpath(ws / "testbd")),
     "no such directory"),
    ("generate-hub-id-offline", lambda ws, out: _generate("no-such-org/no-such-model"),
     "not a model in the Hugging Face cache (offline mode is on)"),
    ("merge-same-folder", lambda ws, out: ["merge", "--vlm", str(ws / "testbed"), "--aligned", str(ws / "testbed"),
                                           "--out", str(out), "--no-progress"], "are the same model"),
    ("merge-same-weights", lambda ws, out: ["merge", "--vlm", str(ws / "testbed"), "--aligned",
                                            str(ws / "testbed_copy"), "--out", str(out), "--no-progress"],
     "are the same model (same weights), so the merge would change nothing"),
    ("merge-swapped", lambda ws, out: ["merge", "--vlm", str(ws / "aligned"), "--aligned", str(ws / "testbed"),
                                       "--out", str(out), "--no-progress"],
     "--vlm and --aligned look swapped"),
    ("merge-mask-swapped", lambda ws, out: ["merge-mask", "--vlm", str(ws / "aligned"), "--aligned",
                                            str(ws / "testbed"), "--out", str(out), "--no-progress"],
     "--vlm and --aligned look swapped"),
    ("merge-mask-same-folder", lambda ws, out: ["merge-mask", "--vlm", str(ws / "testbed"), "--aligned",
                                                str(ws / "testbed"), "--out", str(out), "--no-progress"],
     "are the same model"),
]


@pytest.mark.parametrize("case, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_model_folders_are_one_line(ws, capsys, monkeypatch, tmp_path, case, argv, expected):
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("y\n" * 4))  # an eager "y" must change nothing
    monkeypatch.chdir(ws)
    before = _snapshot(ws)
    out = tmp_path / "out"
    start = time.perf_counter()
    line = _check(main(argv(ws, out)), capsys.readouterr().err, expected)
    assert not out.exists(), "a refused run must not write its output"
    assert not (ws / "MARKER").exists(), "code from a model folder ran"
    assert _snapshot(ws) == before, "an input changed"
    assert "weights_only" not in line and "trust_remote_code" not in line  # advice a user must not follow
    if "no such" in expected or "cache" in expected:
        assert time.perf_counter() - start < 5, "a missing folder must be refused at once, not after hub retries"


def test_auto_map_folder_runs_nothing_when_a_terminal_answers_yes(ws):
    """transformers asks ``[y/N]`` on a terminal before running a folder's code: type "y" and still nothing runs."""
    pty = pytest.importorskip("pty")
    import select

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.execve(sys.executable, [sys.executable, "-m", "vlmsafe.cli", *_generate(ws / "automap")], env)
    out, deadline = b"", time.time() + 120
    os.write(fd, b"y\n")
    while time.time() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if b"[y/N]" in out:
                os.write(fd, b"y\n")
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace").replace("\r", "")
    lines = [ln for ln in text.splitlines() if ln.strip() and ln.strip() != "y"]
    assert os.waitstatus_to_exitcode(status) == 2, text
    assert len(lines) == 1 and REFUSAL in lines[0] and "[y/N]" not in text, text
    assert not (ws / "MARKER").exists()


# -- the validator itself -----------------------------------------------------------------------------------


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)
    return path


@pytest.mark.parametrize("header, data, expected", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12), "tensors a and b overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
      "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, bytes(12), "bytes 4..8 of its data belong to no"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8), "its last 4 bytes belong to no tensor"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, bytes(8), "tensor a has a bad byte range"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(4), "truncated file?"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), "unsupported safetensors dtype 'Q4'"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8), "not a list of non-negative"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, "8"]}}, bytes(8), "is not two integers"),
    ({"__metadata__": {"k": 1}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8),
     "__metadata__ is not a mapping of strings"),
])
def test_validator_refuses_what_the_reference_implementation_refuses(tmp_path, header, data, expected):
    f = _write_raw(tmp_path / "w.safetensors", header, data)
    with pytest.raises(FileFormatError, match="not a readable safetensors file") as err:
        read_safetensors_header(f)
    assert expected in str(err.value)
    with pytest.raises(Exception):  # noqa: B017 - the reference (what transformers loads with) refuses it too
        load_file(str(f))


def test_validator_accepts_what_save_file_writes(tmp_path):
    tensors = {"b": torch.ones(3, 2), "a": torch.zeros(0), "c": torch.arange(5, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    header, start = read_safetensors_header(tmp_path / "w.safetensors")
    assert sorted(header) == ["a", "b", "c"] and header["b"][0].shape == (3, 2) and start > 8


# -- fingerprints and vectors ---------------------------------------------------------------------------------


def test_fingerprint_follows_the_weights_not_the_files(ws, tmp_path):
    base = fingerprint([ws / "testbed" / "model.safetensors"])
    assert base == fingerprint([ws / "testbed_copy" / "model.safetensors"])  # a copy
    sd = load_file(str(ws / "testbed" / "model.safetensors"))
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:10]}, str(tmp_path / "a.safetensors"))  # re-sharded, other metadata
    save_file({k: sd[k] for k in names[10:]}, str(tmp_path / "b.safetensors"), metadata={"x": "y"})
    assert fingerprint([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]) == base
    name = "language_model.model.layers.2.mlp.down_proj.weight"
    sd[name] = sd[name] * 0.99  # one tensor nudged (a fine-tune, a merge)
    save_file(sd, str(tmp_path / "c.safetensors"))
    assert fingerprint([tmp_path / "c.safetensors"]) != base


@pytest.fixture(scope="module")
def vectors(ws, tmp_path_factory) -> Path:
    """Vectors saved from the testbed as loaded by vlmsafe (so the metadata records its fingerprint)."""
    from vlmsafe.adapters import get_adapter
    from vlmsafe.loading import load_model
    from vlmsafe.steering import ShiftVectors, calibration_meta

    model, processor = load_model(ws / "testbed")
    adapter = get_adapter(model, processor)
    meta = calibration_meta(adapter, layers=[1, 2], positions="last")
    dest = tmp_path_factory.mktemp("vectors") / "v"
    ShiftVectors(shifts={1: torch.zeros(adapter.hidden_size), 2: torch.zeros(adapter.hidden_size)},
                 meta=meta).save(dest)
    return dest


@pytest.fixture(scope="module")
def merged(ws, tmp_path_factory) -> Path:
    """The testbed merged with its aligned LLM: same architecture and shapes, other weights."""
    out = tmp_path_factory.mktemp("merged") / "m"
    assert main(["merge", "--vlm", str(ws / "testbed"), "--aligned", str(ws / "aligned"), "--weight", "0.5",
                 "--out", str(out), "--no-progress"]) == 0
    return out


def test_vectors_on_another_model_of_the_same_architecture_warn_once(ws, vectors, merged, capsys):
    recorded = json.loads((vectors / "vectors.json").read_text())["model_fingerprint"]
    assert recorded == fingerprint([ws / "testbed" / "model.safetensors"])
    capsys.readouterr()
    rc = main([*_generate(merged), "--vectors", str(vectors)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 0, err
    assert len(err) == 1 and err[0].startswith("vlmsafe: warning: steering vectors were calibrated on"), err
    assert "whose weights differ from the model loaded now" in err[0] and "vlmsafe calibrate" in err[0]


def test_strict_model_flag_refuses_vectors_of_other_weights_in_one_line(ws, vectors, merged, capsys):
    capsys.readouterr()
    rc = main([*_generate(merged), "--vectors", str(vectors), "--strict-model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "steering vectors were calibrated on" in err[0] and "calibrate them on this model" in err[0]
    assert "warning" not in err[0]  # refused, not warned and then refused
    assert main([*_generate(ws / "testbed"), "--vectors", str(vectors), "--strict-model"]) == 0  # their own model
    capsys.readouterr()
    assert main([*_generate(ws / "testbed"), "--strict-model"]) == 2  # nothing to check: refused, not ignored
    assert "--strict-model checks calibrated --vectors" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["testbed", "testbed_copy"])
def test_vectors_on_their_own_model_are_silent(ws, vectors, capsys, model):
    rc = main([*_generate(ws / model), "--vectors", str(vectors)])
    assert rc == 0 and capsys.readouterr().err.strip() == ""


def test_vectors_without_a_fingerprint_load_as_before(vectors, merged, capsys, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(vectors, old)
    meta = json.loads((old / "vectors.json").read_text())
    del meta["model_fingerprint"]
    (old / "vectors.json").write_text(json.dumps(meta))
    capsys.readouterr()
    rc = main([*_generate(merged), "--vectors", str(old)])
    assert rc == 0 and capsys.readouterr().err.strip() == ""


def test_strict_check_refuses_vectors_of_other_weights(ws, vectors):
    from vlmsafe.loading import load_model, warn_if_other_model

    meta = json.loads((vectors / "vectors.json").read_text())
    model, _ = load_model(ws / "testbed")
    warn_if_other_model(meta, model, what="vectors", strict=True)  # the same weights: nothing to say
    with pytest.raises(IncompatibleVectorsError, match="whose weights differ"):
        warn_if_other_model({**meta, "model_fingerprint": "sha256:other"}, model, what="vectors", strict=True)


def test_a_cached_hub_model_is_checked_like_a_folder(ws, capsys, monkeypatch, tmp_path):
    """Offline, a hub id loads from the Hugging Face cache: the same checks apply to that folder."""
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--acme--evil"
    shutil.copytree(ws / "automap", repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    _check(main(_generate("acme/evil")), capsys.readouterr().err, REFUSAL)
    assert not (ws / "MARKER").exists()


# --------------------------------------------------------------------------- ModelConfig: the loading settings, once
def test_model_config_checks_its_settings_once_before_any_file_is_read(tmp_path):
    from vlmsafe import ModelConfig
    from vlmsafe.errors import InputError

    missing = tmp_path / "no-such-model"  # never read: every check below is the settings' own
    assert ModelConfig(missing, dtype="bf16").dtype == "bfloat16"  # aliases and torch dtypes: stored as the name
    assert ModelConfig(missing, dtype=torch.float16).dtype == "float16"
    assert ModelConfig(missing, dtype="auto").dtype == "auto"
    with pytest.raises(InputError, match="dtype 'float8' is not a dtype vlmsafe handles"):
        ModelConfig(missing, dtype="float8")
    with pytest.raises(InputError, match=r"either `device` or `device_map`, not both"):
        ModelConfig(missing, device="cpu", device_map="auto")
    with pytest.raises(InputError, match="unknown device 'gpu9'"):
        ModelConfig(missing, device="gpu9")
    config = ModelConfig(missing, dtype="float16")
    assert config.with_overrides(dtype="float32").dtype == "float32" and config.dtype == "float16"
    with pytest.raises(InputError, match="not both"):
        config.with_overrides(device="cpu", device_map="auto")


def test_load_model_takes_a_model_config_or_its_fields():
    from vlmsafe import ModelConfig, load_model

    model, _ = load_model(ModelConfig("assets/testbed", dtype="bf16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    model, _ = load_model(ModelConfig("assets/testbed", dtype="bf16"), dtype="float16")  # a field replaced
    assert next(model.parameters()).dtype == torch.float16
    model, _ = load_model("assets/testbed", dtype="float32")  # the fields as keywords, as before
    assert next(model.parameters()).dtype == torch.float32


def test_device_and_device_map_together_read_as_flags_on_the_command_line(capsys, tmp_path):
    code = main(["generate", "--model", "assets/testbed", "--prompt", "hello", "--device", "cpu",
                 "--device-map", "auto"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err
    assert err == ("vlmsafe generate: error: pass either --device or --device-map, not both (a device map places "
                   "the model itself)"), err
