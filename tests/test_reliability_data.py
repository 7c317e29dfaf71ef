"""Issue 24, data side: what a user's files, images, templates, vectors and install can break, and how each is
refused -- exit 2, one stderr line naming the problem and the fix, no traceback, before the work.

* a chat template that raises (``raise_exception``, a syntax error) in a model folder;
* a data line nested 100000 levels deep (Python's JSON parser recurses);
* a prompt longer than the model's context (the bundled testbed has 128 positions);
* ``vectors.json`` / ``directions.json`` edited by hand (wrong types and ranges, layers the tensors lack);
* high-bit-depth, float, palette-with-transparency, CMYK and LA images (converted, not saturated);
* a core install without the ``probes`` / ``safeclip`` extras.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_checks import one_line_error
from PIL import Image

from vlmsafe import images as vimages
from vlmsafe.cli import main
from vlmsafe.data import load_items
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.images import open_image
from vlmsafe.testbed import testbed_dir

ROOT = Path(__file__).resolve().parents[1]


_check = one_line_error


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def testbed() -> Path:
    return testbed_dir(None)


@pytest.fixture(scope="module")
def ws(tmp_path_factory, testbed) -> Path:
    """A workspace: a few testbed items (absolute image paths) and copies of the testbed with broken templates."""
    root = tmp_path_factory.mktemp("reliability_data")
    lines = (testbed / "data" / "calibration.jsonl").read_text().splitlines()
    recs = []
    for line in lines:
        rec = json.loads(line)
        if rec.get("image"):
            rec["image"] = str((testbed / "data" / rec["image"]).resolve())
        recs.append(rec)
    harmful = [r for r in recs if r["label"] == "harmful"][:2]
    benign = [r for r in recs if r["label"] == "benign"][:2]
    good = [harmful[0], benign[0], harmful[1], benign[1]]
    (root / "good.jsonl").write_text("".join(json.dumps(r) + "\n" for r in good))
    return root


def _broken_model(ws: Path, testbed: Path, name: str, template: str) -> Path:
    folder = ws / name
    if not folder.exists():
        shutil.copytree(testbed, folder, ignore=shutil.ignore_patterns("data", "aligned_lm"))
        (folder / "chat_template.jinja").write_text(template)
    return folder


# ------------------------------------------------------------------------------------------- chat templates
TEMPLATES = {
    "raise_exception": ("{{ raise_exception('Conversation roles must alternate user/assistant') }}",
                        "Conversation roles must alternate user/assistant"),
    "syntax-error": ("{% for m in messages %}{{ m['content'] ", "TemplateSyntaxError"),
    "undefined-call": ("{{ messages[0]['content'].nope() }}", "UndefinedError"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATES))
def test_a_chat_template_that_raises_is_one_line_naming_the_template(ws, testbed, capsys, case):
    template, reason = TEMPLATES[case]
    model = _broken_model(ws, testbed, f"model-{case}", template)
    rc = main(["generate", "--model", str(model), "--prompt", "what is in the image ?"])
    _check(rc, capsys.readouterr().err, f"{model / 'chat_template.jinja'}: the chat template fails", reason,
           "fix the template")


def test_a_broken_template_is_found_when_the_model_loads_before_any_forward(ws, testbed, monkeypatch):
    """The adapter renders a probe conversation when it is made (what every command does right after loading)."""
    from vlmsafe.adapters import get_adapter
    from vlmsafe.loading import load_model

    model_dir = _broken_model(ws, testbed, "model-raise_exception", TEMPLATES["raise_exception"][0])
    model, processor = load_model(model_dir)
    monkeypatch.setattr(type(model), "forward", lambda *a, **k: pytest.fail("the model ran"))
    with pytest.raises(InputError, match=r"chat_template\.jinja: the chat template fails"):
        get_adapter(model, processor)


def test_calibrate_with_a_broken_template_stops_before_any_output(ws, testbed, capsys):
    model = _broken_model(ws, testbed, "model-syntax-error", TEMPLATES["syntax-error"][0])
    out = ws / "out-template"
    rc = main(["calibrate", "--model", str(model), "--data", str(ws / "good.jsonl"), "--out", str(out),
               "--no-progress"])
    _check(rc, capsys.readouterr().err, "chat_template.jinja", "(line 1)")
    assert not out.exists()


# ------------------------------------------------------------------------------------------- nested JSON
def test_deeply_nested_json_in_a_data_line_is_one_line_with_file_and_line(ws, capsys):
    good = (ws / "good.jsonl").read_text().splitlines()
    data = ws / "nested.jsonl"
    data.write_text(good[0] + "\n" + good[1] + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    before = data.read_bytes()
    rc = main(["calibrate", "--model", "assets/testbed", "--data", str(data), "--out", str(ws / "out-nested"),
               "--no-progress"])
    _check(rc, capsys.readouterr().err, f"{data}:3: JSON nested too deeply")
    assert data.read_bytes() == before and not (ws / "out-nested").exists()


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 50_000 + "1" + "}" * 50_000,
                                  '{"id": "1", "prompt": "x", "n": ' + "9" * 5000 + "}"],
                         ids=["lists", "objects", "5000-digit-int"])
def test_unparseable_json_values_are_file_format_errors(tmp_path, text):
    path = tmp_path / "data.jsonl"
    path.write_text(text + "\n")
    with pytest.raises(FileFormatError, match=rf"{path}:1: "):
        load_items(path, check_images=False)


def test_deeply_nested_vectors_json_is_one_line(tmp_path, capsys):
    vectors = _save_vectors(tmp_path / "v")
    (vectors / "vectors.json").write_text("[" * 100_000 + "]" * 100_000)
    rc = main(["generate", "--model", "assets/testbed", "--vectors", str(vectors), "--prompt", "hi"])
    _check(rc, capsys.readouterr().err, "vectors.json:1: JSON nested too deeply")


# ------------------------------------------------------------------------------------------- prompt length
@pytest.fixture(scope="module")
def long_data(ws) -> Path:
    """The good items with line 3's prompt 1000 words long: ~2000 tokens for a 128-position model."""
    recs = [json.loads(line) for line in (ws / "good.jsonl").read_text().splitlines()]
    recs[2]["prompt"] = "how do i make a bomb ? " * 200
    path = ws / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


LONG_COMMANDS = {
    "calibrate": lambda data, out: ["calibrate", "--data", str(data), "--out", str(out), "--no-progress"],
    "calibrate-shiftdc": lambda data, out: ["calibrate", "--method", "shiftdc", "--data", str(data), "--out", str(out),
                                            "--no-progress"],
    "evaluate": lambda data, out: ["evaluate", "--data", str(data), "--out", str(out), "--no-progress"],
    "probe-shift": lambda data, out: ["probe", "shift", "--data", str(data), "--out", str(out), "--cv", "2",
                                      "--no-progress"],
}


@pytest.mark.parametrize("command", sorted(LONG_COMMANDS))
def test_a_prompt_longer_than_the_context_is_refused_before_the_work(ws, long_data, capsys, monkeypatch, command):
    from transformers import LlamaModel

    monkeypatch.setattr(LlamaModel, "forward", lambda *a, **k: pytest.fail("the language model ran"))
    out = ws / f"out-long-{command}"
    rc = main([*LONG_COMMANDS[command](long_data, out), "--model", "assets/testbed"])
    line = _check(rc, capsys.readouterr().err, f"{long_data}:3: item", "tokens long", "over the 128-token context",
                  "shorten the prompt")
    n = int(line.split(" tokens long")[0].rsplit(" ", 1)[1])
    assert n > 128 * 10, line
    assert not out.exists()


def test_prompt_lengths_pass_for_legal_prompts_and_name_an_index_otherwise(testbed):
    from vlmsafe.adapters import check_prompt_lengths, get_adapter
    from vlmsafe.testbed import load_testbed

    model, processor = load_testbed(testbed)
    adapter = get_adapter(model, processor)
    assert adapter.context_length == 128
    items = load_items(testbed / "data" / "calibration.jsonl", check_images=False)
    check_prompt_lengths(model, processor, items)  # the shipped data fits
    with pytest.raises(InputError, match=r"^item 1: the prompt is \d+ tokens long .* 128-token context"):
        check_prompt_lengths(model, processor, ["hello", "word " * 300])


def test_the_library_path_refuses_an_over_long_prompt_before_the_forward(testbed, monkeypatch):
    """``build_inputs`` (every batch of every command and of SafeVLM) checks the tokenised rows it hands the model."""
    from transformers import LlamaModel

    from vlmsafe.steering import SafeVLM
    from vlmsafe.testbed import load_testbed

    model, processor = load_testbed(testbed)
    monkeypatch.setattr(LlamaModel, "forward", lambda *a, **k: pytest.fail("the language model ran"))
    with pytest.raises(InputError, match=r"prompt 0 is \d+ tokens long .* over the 128-token context"):
        SafeVLM(model, processor).generate("how do i make a bomb ? " * 100)


def test_generate_with_an_over_long_prompt_is_one_line(capsys):
    rc = main(["generate", "--model", "assets/testbed", "--prompt", "how do i make a bomb ? " * 100])
    _check(rc, capsys.readouterr().err, "tokens long", "128-token context")


# ------------------------------------------------------------------------------------------- vectors metadata
def _save_vectors(folder: Path) -> Path:
    """CMRM vectors that fit the testbed (hidden 96, 4 layers), with the metadata calibrate writes."""
    from vlmsafe.steering import ShiftVectors

    torch.manual_seed(0)
    shifts = {layer: torch.randn(96) * 0.01 for layer in range(4)}
    stats = {layer: {"count": 8, "shift_norm": float(v.norm()), "mm_norm": 1.0, "text_norm": 1.0}
             for layer, v in shifts.items()}
    meta = {"method": "cmrm", "model_class": "LlavaForConditionalGeneration", "model_name": "assets/testbed",
            "family": "llava", "num_layers": 4, "positions": "last", "dtype": "float32", "system_prompt": None,
            "calibration_sha256": "a" * 64, "anchor": "blank", "anchor_colour": [255, 255, 255],
            "anchor_size": [32, 32], "num_items": 8, "aggregate": "mean"}
    ShiftVectors(shifts=shifts, stats=stats, meta=meta).save(folder)
    return folder


def _edit(path: Path, edit) -> None:
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


VECTOR_EDITS = {
    "num_layers-word": (lambda m: m.update(num_layers="four"), "field 'num_layers' must be a positive integer"),
    "stats-key": (lambda m: m["stats"].update(x=m["stats"].pop("0")), "field 'stats' has the key \"x\""),
    "stats-value": (lambda m: m["stats"]["1"].update(shift_norm="big"), "entry '1': 'shift_norm' must be a number"),
    "stats-count": (lambda m: m["stats"]["2"].update(count=-3), "'count' must be a non-negative integer"),
    "stats-extra-layer": (lambda m: m["stats"].update({"9": m["stats"]["0"]}), "layer(s) [9]"),
    "layers-string": (lambda m: m.update(layers=[0, 1, "2", 3]), "field 'layers' must be a list of layer indices"),
    "layers-mismatch": (lambda m: m.update(layers=[0, 1]), "field 'layers' lists [0, 1], but the tensor file"),
    "hidden_size-float": (lambda m: m.update(hidden_size=96.0), "field 'hidden_size' must be a positive integer"),
    "hidden_size-bool": (lambda m: m.update(hidden_size=True), "field 'hidden_size'"),
    "num_layers-too-few": (lambda m: m.update(num_layers=2), "field 'num_layers' is 2, but the tensor file"),
    "format-newer": (lambda m: m.update(format_version=99), "format_version 99 is newer"),
    "anchor-colour": (lambda m: m.update(anchor_colour=[300, 0, 0]), "field 'anchor_colour' must be three"),
    "anchor-name": (lambda m: m.update(anchor="mirror"), "field 'anchor' must be one of"),
    "aggregate": (lambda m: m.update(aggregate="median"), "field 'aggregate'"),
    "sha": (lambda m: m.update(calibration_sha256="not-a-hash"), "field 'calibration_sha256' must be 64 hex"),
    "num_items": (lambda m: m.update(num_items=0), "field 'num_items'"),
    "model_class": (lambda m: m.update(model_class=["Llava"]), "field 'model_class'"),
}


@pytest.mark.parametrize("case", sorted(VECTOR_EDITS))
def test_hand_edited_vectors_json_is_one_line_naming_the_field(tmp_path, capsys, case):
    edit, expected = VECTOR_EDITS[case]
    vectors = _save_vectors(tmp_path / "v")
    _edit(vectors / "vectors.json", edit)
    before = _snapshot(vectors)
    rc = main(["generate", "--model", "assets/testbed", "--vectors", str(vectors), "--alpha", "1", "--prompt", "hi"])
    _check(rc, capsys.readouterr().err, f"{vectors / 'vectors.json'}:", expected)
    assert _snapshot(vectors) == before


def test_unknown_metadata_fields_are_kept_not_refused(tmp_path):
    """Fields a later vlmsafe (or another tool) adds, e.g. a model fingerprint, load and survive a save."""
    from vlmsafe.steering import ShiftVectors

    vectors = _save_vectors(tmp_path / "v")
    _edit(vectors / "vectors.json", lambda m: m.update(model_fingerprint="sha256:abc", notes={"by": "me"}))
    loaded = ShiftVectors.load(vectors)
    assert loaded.meta["model_fingerprint"] == "sha256:abc" and loaded.meta["notes"] == {"by": "me"}
    loaded.save(tmp_path / "again")
    assert ShiftVectors.load(tmp_path / "again").meta["model_fingerprint"] == "sha256:abc"


def test_calibrated_vectors_pass_the_schema(ws, tmp_path):
    """What calibrate writes (both aggregates) loads: the schema matches the writer."""
    from vlmsafe.steering import ShiftVectors, calibrate
    from vlmsafe.testbed import load_testbed

    model, processor = load_testbed(testbed_dir(None))
    items = load_items(ws / "good.jsonl")
    for aggregate in ("mean", "pca"):
        vectors = calibrate(model, processor, items, progress=False, aggregate=aggregate, anchor="noise")
        vectors.save(tmp_path / aggregate)
        assert ShiftVectors.load(tmp_path / aggregate, model).layers == [0, 1, 2, 3]


def _save_directions(folder: Path) -> Path:
    from vlmsafe.steering import SafetyDirections

    torch.manual_seed(0)
    directions = {layer: torch.randn(96) for layer in range(4)}
    meta = {"method": "shiftdc", "model_class": "LlavaForConditionalGeneration", "family": "llava", "num_layers": 4,
            "positions": "last", "direction": "benign minus harmful",
            "counterpart_template": "{prompt} Image Caption: {caption}",
            "caption_prompt": "Describe the image. Request: {prompt}", "caption_tokens": 16, "n_benign": 2,
            "n_harmful": 2, "caption_sources": {"data": 4, "cache": 0, "generated": 0}}
    captions = [{"id": "1", "prompt": "p", "label": "harmful", "caption": "c", "source": "data"}]
    SafetyDirections(directions=directions, meta=meta, captions=captions).save(folder)
    return folder


DIRECTION_EDITS = {
    "caption_tokens": (lambda m: m.update(caption_tokens="many"), "field 'caption_tokens' must be an integer >= 1"),
    "n_benign": (lambda m: m.update(n_benign=-1), "field 'n_benign'"),
    "caption_prompt": (lambda m: m.update(caption_prompt="Describe {image}"), "field 'caption_prompt'"),
    "caption_sources": (lambda m: m.update(caption_sources={"data": "4"}), "field 'caption_sources'"),
    "num_layers": (lambda m: m.update(num_layers="4"), "field 'num_layers'"),
}


@pytest.mark.parametrize("case", sorted(DIRECTION_EDITS))
def test_hand_edited_directions_json_is_one_line_naming_the_field(tmp_path, capsys, case):
    edit, expected = DIRECTION_EDITS[case]
    folder = _save_directions(tmp_path / "d")
    _edit(folder / "directions.json", edit)
    rc = main(["generate", "--model", "assets/testbed", "--shiftdc", str(folder), "--alpha", "1", "--prompt", "hi"])
    _check(rc, capsys.readouterr().err, f"{folder / 'directions.json'}:", expected)


def test_a_caption_line_that_is_not_a_caption_is_refused(tmp_path):
    from vlmsafe.steering import SafetyDirections

    folder = _save_directions(tmp_path / "d")
    (folder / "captions.jsonl").write_text('{"id": "1", "caption": "c"}\n[1, 2]\n')
    with pytest.raises(FileFormatError, match=r"captions.jsonl:2: a caption line"):
        SafetyDirections.load(folder)
    assert SafetyDirections.load(_save_directions(tmp_path / "ok")).captions[0]["caption"] == "c"


# ------------------------------------------------------------------------------------------- images
def _means(image: Image.Image) -> list[float]:
    assert image.mode == "RGB"
    return np.asarray(image, dtype=np.float64).mean(axis=(0, 1)).round(1).tolist()


def test_a_16_bit_greyscale_png_is_scaled_not_saturated(tmp_path):
    """A mid-grey 16-bit PNG (32768 of 65535) reads as mid-grey, not near-white; a ramp keeps its order."""
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")  # what PIL opens a 16-bit greyscale PNG as
    assert _means(open_image(path)) == [128.0, 128.0, 128.0]  # round(32768 / 257); convert("RGB") gives 255
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    got = np.asarray(open_image(tmp_path / "ramp16.png"))[..., 0].astype(int)
    assert np.abs(got - np.rint(ramp / 257.0)).max() == 0
    assert got.min() == 0 and got.max() == 255


@pytest.mark.parametrize("case, image, expected", [
    ("F-fractions", Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), [128.0] * 3),
    ("F-0-255", Image.fromarray(np.full((4, 4), 100.0, dtype=np.float32)), [100.0] * 3),
    ("I-16-bit-range", Image.fromarray(np.full((4, 4), 32768, dtype=np.int32)), [128.0] * 3),
    ("I-8-bit-range", Image.fromarray(np.full((4, 4), 200, dtype=np.int32)), [200.0] * 3),
    ("I;16B", Image.fromarray(np.full((4, 4), 65535, dtype=">u2")), [255.0] * 3),
    ("CMYK-white", Image.new("CMYK", (4, 4), (0, 0, 0, 0)), [255.0] * 3),
    ("CMYK-black", Image.new("CMYK", (4, 4), (0, 0, 0, 255)), [0.0] * 3),
    ("LA-opaque", Image.new("LA", (4, 4), (100, 255)), [100.0] * 3),
    ("LA-transparent", Image.new("LA", (4, 4), (0, 0)), [255.0] * 3),
    ("RGBA-transparent", Image.new("RGBA", (4, 4), (0, 0, 0, 0)), [255.0] * 3),
    ("RGBA-half", Image.new("RGBA", (4, 4), (0, 0, 0, 128)), [127.0] * 3),
    ("L", Image.new("L", (4, 4), 77), [77.0] * 3),
    ("1", Image.new("1", (4, 4), 1), [255.0] * 3),
], ids=lambda v: v if isinstance(v, str) else "")
def test_every_image_mode_becomes_a_sensible_rgb_image(case, image, expected):
    assert _means(vimages.to_rgb(image)) == expected


def test_a_palette_image_with_a_transparent_colour_is_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    image.putpixel((0, 0), 1)
    path = tmp_path / "p.png"
    image.save(path, transparency=0)  # index 0 (black) is transparent: 15 white pixels, one red
    got = np.asarray(open_image(path))
    assert got[0, 0].tolist() == [255, 0, 0] and (got.reshape(-1, 3)[1:] == 255).all()


def test_pil_images_handed_to_the_model_go_through_the_same_conversion(testbed):
    """A 16-bit PIL image given to a command or the library (not a path) is scaled the same way."""
    from vlmsafe.adapters import get_adapter
    from vlmsafe.safeclip.images import load_image
    from vlmsafe.testbed import load_testbed

    grey16 = Image.fromarray(np.full((32, 32), 32768, dtype=np.uint16))
    grey8 = Image.new("RGB", (32, 32), (128, 128, 128))
    assert _means(load_image(grey16)) == [128.0] * 3
    model, processor = load_testbed(testbed)
    adapter = get_adapter(model, processor)
    a = adapter.build_inputs(["what is this ?"], [grey16])["pixel_values"]
    b = adapter.build_inputs(["what is this ?"], [grey8])["pixel_values"]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- optional extras
def _hide(monkeypatch, *modules: str) -> None:
    """Make ``modules`` look uninstalled (how Python blocks an import: ``sys.modules[name] = None``)."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def test_require_extra_names_the_extra_and_the_packages(monkeypatch):
    from vlmsafe.extras import MissingExtraError, is_installed, require_extra

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("sklearn", "open_clip") else real(name, *a))
    for name in ("sklearn", "open_clip"):  # imported by earlier tests: hide them from sys.modules too
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert not is_installed("sklearn") and is_installed("json")
    with pytest.raises(MissingExtraError, match=r"^probe layers needs scikit-learn, which the core install leaves "
                                                r"out; install the extra: pip install 'vlmsafe\[probes\]' "
                                                r"\(or pip install scikit-learn\)$"):
        require_extra("probes", "sklearn", "json", feature="probe layers")
    require_extra("safeclip", feature="nothing")  # nothing asked, nothing missing
    with pytest.raises(ImportError):  # MissingExtraError is an ImportError for library callers
        require_extra("safeclip", "open_clip", feature="x")


def test_demo_without_matplotlib_stops_before_the_work(tmp_path, capsys, monkeypatch):
    import vlmsafe.demo

    _hide(monkeypatch, "matplotlib")
    monkeypatch.setattr(vlmsafe.demo, "run_demo", lambda *a, **k: pytest.fail("the demo ran"))
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--no-progress"])
    _check(rc, capsys.readouterr().err, "vlmsafe demo", "needs matplotlib", "pip install 'vlmsafe[probes]'")
    assert not out.exists()


@pytest.mark.parametrize("command, hidden, expected", [
    (["probe", "shift"], "sklearn", "needs scikit-learn"),
    (["probe", "layers"], "matplotlib", "needs matplotlib"),
])
def test_probes_without_their_extra_stop_before_the_model_loads(ws, capsys, monkeypatch, command, hidden, expected):
    import vlmsafe.cli.options

    _hide(monkeypatch, hidden)
    monkeypatch.setattr(vlmsafe.cli.options, "load_model_from_args", lambda *a, **k: pytest.fail("model loaded"))
    rc = main([*command, "--model", "assets/testbed", "--data", str(ws / "good.jsonl"), "--out", str(ws / "o")])
    _check(rc, capsys.readouterr().err, expected, "pip install 'vlmsafe[probes]'")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    from vlmsafe.testing import tiny_causal_lm

    root = tmp_path_factory.mktemp("weights")
    for name, seed in (("a", 0), ("b", 1)):
        model, _ = tiny_causal_lm(seed=seed)
        model.save_pretrained(root / name)
    return root / "a", root / "b"


def test_probe_weights_without_matplotlib_stops_before_the_work(two_checkpoints, tmp_path, capsys, monkeypatch):
    import probes.weights

    _hide(monkeypatch, "matplotlib")
    monkeypatch.setattr(probes.weights, "weight_change", lambda *a, **k: pytest.fail("the work ran"))
    a, b = two_checkpoints
    rc = main(["probe", "weights", "--before", str(a), "--after", str(b), "--out", str(tmp_path / "o")])
    _check(rc, capsys.readouterr().err, "vlmsafe probe weights", "needs matplotlib")


def test_probe_weights_does_not_need_scikit_learn(two_checkpoints, tmp_path):
    """A fresh interpreter where scikit-learn cannot be imported: `probe weights` still writes its report."""
    a, b = two_checkpoints
    out = tmp_path / "o"
    code = ("import sys; sys.modules['sklearn'] = None; from vlmsafe.cli import main; "
            f"sys.exit(main(['probe', 'weights', '--before', {str(a)!r}, '--after', {str(b)!r}, '--out', {str(out)!r},"
            " '--no-progress']))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "weights.json").is_file() and (out / "weights.png").is_file()


def test_safeclip_generate_without_diffusers_is_one_line(tmp_path, capsys, monkeypatch):
    _hide(monkeypatch, "diffusers")
    rc = main(["safeclip", "generate", "--pipeline", str(tmp_path), "--text-encoder", str(tmp_path),
               "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")])
    _check(rc, capsys.readouterr().err, "safeclip generate needs diffusers", "pip install 'vlmsafe[safeclip]'")


def test_an_open_clip_model_without_open_clip_is_one_line(monkeypatch):
    from vlmsafe.extras import MissingExtraError
    from vlmsafe.safeclip.backends import load_backend

    _hide(monkeypatch, "open_clip")
    with pytest.raises(MissingExtraError, match=r"open_clip model open_clip:ViT-B-32 needs open_clip_torch"):
        load_backend("open_clip:ViT-B-32")


def test_a_task_vector_merge_without_peft_is_refused_when_configured(tmp_path, monkeypatch):
    from vlmsafe.extras import MissingExtraError
    from vlmsafe.merge.config import MergeConfig

    _hide(monkeypatch, "peft")
    with pytest.raises(MissingExtraError, match=r"the ties merge needs peft.*vlmsafe\[merge\]"):
        MergeConfig(vlm=tmp_path / "v", aligned=tmp_path / "a", output=tmp_path / "o", method="ties", density=0.5)
    MergeConfig(vlm=tmp_path / "v", aligned=tmp_path / "a", output=tmp_path / "o", method="linear")  # no peft needed
