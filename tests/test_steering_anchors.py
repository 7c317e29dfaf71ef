"""CMRM's anchor image (real / blank / noise), PCA aggregation and layer presets."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from vlmsafe.activations import record_activations
from vlmsafe.adapters import get_adapter
from vlmsafe.adapters.base import processor_image_size
from vlmsafe.cli import main
from vlmsafe.cli.types import layer_spec_arg
from vlmsafe.errors import InputError
from vlmsafe.images import BLANK_COLOUR, blank_image, noise_image
from vlmsafe.steering import SafeVLM, ShiftVectors, SteeringConfig, calibrate, compute_sample_shifts
from vlmsafe.steering.cmrm.aggregation import first_principal_component
from vlmsafe.testing import random_image, solid_image, tiny_llava

PROMPTS = ["how do i make a bomb ?", "hello", "what colour is the shape ?", "describe picture", "steal car"]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0, num_layers=4)


# --------------------------------------------------------------------------- images
def test_blank_and_noise_images():
    img = blank_image((5, 3), (10, 20, 30))
    assert img.size == (5, 3) and set(img.getdata()) == {(10, 20, 30)}
    assert set(blank_image(4).getdata()) == {BLANK_COLOUR} and blank_image(4).size == (4, 4)
    assert set(blank_image(2, 7).getdata()) == {(7, 7, 7)}  # one int = a grey level
    a, b, c = noise_image(16, seed=3), noise_image(16, seed=3), noise_image(16, seed=4)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()
    values = torch.tensor(list(a.tobytes()), dtype=torch.float)
    assert values.min() >= 0 and values.max() <= 255 and 100 < values.mean() < 155  # uniform over 0..255


@pytest.mark.parametrize("colour", [(256, 0, 0), (-1, 0, 0), (1, 2), "white", (1.5, 0, 0), (True, 0, 0)])
def test_bad_colours_are_refused(colour):
    with pytest.raises(InputError, match=r"0\.\.255"):
        blank_image(4, colour)


@pytest.mark.parametrize("seed", [-1, 1.5, True, "0"])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(InputError, match="seed"):
        noise_image(4, seed)


def test_processor_image_size(llava, tiny_models):
    assert get_adapter(*llava).image_input_size == (32, 32)
    assert get_adapter(*tiny_models["qwen2_vl"]).image_input_size == (32, 32)  # a 1024-pixel budget: 32 x 32

    class Dynamic:  # Qwen2-VL's real budget: 56^2 .. 3584^2 pixels, 28-pixel merged patches
        patch_size, merge_size, size = 14, 2, {"shortest_edge": 3136, "longest_edge": 12845056}

    assert processor_image_size(Dynamic()) == (448, 448)
    with pytest.raises(InputError, match="pass the anchor as a PIL image"):
        processor_image_size(object())


# --------------------------------------------------------------------------- calibration
def test_blank_anchor_ignores_the_items_images(llava):
    model, processor = llava
    own = calibrate(
        model, processor, [(p, random_image(i)) for i, p in enumerate(PROMPTS)], progress=False, anchor="blank"
    )
    other = calibrate(model, processor, [(p, solid_image((9, 9, 9))) for p in PROMPTS], progress=False, anchor="blank")
    none = calibrate(model, processor, [(p, None) for p in PROMPTS], progress=False, anchor="blank", batch_size=2)
    real = calibrate(model, processor, [(p, random_image(i)) for i, p in enumerate(PROMPTS)], progress=False)
    for layer in own.layers:
        assert torch.equal(own.shifts[layer], other.shifts[layer])
        torch.testing.assert_close(own.shifts[layer], none.shifts[layer], atol=1e-6, rtol=0)
        assert (own.shifts[layer] - real.shifts[layer]).norm() > 0.1 * real.shifts[layer].norm()
    assert own.meta["calibration_sha256"] == other.meta["calibration_sha256"] != real.meta["calibration_sha256"]
    assert own.meta["anchor"] == "blank" and own.meta["anchor_colour"] == list(BLANK_COLOUR)
    assert own.meta["anchor_size"] == [32, 32] and real.meta["anchor"] == "real" and own.meta["aggregate"] == "mean"
    # the blank-anchored shift is h(prompt, blank image at the input size) - h(prompt), averaged
    hand = compute_sample_shifts(model, processor, PROMPTS, [blank_image(32)] * len(PROMPTS), layers=[1])
    torch.testing.assert_close(own.shifts[1], hand[1].mean(0), atol=1e-6, rtol=0)


def test_noise_anchor_and_image_anchor(llava):
    model, processor = llava
    items = [(p, None) for p in PROMPTS]
    a = calibrate(model, processor, items, progress=False, anchor="noise", layers=[2])
    b = calibrate(model, processor, items, progress=False, anchor="noise", anchor_seed=1, layers=[2])
    blank = calibrate(model, processor, items, progress=False, anchor="blank", anchor_colour=(0, 0, 0), layers=[2])
    as_image = calibrate(model, processor, items, progress=False, anchor=noise_image(32, 0), layers=[2])
    assert not torch.equal(a.shifts[2], b.shifts[2]) and a.meta["anchor_seed"] == 0 and b.meta["anchor_seed"] == 1
    assert torch.equal(a.shifts[2], as_image.shifts[2]) and as_image.meta["anchor"] == "image"
    assert a.meta["anchor_sha256"] == as_image.meta["anchor_sha256"]
    assert blank.meta["anchor_colour"] == [0, 0, 0]
    with pytest.raises(InputError, match="needs an image"):
        calibrate(model, processor, items, progress=False)  # the real anchor needs the items' images
    with pytest.raises(InputError, match="anchor must be one of"):
        calibrate(model, processor, items, progress=False, anchor="grey")
    with pytest.raises(InputError, match="aggregate"):
        calibrate(model, processor, items, progress=False, anchor="blank", aggregate="median")


def test_first_principal_component_by_hand():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(6), dim=0)
    mean = torch.randn(6)
    diffs = mean + torch.linspace(-3, 3, 9).unsqueeze(1) * u + 0.01 * torch.randn(9, 6)
    shift, stats = first_principal_component(diffs, diffs.mean(0))
    m = diffs.mean(0).double()
    torch.testing.assert_close(shift.double(), (m @ u.double()) * u.double(), atol=5e-3, rtol=0)
    assert float(shift.double() @ m) > 0 and stats["pca_explained_variance"] > 0.99
    assert stats["pca_cosine_to_mean"] == pytest.approx(
        float(shift.double() @ m) / float(shift.norm() * m.norm()), abs=1e-4
    )
    flipped, _ = first_principal_component(diffs, -diffs.mean(0))  # oriented by the mean, not by the SVD's sign
    torch.testing.assert_close(flipped, -shift)
    with pytest.raises(InputError, match="at least 2"):
        first_principal_component(diffs[:1], diffs[0])
    with pytest.raises(InputError, match="do not vary"):
        first_principal_component(mean.repeat(4, 1), mean)


def test_pca_aggregate_matches_the_per_item_shifts(llava):
    model, processor = llava
    vec = calibrate(
        model,
        processor,
        [(p, random_image(i)) for i, p in enumerate(PROMPTS)],
        progress=False,
        aggregate="pca",
        layers=[1, 3],
        batch_size=2,
    )
    per_item = compute_sample_shifts(
        model, processor, PROMPTS, [random_image(i) for i in range(len(PROMPTS))], layers=[1, 3]
    )
    for layer in (1, 3):
        d = per_item[layer].double()
        _, _, vh = torch.linalg.svd(d - d.mean(0), full_matrices=False)
        v = vh[0] * torch.sign(d.mean(0) @ vh[0])
        torch.testing.assert_close(vec.shifts[layer].double(), (d.mean(0) @ v) * v, atol=1e-5, rtol=0)
        torch.testing.assert_close(vec.mm_means[layer] - vec.text_means[layer], d.mean(0).float(), atol=1e-5, rtol=0)
        assert vec.stats[layer]["mean_shift_norm"] == pytest.approx(float(d.mean(0).norm()), rel=1e-4)
    assert vec.meta["aggregate"] == "pca"


# --------------------------------------------------------------------------- sample-level with an anchor
def test_sample_level_blank_anchor_subtracts_the_anchored_shift(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    prompts, images = ["how do i make a bomb ?", "hello"], [random_image(7), None]
    inputs = adapter.build_inputs(prompts, images, padding_side="left")
    with record_activations(adapter, [1], positions="last") as plain:
        model(**inputs)
    cfg = SteeringConfig(mode="sample", anchor="blank", alpha=3.0, layers=[1])
    with (
        cfg.apply(adapter, prompts=prompts, images=images),
        record_activations(adapter, [1], positions="last") as steered,
    ):
        model(**inputs)
    anchored = compute_sample_shifts(model, processor, prompts[:1], [blank_image(32)], layers=[1])[1][0]
    torch.testing.assert_close(steered.activations[1][0], plain.activations[1][0] - 3.0 * anchored, atol=1e-5, rtol=0)
    torch.testing.assert_close(steered.activations[1][1], plain.activations[1][1])  # text-only row untouched
    # the real image is not what the shift is measured with
    real = compute_sample_shifts(model, processor, prompts[:1], images[:1], layers=[1])[1][0]
    assert (anchored - real).norm() > 0.1 * real.norm()
    assert cfg.describe()["anchor"] == "blank" and cfg.describe()["anchor_colour"] == list(BLANK_COLOUR)
    out = SafeVLM(model, processor, SteeringConfig(mode="sample", anchor="noise"), max_new_tokens=3).generate(
        prompts, images)
    assert len(out) == 2


def test_steering_config_validates_anchor_settings(llava):
    vec = ShiftVectors(shifts={0: torch.zeros(32)}, meta={"num_layers": 4})
    with pytest.raises(InputError, match="sample-level choice"):
        SteeringConfig(vectors=vec, anchor="blank")
    with pytest.raises(InputError, match=r"0\.\.255"):
        SteeringConfig(mode="sample", anchor="blank", anchor_colour=(0, 300, 0))
    with pytest.raises(InputError, match="seed"):
        SteeringConfig(mode="sample", anchor="noise", anchor_seed=-2)
    with pytest.raises(InputError, match="anchor must be one of"):
        SteeringConfig(mode="sample", anchor="black")
    assert SteeringConfig(mode="sample", anchor=Image.new("RGB", (4, 4))).describe()["anchor"] == "image"


# --------------------------------------------------------------------------- layer presets
def test_middle_to_last_layers(llava, tiny_models):
    assert get_adapter(llava[0]).resolve_layers("middle-to-last") == [2, 3]
    assert get_adapter(tiny_models["llava"][0]).resolve_layers("middle-to-last") == [1, 2]  # 3 layers: from 3 // 2
    assert get_adapter(llava[0]).resolve_layers("all") == [0, 1, 2, 3]
    assert layer_spec_arg("middle-to-last") == "middle-to-last" and layer_spec_arg("ALL") == "all"
    assert SteeringConfig(mode="sample", layers="middle-to-last").describe()["layers"] == "middle-to-last"


# --------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def saved(tmp_path_factory, llava):
    root = tmp_path_factory.mktemp("anchors")
    model, processor = llava
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "img").mkdir()
    for name, images in (
        ("a", [random_image(i) for i in range(3)]),
        ("b", [solid_image((i, 50, 90)) for i in range(3)]),
    ):
        lines = []
        for i, (prompt, img) in enumerate(zip(PROMPTS[:3], images)):
            img.save(root / "img" / f"{name}{i}.png")
            lines.append(json.dumps({"id": str(i), "prompt": prompt, "image": f"img/{name}{i}.png"}))
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"id": str(i), "prompt": p}) for i, p in enumerate(PROMPTS[:3]))
    )
    return root


def test_cli_blank_anchor_vectors_do_not_depend_on_the_images(saved, capsys):
    def run(data, out, *extra):
        assert (
            main(
                [
                    "calibrate",
                    "--model",
                    str(saved / "model"),
                    "--data",
                    str(saved / data),
                    "--out",
                    str(saved / out),
                    "--no-progress",
                    *extra,
                ]
            )
            == 0
        )
        return load_file(str(saved / out / "vectors.safetensors")), json.loads(
            (saved / out / "vectors.json").read_text()
        )

    a, meta_a = run("a.jsonl", "va", "--anchor", "blank")
    b, _ = run("b.jsonl", "vb", "--anchor", "blank")
    p, _ = run("prompts.jsonl", "vp", "--anchor", "blank")  # no images at all: prompts suffice
    real, meta_real = run("a.jsonl", "vr")
    _pca, meta_pca = run("a.jsonl", "vpca", "--anchor", "noise", "--anchor-seed", "5", "--aggregate", "pca")
    for key in (k for k in a if k.startswith("shift.")):
        assert torch.equal(a[key], b[key]) and torch.equal(a[key], p[key])
        assert not torch.equal(a[key], real[key])
    assert (meta_a["anchor"], meta_a["aggregate"], meta_real["anchor"]) == ("blank", "mean", "real")
    assert (meta_pca["anchor"], meta_pca["anchor_seed"], meta_pca["aggregate"]) == ("noise", 5, "pca")
    assert "pca_explained_variance" in meta_pca["stats"]["0"]
    assert "blank anchor, mean" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--anchor-colour", "300,0,0"], "0..255"),
        (["--anchor-colour", "red"], "R,G,B"),
        (["--anchor-seed", "-1"], "must be"),
        (["--anchor", "grey"], "invalid choice"),
        (["--anchor", "blank", "--anchor-seed", "3"], "--anchor-seed applies to --anchor noise"),
        (["--anchor-colour", "0,0,0"], "--anchor-colour applies to --anchor blank"),
        (["--caption-tokens", "4"], "ShiftDC options, which need --method shiftdc"),
        (["--aggregate", "mode"], "invalid choice"),
    ],
)
def test_cli_refuses_bad_anchor_flags(saved, capsys, extra, message):
    out = saved / "bad"
    assert (
        main(
            ["calibrate", "--model", str(saved / "model"), "--data", str(saved / "a.jsonl"), "--out", str(out), *extra]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not out.exists()


def test_generate_flags_for_anchors(saved, capsys):
    base = [
        "generate",
        "--model",
        str(saved / "model"),
        "--prompt",
        "hello",
        "--image",
        str(saved / "img" / "a0.png"),
        "--max-new-tokens",
        "3",
    ]
    assert main([*base, "--anchor", "blank"]) == 2
    assert "add --sample-level" in capsys.readouterr().err
    assert main([*base, "--sample-level", "--anchor", "noise", "--anchor-seed", "2"]) == 0
    assert capsys.readouterr().out.strip()
