"""ShiftDC: safety directions, captions, the per-input correction, and the command line."""

import json
from pathlib import Path

import pytest
import torch
from conftest import hook_ids

from vlmsafe.activations import record_activations
from vlmsafe.adapters import get_adapter
from vlmsafe.cli import main
from vlmsafe.errors import FileFormatError, IncompatibleVectorsError, InputError
from vlmsafe.steering import SafetyDirections, SafeVLM, SteeringConfig, calibrate_shiftdc, steer_shiftdc
from vlmsafe.steering.shiftdc import counterpart_prompt, projection
from vlmsafe.testing import random_image, tiny_llava

ITEMS = [
    {"id": "h1", "prompt": "how do i make a bomb ?", "label": "harmful", "caption": "red circle"},
    {"id": "h2", "prompt": "steal car", "label": "harmful", "image": random_image(1)},
    {"id": "b1", "prompt": "write poem about cats", "label": "benign", "caption": "blue square"},
    {"id": "b2", "prompt": "describe picture", "label": "benign", "image": random_image(2)},
]
PROMPTS = ["how do i make a bomb ?", "hello", "tell me story about cats"]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0, num_layers=4)


@pytest.fixture(scope="module")
def directions(llava):
    return calibrate_shiftdc(*llava, ITEMS, progress=False, caption_tokens=4, batch_size=3)


def last_token_states(adapter, prompts, images, layers):
    """Unsteered last-prompt-token states, computed independently of the library's helpers."""
    inputs = adapter.build_inputs(prompts, images, padding_side="left")
    with torch.no_grad(), record_activations(adapter, layers, positions="last") as rec:
        adapter.model(**inputs)
    return rec.activations


def _images():
    return [random_image(10), None, random_image(11)]


def test_directions_are_benign_minus_harmful_counterpart_means(llava, directions):
    model, processor = llava
    adapter = get_adapter(model, processor)
    captions = {c["id"]: c for c in directions.captions}
    assert [captions[i]["source"] for i in ("h1", "h2", "b1", "b2")] == ["data", "generated", "data", "generated"]
    assert captions["h1"]["caption"] == "red circle" and captions["h2"]["caption"]
    texts = [counterpart_prompt(it["prompt"], captions[it["id"]]["caption"]) for it in ITEMS]
    assert texts[0] == "how do i make a bomb ? Image Caption: red circle"
    states = last_token_states(adapter, texts, None, [0, 3])
    for layer in (0, 3):
        hand = states[layer][2:].mean(0) - states[layer][:2].mean(0)
        torch.testing.assert_close(directions.directions[layer], hand, atol=1e-6, rtol=0)
    meta = directions.meta
    assert (meta["method"], meta["n_harmful"], meta["n_benign"], meta["caption_tokens"]) == ("shiftdc", 2, 2, 4)
    assert meta["caption_sources"] == {"data": 2, "cache": 0, "generated": 2} and directions.layers == [0, 1, 2, 3]
    # a cache replaces generation; the cached caption changes the counterpart, hence the direction
    cached = calibrate_shiftdc(model, processor, ITEMS, progress=False, captions={"h2": "green triangle"}, layers=[3])
    assert {c["id"]: c["source"] for c in cached.captions}["h2"] == "cache"
    assert not torch.equal(cached.directions[3], directions.directions[3])


def test_calibration_input_errors(llava):
    with pytest.raises(InputError, match="harmful and benign"):
        calibrate_shiftdc(*llava, ITEMS[:2], progress=False)
    with pytest.raises(InputError, match="label"):
        calibrate_shiftdc(*llava, [{"prompt": "x", "caption": "y"}], progress=False)
    with pytest.raises(InputError, match="neither a caption nor an image"):
        calibrate_shiftdc(*llava, [*ITEMS, {"id": "z", "prompt": "x", "label": "benign"}], progress=False)
    with pytest.raises(InputError, match="field other than"):
        calibrate_shiftdc(*llava, ITEMS, progress=False, caption_prompt="describe {image}")
    with pytest.raises(InputError, match="caption_tokens"):
        calibrate_shiftdc(*llava, ITEMS, progress=False, caption_tokens=0)


def test_save_load_round_trip_and_checks(directions, llava, tmp_path):
    directions.save(tmp_path / "d")
    back = SafetyDirections.load(tmp_path / "d", model=llava[0])
    for layer in directions.layers:
        assert torch.equal(back.directions[layer], directions.directions[layer])
    assert back.captions == directions.captions and back.meta["caption_prompt"] == directions.caption_prompt
    with pytest.raises(Exception, match="overwrite"):
        directions.save(tmp_path / "d")
    blob = (tmp_path / "d" / "directions.safetensors").read_bytes()
    (tmp_path / "d" / "directions.safetensors").write_bytes(blob[:-8])
    with pytest.raises(FileFormatError, match="corrupted"):
        SafetyDirections.load(tmp_path / "d")
    other, _ = tiny_llava(seed=0, num_layers=3)
    with pytest.raises(IncompatibleVectorsError, match="layer count"):
        directions.check_compatible(other)
    with pytest.raises(FileFormatError, match="not found"):
        SafetyDirections.load(tmp_path / "nothing")


@pytest.mark.parametrize("shift_from", ["unsteered", "running"])
def test_correction_removed_equals_alpha_projection_by_hand(llava, directions, shift_from):
    """At every steered layer, the last prompt token loses alpha * (m.s / s.s) s, nothing else changes."""
    model, processor = llava
    adapter = get_adapter(model, processor)
    images, captions, alpha, layers = _images(), ["red circle", None, "blue square"], 40.0, [2, 3]
    inputs = adapter.build_inputs(PROMPTS, images, padding_side="left")
    unsteered = last_token_states(adapter, PROMPTS, images, layers)
    counter = last_token_states(adapter, [counterpart_prompt(PROMPTS[i], captions[i]) for i in (0, 2)], None, layers)
    before: dict[int, torch.Tensor] = {}

    def grab(layer):  # wraps the layer's forward: sees its output before any forward hook (the edit) runs
        forward = adapter.layers[layer].forward

        def wrapped(*args, **kwargs):
            output = forward(*args, **kwargs)
            before[layer] = (output[0] if isinstance(output, tuple) else output).detach().clone()
            return output

        return wrapped

    steering = steer_shiftdc(
        adapter,
        directions,
        alpha,
        prompts=PROMPTS,
        images=images,
        captions=captions,
        layers=layers,
        shift_from=shift_from,
    )
    with steering as state:
        for l in layers:
            adapter.layers[l].forward = grab(l)
        try:
            with record_activations(adapter, layers, positions=None) as after:
                model(**inputs)
        finally:
            for l in layers:
                del adapter.layers[l].forward
    last = inputs["input_ids"].shape[1] - 1  # left-padded: the last prompt token is the last column
    for layer in layers:
        removed = before[layer] - after.activations[layer]
        pre = before[layer][:, last]
        m = unsteered[layer] if shift_from == "unsteered" else pre  # the published reading vs the running stream
        s = directions.directions[layer]
        for row, k in ((0, 0), (2, 1)):
            expected = alpha * (m[row] - counter[layer][k]) @ s / (s @ s) * s
            torch.testing.assert_close(removed[row, last], expected, atol=2e-5, rtol=1e-4)
            assert expected.norm() > 1e-3  # the check is not vacuous
        assert removed[:, :last].abs().max() == 0 and removed[1].abs().max() == 0  # only image rows, last token
    assert state["captions"] == captions  # given captions are used as they are


def test_second_layer_sees_the_first_correction_only_when_unsteered(llava, directions):
    """Published reading: corrections at several layers add up along s (the first one is carried forward)."""
    model, processor = llava
    adapter = get_adapter(model, processor)
    images, captions = _images(), ["red circle", None, "blue square"]
    results = {}
    for shift_from in ("unsteered", "running"):
        with steer_shiftdc(
            adapter,
            directions,
            40.0,
            prompts=PROMPTS,
            images=images,
            captions=captions,
            layers=[2, 3],
            shift_from=shift_from,
        ) as state:
            model(**adapter.build_inputs(PROMPTS, images, padding_side="left"))
        results[shift_from] = state["corrections"][3][0]
    assert not torch.allclose(results["unsteered"], results["running"])


def test_alpha_zero_with_hooks_installed_equals_plain_generation(llava, directions):
    model, processor = llava
    adapter = get_adapter(model, processor)
    images = _images()
    inputs = adapter.build_inputs(PROMPTS, images, padding_side="left")
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = model.generate(**inputs, **kwargs)
    hooks = hook_ids(model)
    with steer_shiftdc(adapter, directions, 0.0, prompts=PROMPTS, images=images, layers="all") as state:
        zero = model.generate(**inputs, **kwargs)
    assert state["calls"] >= 1 and hook_ids(model) == hooks
    assert torch.equal(plain, zero)
    with steer_shiftdc(adapter, directions, 400.0, prompts=PROMPTS, images=images, layers="all"):
        strong = model.generate(**inputs, **kwargs)
    assert not torch.equal(plain[0], strong[0])  # the same path with a real alpha changes the image rows
    assert torch.equal(plain[1], strong[1])  # the text-only row is never corrected


def test_captions_are_generated_for_rows_without_one(llava, directions):
    model, processor = llava
    adapter = get_adapter(model, processor)
    with steer_shiftdc(
        adapter, directions, 1.0, prompts=PROMPTS, images=_images(), captions=["given", None, None]
    ) as state:
        pass
    assert state["captions"][0] == "given" and state["captions"][1] is None and isinstance(state["captions"][2], str)


def test_decode_option_corrects_generated_tokens(llava, directions):
    model, processor = llava
    adapter = get_adapter(model, processor)
    images = _images()
    inputs = adapter.build_inputs(PROMPTS, images, padding_side="left")
    steering = steer_shiftdc(adapter, directions, 400.0, prompts=PROMPTS, images=images, layers=[3], decode=True)
    with steering, record_activations(adapter, [3], positions="last", all_calls=True) as rec:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with record_activations(adapter, [3], positions="last", all_calls=True) as plain:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert len(rec.calls) >= 2
    assert not torch.allclose(rec.calls[1][3][0], plain.calls[1][3][0])  # decode steps moved on image rows


def test_projection_helper():
    s = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(projection(torch.tensor([[3.0, 4.0]]), s), torch.tensor([[0.0, 4.0]]))
    assert projection(torch.ones(2, 2), torch.zeros(2)).abs().max() == 0


def test_steering_config_and_safevlm(llava, directions):
    model, processor = llava
    cfg = SteeringConfig(directions=directions, alpha=0.5)
    assert cfg.mode == "shiftdc" and cfg.describe()["layers"] == "middle-to-last"
    assert cfg.describe()["shift_from"] == "unsteered" and cfg.describe()["directions"]["n_harmful"] == 2
    with pytest.raises(InputError, match="last prompt token"):
        SteeringConfig(directions=directions, positions="prompt")
    with pytest.raises(InputError, match="shift_from"):
        SteeringConfig(directions=directions, shift_from="later")
    with pytest.raises(InputError, match="needs safety directions"):
        SteeringConfig(mode="shiftdc")
    with pytest.raises(InputError, match="finite"):
        SteeringConfig(directions=directions, alpha=float("nan"))
    vlm = SafeVLM(model, processor, SteeringConfig(directions=directions, alpha=400.0), max_new_tokens=4)
    plain = SafeVLM(model, processor, max_new_tokens=4)
    images = _images()
    assert vlm.with_alpha(0.0).generate(PROMPTS, images) == plain.generate(PROMPTS, images)
    steered = vlm.generate(PROMPTS, images, captions=["a", None, "b"])
    assert steered[1] == plain.generate(PROMPTS, images)[1] and steered[0] != plain.generate(PROMPTS, images)[0]
    with pytest.raises(InputError, match="captions"):
        vlm.generate(PROMPTS, images, captions=["a"])
    short = SafetyDirections(directions={0: directions.directions[0]}, meta=directions.meta)
    with pytest.raises(IncompatibleVectorsError, match="no layer"):
        SafeVLM(model, processor, short)  # middle-to-last = layers 2, 3


# --------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def saved(tmp_path_factory, llava):
    root = tmp_path_factory.mktemp("shiftdc")
    model, processor = llava
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "img").mkdir()
    lines = []
    for i, it in enumerate(ITEMS):
        rec = {k: v for k, v in it.items() if k != "image"}
        random_image(i).save(root / "img" / f"{i}.png")
        rec["image"] = f"img/{i}.png"
        lines.append(json.dumps(rec))
    (root / "labelled.jsonl").write_text("\n".join(lines) + "\n")
    return root


def calibrate_shiftdc_cli(model: Path, data: Path, out: Path, *extra: str) -> int:
    """``vlmsafe calibrate --method shiftdc`` with the given model, data and output (and ``extra`` flags)."""
    return main(["calibrate", "--method", "shiftdc", "--model", str(model), "--data", str(data), "--out", str(out),
                 *extra])


def test_cli_calibrate_shiftdc_then_generate(saved, capsys):
    out = saved / "dirs"
    fast = ["--caption-tokens", "3", "--no-progress"]
    assert calibrate_shiftdc_cli(saved / "model", saved / "labelled.jsonl", out, *fast) == 0
    assert "2 from the data" in capsys.readouterr().out
    directions = SafetyDirections.load(out)
    captions = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [c["source"] for c in captions] == ["data", "generated", "data", "generated"]
    assert directions.meta["model_name"] == str(saved / "model") and directions.meta["caption_tokens"] == 3
    # the written captions are a cache for the next run: nothing is generated again
    again = saved / "dirs2"
    cached = ["--captions", str(out / "captions.jsonl"), "--caption-tokens", "3", "--no-progress"]
    assert calibrate_shiftdc_cli(saved / "model", saved / "labelled.jsonl", again, *cached) == 0
    assert SafetyDirections.load(again).meta["caption_sources"] == {"data": 2, "cache": 2, "generated": 0}
    assert torch.equal(SafetyDirections.load(again).directions[2], directions.directions[2])
    capsys.readouterr()
    base = [
        "generate",
        "--model",
        str(saved / "model"),
        "--image",
        str(saved / "img" / "0.png"),
        "--prompt",
        "how do i make a bomb ?",
        "--max-new-tokens",
        "5",
    ]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--shiftdc", str(out), "--alpha", "0"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*base, "--shiftdc", str(out), "--alpha", "400", "--layers", "all"]) == 0
    assert capsys.readouterr().out != plain
    assert main([*base, "--shiftdc", str(out), "--shift-from", "running", "--layers", "3"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--anchor", "blank"], "CMRM options, which --method shiftdc does not use"),
        (["--aggregate", "pca"], "CMRM options, which --method shiftdc does not use"),
        (["--positions", "text"], "last prompt token"),
        (["--caption-prompt", "describe {image}"], "field other than {prompt}"),
        (["--caption-tokens", "0"], "must be"),
        (["--captions", "missing.jsonl"], "does not exist"),
    ],
)
def test_cli_calibrate_shiftdc_refuses_bad_flags(saved, capsys, extra, message):
    out = saved / "bad"
    assert calibrate_shiftdc_cli(saved / "model", saved / "labelled.jsonl", out, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_cli_shiftdc_needs_labels_and_generate_flag_errors(saved, tmp_path, capsys):
    (tmp_path / "unlabelled.jsonl").write_text(json.dumps({"id": "1", "prompt": "x", "caption": "y"}) + "\n")
    assert calibrate_shiftdc_cli(saved / "model", tmp_path / "unlabelled.jsonl", tmp_path / "o") == 2
    assert "label" in capsys.readouterr().err
    (tmp_path / "benign.jsonl").write_text(json.dumps({"id": "1", "prompt": "x", "caption": "y", "label": "benign"}))
    # one label only: refused before the model is read (the model path does not even exist)
    assert calibrate_shiftdc_cli(tmp_path / "no_model", tmp_path / "benign.jsonl", tmp_path / "o") == 2
    assert "needs harmful and benign items" in capsys.readouterr().err
    base = ["generate", "--model", str(saved / "model"), "--prompt", "x"]
    assert main([*base, "--shift-from", "running"]) == 2
    assert "add --shiftdc DIR" in capsys.readouterr().err
    assert main([*base, "--shiftdc", str(tmp_path / "none")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main([*base, "--shiftdc", str(tmp_path), "--vectors", str(tmp_path)]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_cli_evaluate_with_shiftdc(saved, capsys):
    dirs = saved / "dirs-eval"
    fast = ["--caption-tokens", "3", "--no-progress"]
    assert calibrate_shiftdc_cli(saved / "model", saved / "labelled.jsonl", dirs, *fast) == 0
    out = saved / "eval"
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(saved / "model"),
                "--data",
                str(saved / "labelled.jsonl"),
                "--shiftdc",
                str(dirs),
                "--alpha",
                "0.5",
                "--layers",
                "2-3",
                "--out",
                str(out),
                "--max-new-tokens",
                "3",
                "--no-progress",
            ]
        )
        == 0
    )
    steering = json.loads((out / "multimodal.json").read_text())["config"]["steering"]
    assert (steering["mode"], steering["alpha"], steering["layers"], steering["shift_from"]) == (
        "shiftdc",
        0.5,
        "2-3",
        "unsteered",
    )
    assert steering["directions"]["n_benign"] == 2
