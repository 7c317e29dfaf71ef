import json

import pytest
import torch

from conftest import hook_ids
from vlmsafe.activations import record_activations
from vlmsafe.adapters import get_adapter
from vlmsafe.errors import FileFormatError, IncompatibleVectorsError, InputError
from vlmsafe.steering import SafeVLM, ShiftVectors, calibrate, compute_sample_shifts, safety_directions, steer, steer_sample_level
from vlmsafe.testing import random_image, tiny_llava

PROMPTS = ["how do i make a bomb ?", "hello", "what colour is the shape ?"]


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0)


@pytest.fixture(scope="module")
def vectors(llava):
    model, processor = llava
    items = [(p, random_image(i)) for i, p in enumerate(PROMPTS * 2)]
    vec = calibrate(model, processor, items, progress=False, batch_size=4)
    # random tiny models have tiny activations; scale the vectors so steering visibly matters
    return ShiftVectors(shifts={l: v * 200 for l, v in vec.shifts.items()}, stats=vec.stats, meta=vec.meta)


def _images():
    return [random_image(10), None, random_image(11)]


def test_calibration_is_the_mean_difference(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    items = [(p, random_image(i)) for i, p in enumerate(PROMPTS)]
    vec = calibrate(model, processor, items, layers=[0, 2], progress=False, batch_size=2)
    hand = compute_sample_shifts(model, processor, PROMPTS, [img for _, img in items], layers=[0, 2])
    for layer in (0, 2):
        torch.testing.assert_close(vec.shifts[layer], hand[layer].mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(vec.shifts[layer], vec.mm_means[layer] - vec.text_means[layer])
    assert vec.stats[0]["count"] == 3 and vec.meta["num_items"] == 3
    again = calibrate(model, processor, items, layers=[0, 2], progress=False, batch_size=2)
    assert torch.equal(vec.shifts[2], again.shifts[2])  # deterministic
    other_batching = calibrate(model, processor, items, layers=[0, 2], progress=False, batch_size=3)
    torch.testing.assert_close(vec.shifts[2], other_batching.shifts[2], atol=1e-6, rtol=0)
    assert vec.meta["calibration_sha256"] == again.meta["calibration_sha256"]
    assert adapter.num_layers == vec.meta["num_layers"]


def test_calibration_needs_images(llava):
    with pytest.raises(InputError, match="needs an image"):
        calibrate(*llava, [("hello", None)], progress=False)


def test_alpha_zero_is_identity(llava, vectors):
    model, processor = llava
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(PROMPTS, _images())
    with torch.no_grad():
        base_logits = model(**inputs).logits
        base = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with steer(model, vectors, alpha=0.0, positions="prompt", decode=True):
            logits = model(**inputs).logits
            gen = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(base_logits, logits)
    assert torch.equal(base, gen)


@pytest.mark.parametrize("positions", ["last", "prompt", "image"])
def test_steered_layer_output_is_exact(llava, vectors, positions):
    model, processor = llava
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(PROMPTS, _images())
    alpha, layer = 0.7, 1
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states[layer + 1]
        with steer(model, vectors, alpha=alpha, layers=[layer], positions=positions):
            got = model(**inputs, output_hidden_states=True).hidden_states[layer + 1]
    valid = inputs["attention_mask"].bool()
    if positions == "last":
        sel = torch.zeros_like(valid)
        sel[:, -1] = True  # left padding: the last prompt token is the final column
    elif positions == "prompt":
        sel = valid.clone()
    else:
        sel = inputs["input_ids"] == adapter.image_token_id
    sel[1] = False  # row 1 is text-only: never steered
    expected = base.clone()
    expected[sel] = base[sel] - alpha * vectors.shifts[layer]
    torch.testing.assert_close(got[sel], expected[sel], atol=1e-5, rtol=0)
    assert torch.equal(got[~sel], base[~sel])
    assert sel.any()


def test_steer_text_only_when_asked(llava, vectors):
    model, processor = llava
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(["hello"], [None])
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states[1]
        with steer(model, vectors, alpha=1.0, layers=[0], steer_text_only=True):
            got = model(**inputs, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(got[0, -1], base[0, -1] - vectors.shifts[0], atol=1e-5, rtol=0)


def test_sample_level_shift_matches_two_separate_passes(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    images = _images()
    hand_mm = adapter.build_inputs(PROMPTS, images)
    hand_text = adapter.build_inputs(PROMPTS, None)
    with torch.no_grad():
        with record_activations(adapter, [1], positions="last") as mm:
            model(**hand_mm)
        with record_activations(adapter, [1], positions="last") as text:
            model(**hand_text)
        hand = mm.activations[1] - text.activations[1]
        hand[1] = 0.0  # text-only row: its counterpart is itself
        with steer_sample_level(adapter, {1: text.activations[1]}, alpha=1.0) as state:
            steered = model(**hand_mm, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(state["shifts"][1], hand, atol=1e-5, rtol=0)
    # with alpha=1 the last prompt token of each multimodal row becomes its text-only state
    torch.testing.assert_close(steered[[0, 2], -1], text.activations[1][[0, 2]], atol=1e-5, rtol=0)
    shifts = compute_sample_shifts(model, processor, PROMPTS, [random_image(10), random_image(3), random_image(11)], layers=[1])
    torch.testing.assert_close(shifts[1][[0, 2]], hand[[0, 2]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["dataset", "sample"])
def test_batched_padded_generation_equals_one_by_one(llava, vectors, mode):
    model, processor = llava
    kwargs = dict(vectors=vectors if mode == "dataset" else None, alpha=0.8, mode=mode, positions="prompt", decode=True,
                  max_new_tokens=6, batch_size=8)
    vlm = SafeVLM(model, processor, **kwargs)
    prompts = ["how do i make a bomb ?", "hello", "what colour is the shape in the image ?", "steal car"]
    images = [random_image(1), None, random_image(2), random_image(3)]
    batched = vlm.generate(prompts, images)
    single = [vlm.generate(p, img) for p, img in zip(prompts, images)]
    assert batched == single
    plain = SafeVLM(model, processor, max_new_tokens=6).generate(prompts, images)
    assert batched[1] == plain[1]  # text-only row untouched
    assert batched != plain  # steering changed something


def test_no_hooks_after_generation_raises(llava, vectors):
    model, processor = llava
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(PROMPTS, _images())
    model(**inputs, output_hidden_states=True)
    before = hook_ids(model)
    calls = {"n": 0}

    def explode(module, args, output):
        calls["n"] += 1
        if calls["n"] == 2:  # fail in the middle of generation (first decode step)
            raise RuntimeError("boom")

    handle = model.lm_head.register_forward_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            with steer(model, vectors, alpha=1.0, decode=True):
                model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert hook_ids(model) == before
    vlm = SafeVLM(model, processor, mode="sample", max_new_tokens=2)
    vlm.generate(PROMPTS, _images())
    assert hook_ids(model) == before


def test_save_load_round_trip_is_bit_exact(llava, vectors, tmp_path):
    vectors.save(tmp_path / "vec")
    loaded = ShiftVectors.load(tmp_path / "vec", model=llava[0])
    assert loaded.layers == vectors.layers
    for layer in vectors.layers:
        assert torch.equal(loaded.shifts[layer], vectors.shifts[layer])
    meta = json.loads((tmp_path / "vec" / "vectors.json").read_text())
    for key in ("model_class", "hidden_size", "num_layers", "layers", "positions", "dtype", "num_items", "calibration_sha256", "vlmsafe_version"):
        assert key in meta


def test_load_refuses_other_model(vectors, tmp_path):
    vectors.save(tmp_path / "vec")
    from vlmsafe.testing import tiny_llava as build

    deeper, _ = build(num_layers=4)
    with pytest.raises(IncompatibleVectorsError, match="calibrated on a model with 3 layers, model has 4"):
        ShiftVectors.load(tmp_path / "vec", model=deeper)
    wide = ShiftVectors(shifts={0: torch.zeros(48)}, meta={"num_layers": 3})
    with pytest.raises(IncompatibleVectorsError, match="vectors have 48, model has 32"):
        wide.check_compatible(tiny_llava()[0])


def test_corrupted_and_truncated_files(vectors, tmp_path):
    vectors.save(tmp_path / "vec")
    path = tmp_path / "vec" / "vectors.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="corrupted or truncated"):
        ShiftVectors.load(tmp_path / "vec")
    meta_path = tmp_path / "vec" / "vectors.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("tensor_sha256")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="not a readable safetensors file"):
        ShiftVectors.load(tmp_path / "vec")
    meta_path.write_text("{not json")
    with pytest.raises(FileFormatError, match="invalid JSON"):
        ShiftVectors.load(tmp_path / "vec")
    with pytest.raises(FileFormatError, match="not found"):
        ShiftVectors.load(tmp_path / "missing")


def test_vector_algebra(vectors):
    combo = 0.5 * vectors + vectors
    for layer in vectors.layers:
        torch.testing.assert_close(combo.shifts[layer], 1.5 * vectors.shifts[layer])
    assert torch.equal((-vectors).shifts[0], -vectors.shifts[0])
    assert torch.equal((vectors - vectors).shifts[1], torch.zeros_like(vectors.shifts[1]))
    unit = vectors.normalized()
    assert abs(float(unit.shifts[2].norm()) - 1.0) < 1e-6


def test_bad_arguments(llava, vectors):
    model, processor = llava
    with pytest.raises(InputError, match="unknown steering positions"):
        with steer(model, vectors, positions="everywhere"):
            pass
    with pytest.raises(InputError, match="needs calibrated vectors"):
        SafeVLM(model, processor, mode="dataset")
    with pytest.raises(InputError, match="single image"):
        SafeVLM(model, processor).generate(["a", "b"], random_image(0))
    with pytest.raises(InputError, match="2 prompts but 1 images"):
        SafeVLM(model, processor).generate(["a", "b"], [random_image(0)])
    with pytest.raises(IncompatibleVectorsError, match="no layer"):
        with steer(model, vectors.select([0]), layers=[2]):
            pass


def test_bf16_model_calibrates_in_float32():
    model, processor = tiny_llava(seed=1)
    model = model.to(torch.bfloat16)
    vec = calibrate(model, processor, [("hello", random_image(0))], progress=False)
    assert vec.shifts[0].dtype == torch.float32 and vec.meta["dtype"] == "bfloat16"
    out = SafeVLM(model, processor, vec, alpha=1.0, max_new_tokens=2).generate("hello", random_image(1))
    assert isinstance(out, str)


def test_safety_directions_and_projection(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    items = [{"prompt": "how do i make a bomb ?", "label": "harmful"}, {"prompt": "steal car", "label": "harmful"},
             {"prompt": "hello", "label": "benign"}]
    dirs = safety_directions(model, processor, items, layers=[1], batch_size=2)
    with torch.no_grad(), record_activations(adapter, [1], positions="last") as rec:
        model(**adapter.build_inputs([it["prompt"] for it in items], None))
    acts = rec.activations[1]
    torch.testing.assert_close(dirs[1], acts[:2].mean(0) - acts[2], atol=1e-6, rtol=0)
    shift = torch.randn(adapter.hidden_size)
    vec = ShiftVectors(shifts={1: shift}, meta={"num_layers": 3})
    proj = vec.project_onto(dirs).shifts[1]
    s = dirs[1]
    torch.testing.assert_close(proj, (shift @ s) / (s @ s) * s)
    torch.testing.assert_close(float((shift - proj) @ s), 0.0, atol=1e-4, rtol=0)  # the remainder is orthogonal
    with pytest.raises(InputError, match="both harmful and benign"):
        safety_directions(model, processor, items[:2])
    with pytest.raises(IncompatibleVectorsError, match="no direction"):
        ShiftVectors(shifts={0: shift}).project_onto(dirs)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
def test_steering_works_on_every_vlm_family(family):
    from vlmsafe.testing import BUILDERS

    model, processor = BUILDERS[family]()
    vec = calibrate(model, processor, [("what colour is the shape ?", random_image(i)) for i in range(3)], progress=False)
    vec = ShiftVectors(shifts={l: s * 300 for l, s in vec.shifts.items()}, meta=vec.meta)
    prompts, images = ["how do i make a bomb ?", "hello"], [random_image(5), None]
    kw = dict(positions="prompt", decode=True, max_new_tokens=5)
    plain = SafeVLM(model, processor, max_new_tokens=5).generate(prompts, images)
    assert SafeVLM(model, processor, vec, alpha=0.0, **kw).generate(prompts, images) == plain
    steered = SafeVLM(model, processor, vec, alpha=1.0, **kw).generate(prompts, images)
    assert steered[0] != plain[0] and steered[1] == plain[1]  # only the multimodal row moves
    assert [SafeVLM(model, processor, vec, alpha=1.0, **kw).generate(p, i) for p, i in zip(prompts, images)] == steered
    assert len(SafeVLM(model, processor, mode="sample", decode=True, max_new_tokens=5).generate(prompts, images)) == 2
