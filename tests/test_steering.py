import copy
import json

import pytest
import torch
from conftest import hook_ids
from test_activations import RawAndEdited

from vlmsafe.activations import record_activations
from vlmsafe.adapters import get_adapter
from vlmsafe.errors import FileFormatError, IncompatibleVectorsError, InputError
from vlmsafe.steering import (
    SafeVLM,
    ShiftVectors,
    SteeringConfig,
    calibrate,
    compute_sample_shifts,
    safety_directions,
    steer,
    steer_sample_level,
)
from vlmsafe.steering.cmrm import text_only_states
from vlmsafe.testing import BUILDERS, random_image, tiny_llava

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
    """The hooks are installed at alpha 0 and change nothing: same logits, same generated tokens."""
    model, processor = llava
    adapter = get_adapter(model, processor)
    images = _images()
    inputs = adapter.build_inputs(PROMPTS, images)
    gen_kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    model(**inputs, output_hidden_states=True)
    before = hook_ids(model)
    with torch.no_grad():
        base_logits = model(**inputs).logits
        base = model.generate(**inputs, **gen_kw)
        states = text_only_states(adapter, None, PROMPTS, images)
        for ctx in (steer(model, vectors, alpha=0.0, positions="prompt", decode=True),
                    steer_sample_level(adapter, states, alpha=0.0, positions="prompt")):
            with ctx:
                during: list = []
                spy = lambda m, a, o, seen=during: seen.append(hook_ids(model) - before)
                probe = model.lm_head.register_forward_hook(spy)
                logits = model(**inputs).logits
                probe.remove()
                assert len(during[0]) == 2 + len(vectors.layers)  # entry pre-hook, one per steered layer, the probe
                gen = model.generate(**inputs, **gen_kw)
            assert torch.equal(base_logits, logits)
            assert torch.equal(base.sequences, gen.sequences)
            for a, b in zip(base.logits, gen.logits):
                assert torch.equal(a, b)


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
    other_images = [random_image(10), random_image(3), random_image(11)]
    shifts = compute_sample_shifts(model, processor, PROMPTS, other_images, layers=[1])
    torch.testing.assert_close(shifts[1][[0, 2]], hand[[0, 2]], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["dataset", "sample"])
def test_batched_padded_generation_equals_one_by_one(llava, vectors, mode):
    model, processor = llava
    cfg = SteeringConfig(vectors=vectors if mode == "dataset" else None, alpha=0.8, mode=mode, positions="prompt",
                         decode=mode == "dataset")
    vlm = SafeVLM(model, processor, cfg, max_new_tokens=6, batch_size=8)
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
        with pytest.raises(RuntimeError, match="boom"), steer(model, vectors, alpha=1.0, decode=True):
            model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert hook_ids(model) == before
    vlm = SafeVLM(model, processor, SteeringConfig(mode="sample"), max_new_tokens=2)
    vlm.generate(PROMPTS, _images())
    assert hook_ids(model) == before


def test_save_load_round_trip_is_bit_exact(llava, vectors, tmp_path):
    vectors.save(tmp_path / "vec")
    loaded = ShiftVectors.load(tmp_path / "vec", model=llava[0])
    assert loaded.layers == vectors.layers
    for layer in vectors.layers:
        assert torch.equal(loaded.shifts[layer], vectors.shifts[layer])
    meta = json.loads((tmp_path / "vec" / "vectors.json").read_text())
    for key in ("model_class", "hidden_size", "num_layers", "layers", "positions", "dtype", "num_items",
                "calibration_sha256", "vlmsafe_version"):
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


@pytest.mark.parametrize("edit, message", [
    (lambda t: t["shift.1"].__setitem__(0, float("nan")), "shift.1 holds non-finite values"),
    (lambda t: t.__setitem__("mm_mean.2", torch.zeros(7)), "mm_mean.2 has 7 values, unlike the recorded hidden_size"),
    (lambda t: t.__setitem__("shift.0", torch.zeros(2, 32)), "not a vector of floats"),
])
def test_a_folder_without_checksum_is_still_checked(vectors, tmp_path, edit, message):
    """A hand-made or edited folder carries no tensor_sha256: its values and sizes are checked all the same."""
    from safetensors.torch import load_file, save_file

    vectors.save(tmp_path / "vec")
    path, meta_path = tmp_path / "vec" / "vectors.safetensors", tmp_path / "vec" / "vectors.json"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)
    meta = json.loads(meta_path.read_text())
    meta.pop("tensor_sha256")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match=message):
        ShiftVectors.load(tmp_path / "vec")


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
    with pytest.raises(InputError, match="alpha must be a finite number"), steer(model, vectors, alpha=float("nan")):
        pass
    with pytest.raises(InputError, match="unknown steering positions"), steer(model, vectors, positions="everywhere"):
        pass
    with pytest.raises(InputError, match="needs calibrated vectors"):
        SafeVLM(model, processor, SteeringConfig(mode="dataset"))
    with pytest.raises(InputError, match="single image"):
        SafeVLM(model, processor).generate(["a", "b"], random_image(0))
    with pytest.raises(InputError, match="2 prompts but 1 images"):
        SafeVLM(model, processor).generate(["a", "b"], [random_image(0)])
    with pytest.raises(IncompatibleVectorsError, match="no layer"), steer(model, vectors.select([0]), layers=[2]):
        pass


def test_bf16_model_calibrates_in_float32():
    model, processor = tiny_llava(seed=1)
    items = [("hello", random_image(0)), ("steal car", random_image(1))]
    full = calibrate(model, processor, items, progress=False)
    model = model.to(torch.bfloat16)
    vec = calibrate(model, processor, items, progress=False)
    assert vec.shifts[0].dtype == torch.float32 and vec.meta["dtype"] == "bfloat16"
    for layer in vec.layers:  # the bf16 model's shift, read in float32, is the float32 model's up to bf16 rounding
        scale = float(full.shifts[layer].abs().max())
        torch.testing.assert_close(vec.shifts[layer], full.shifts[layer], atol=0.05 * scale, rtol=0)
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(["hello"], [random_image(2)])
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states[2]
        with steer(model, vec * 100, alpha=1.0, layers=[1]):
            got = model(**inputs, output_hidden_states=True).hidden_states[2]
    assert got.dtype == torch.bfloat16
    step = (-100 * vec.shifts[1]).to(torch.bfloat16)  # the vector is cast to the model dtype once, then added
    assert torch.equal(got[0, -1], base[0, -1] + step)
    assert torch.equal(got[0, :-1], base[0, :-1])


def test_safety_directions_and_projection(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    items = [{"prompt": "how do i make a bomb ?", "label": "harmful"}, {"prompt": "steal car", "label": "harmful"},
             {"prompt": "hello", "label": "benign"}]
    dirs = safety_directions(model, processor, items, layers=[1], batch_size=2)
    with torch.no_grad(), record_activations(adapter, [1], positions="last") as rec:
        model(**adapter.build_inputs([it["prompt"] for it in items], None))
    acts = rec.activations[1]
    torch.testing.assert_close(dirs[1], acts[2] - acts[:2].mean(0), atol=1e-6, rtol=0)  # benign - harmful
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
    items = [("what colour is the shape ?", random_image(i)) for i in range(3)]
    vec = calibrate(model, processor, items, progress=False)
    vec = ShiftVectors(shifts={l: s * 300 for l, s in vec.shifts.items()}, meta=vec.meta)
    prompts, images = ["how do i make a bomb ?", "hello"], [random_image(5), None]
    cfg = SteeringConfig(vectors=vec, positions="prompt", decode=True)
    plain = SafeVLM(model, processor, max_new_tokens=5).generate(prompts, images)
    assert SafeVLM(model, processor, cfg.with_alpha(0.0), max_new_tokens=5).generate(prompts, images) == plain
    steered = SafeVLM(model, processor, cfg, max_new_tokens=5).generate(prompts, images)
    assert steered[0] != plain[0] and steered[1] == plain[1]  # only the multimodal row moves
    one_by_one = SafeVLM(model, processor, cfg, max_new_tokens=5)
    assert [one_by_one.generate(p, i) for p, i in zip(prompts, images)] == steered
    # random tiny models have tiny image/text gaps: a large alpha makes the sample-level shift visible
    sample_vlm = SafeVLM(model, processor, SteeringConfig(mode="sample", alpha=30.0, positions="prompt"),
                         max_new_tokens=5)
    sample = sample_vlm.generate(prompts, images)
    assert sample[0] != plain[0] and sample[1] == plain[1]


def _generate_both_ways(model, inputs, **kw):
    """Greedy tokens with and without a KV cache (the image token is suppressed: a random tiny model
    may emit it, and re-reading it without a cache is an error in the model itself)."""
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, suppress_tokens=[model.config.image_token_id], **kw)
    return model.generate(**inputs, **kw), model.generate(**inputs, use_cache=False, **kw)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_steering_does_not_depend_on_the_kv_cache(family):
    """use_cache=False re-runs prompt and generated tokens at every step; they are steered as with a cache."""
    model, processor = BUILDERS[family]()
    adapter = get_adapter(model, processor)
    vec = calibrate(model, processor, [(p, random_image(i)) for i, p in enumerate(PROMPTS)], progress=False)
    vec = vec * 300
    images = _images()
    inputs = adapter.build_inputs(PROMPTS, images)
    with torch.no_grad():
        plain, _ = _generate_both_ways(model, inputs)
        outs = {}
        for positions, decode in (("last", False), ("prompt", True), ("prompt", False)):
            with steer(model, vec, alpha=1.0, positions=positions, decode=decode):
                cached, uncached = _generate_both_ways(model, inputs)
            assert torch.equal(cached, uncached), (positions, decode)
            outs[f"{positions} decode={decode}"] = cached
        # decode=True steered the generated tokens
        assert not torch.equal(outs["prompt decode=True"], outs["prompt decode=False"])
        states = text_only_states(adapter, None, PROMPTS, images)
        for positions in ("last", "prompt"):
            with steer_sample_level(adapter, states, alpha=30.0, positions=positions):  # tiny gaps: large alpha
                cached, uncached = _generate_both_ways(model, inputs)
            assert torch.equal(cached, uncached), ("sample", positions)
            outs["sample " + positions] = cached
    for name, out in outs.items():
        assert not torch.equal(out[0], plain[0]), name  # steering changed the multimodal rows
        assert torch.equal(out[1], plain[1]), name  # and left the text-only row alone


def test_prompt_continued_on_a_filled_cache_is_steered(llava, vectors):
    """Multi-turn chat: the second turn's prompt tokens are steered when they enter the cache."""
    model, processor = llava
    adapter = get_adapter(model, processor)
    images = [random_image(4), None]
    first = adapter.build_inputs(PROMPTS[:2], images)
    with torch.no_grad():
        out = model.generate(**first, max_new_tokens=3, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                             suppress_tokens=[adapter.image_token_id])
    turn = processor.tokenizer(["tell me story"] * 2, return_tensors="pt", add_special_tokens=False)
    ids = torch.cat([out.sequences, turn["input_ids"]], 1)
    mask = torch.cat([first["attention_mask"], torch.ones_like(out.sequences[:, first["input_ids"].shape[1]:]),
                      turn["attention_mask"]], 1)
    new = turn["input_ids"].shape[1] + 1
    layer, alpha = 1, 0.5
    deltas = {}
    for positions in ("prompt", "last"):
        with torch.no_grad(), steer(model, vectors, alpha=alpha, layers=[layer], positions=positions), \
                RawAndEdited(adapter.layers[layer]) as spy:
            model.generate(input_ids=ids, attention_mask=mask, past_key_values=copy.deepcopy(out.past_key_values),
                           max_new_tokens=2, do_sample=False, pad_token_id=0)
        first, *rest = spy.deltas()
        # the first call holds the uncached tail: turn one's last generated token (never fed back) and the new turn
        assert first.shape[1] == new
        deltas[positions] = first
        assert all(not d.any() for d in rest)  # decode=False: generated tokens untouched
    step = -alpha * vectors.shifts[layer]
    torch.testing.assert_close(deltas["prompt"][0], step.expand(new, -1), atol=1e-5, rtol=0)  # row 0 had an image
    torch.testing.assert_close(deltas["last"][0, -1], step, atol=1e-5, rtol=0)
    assert torch.equal(deltas["last"][0, :-1], torch.zeros_like(deltas["last"][0, :-1]))
    assert torch.equal(deltas["prompt"][1], torch.zeros_like(deltas["prompt"][1]))  # text-only conversation


def test_sample_level_refuses_decode_steering(llava):
    model, _ = llava
    states = {0: torch.zeros(1, 32)}
    with pytest.raises(InputError, match=r"no text-only counterpart.*dataset-level"), \
            steer_sample_level(model, states, decode=True):
        pass
    with pytest.raises(InputError, match="cannot steer generated tokens"):
        SteeringConfig(mode="sample", decode=True)


def test_calibration_reads_text_positions_only(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    prompts, images = PROMPTS[:2], [random_image(5), random_image(6)]
    with pytest.raises(InputError, match=r"positions='prompt'.*no text-only counterpart.*'text'"):
        calibrate(model, processor, list(zip(prompts, images)), positions="prompt", progress=False)
    with pytest.raises(InputError, match="positions='prompt'"):
        compute_sample_shifts(model, processor, prompts, images, positions="prompt")
    vec = calibrate(model, processor, list(zip(prompts, images)), layers=[1], positions="text", progress=False)
    mm, text = adapter.build_pair(prompts, images)
    with torch.no_grad():
        mm_h = model(**mm, output_hidden_states=True).hidden_states[2]
        text_h = model(**text, output_hidden_states=True).hidden_states[2]
    mm_sel = mm["attention_mask"].bool() & (mm["input_ids"] != adapter.image_token_id)
    text_sel = text["attention_mask"].bool()
    hand = torch.stack([mm_h[i][mm_sel[i]].mean(0) - text_h[i][text_sel[i]].mean(0) for i in range(2)]).mean(0)
    torch.testing.assert_close(vec.shifts[1], hand, atol=1e-5, rtol=0)


def test_sample_level_text_pass_is_small_and_nan_safe(llava):
    model, processor = llava
    adapter = get_adapter(model, processor)
    images = _images()
    seen = []
    shape = lambda m, a, k: seen.append(tuple(k["input_ids"].shape))
    handle = model.register_forward_pre_hook(shape, with_kwargs=True)
    try:
        states = text_only_states(adapter, None, PROMPTS, images, layers=[1])
    finally:
        handle.remove()
    text = adapter.build_inputs([PROMPTS[0], PROMPTS[2]], None)
    assert seen == [tuple(text["input_ids"].shape)]  # one pass over the two rows that have an image
    with torch.no_grad(), record_activations(adapter, [1], positions="last") as rec:
        model(**text)
    torch.testing.assert_close(states[1][[0, 2]], rec.activations[1], atol=1e-6, rtol=0)
    assert torch.equal(states[1][1], torch.zeros(adapter.hidden_size))

    # an inf at padded positions of the steered layer never reaches the shift or the steered rows
    inputs = adapter.build_inputs(PROMPTS, images)
    pad = inputs["attention_mask"] == 0
    assert pad[1].any()

    def poison(module, args, out):
        out = out.clone()
        out[pad] = float("inf")
        return out

    with torch.no_grad():
        with steer_sample_level(adapter, states, alpha=1.0) as clean:
            clean_out = model(**inputs, output_hidden_states=True).hidden_states[2]
        handle = adapter.layers[1].register_forward_hook(poison)
        try:
            with steer_sample_level(adapter, states, alpha=1.0) as dirty:
                dirty_out = model(**inputs, output_hidden_states=True).hidden_states[2]
        finally:
            handle.remove()
    assert torch.isfinite(dirty["shifts"][1]).all()
    assert torch.equal(dirty["shifts"][1], clean["shifts"][1])
    assert torch.equal(dirty_out[~pad], clean_out[~pad])


@pytest.mark.parametrize("alpha", [-1.0, 1e308, float("nan")])
def test_steering_config_refuses_alpha_outside_its_range(alpha):
    # negative: CMRM reversed (further from the text-only distribution); huge: hidden states overflow
    with pytest.raises(InputError, match=r"alpha must be"):
        SteeringConfig(mode="sample", alpha=alpha)
    assert SteeringConfig(mode="sample", alpha=0.0).alpha == 0.0  # 0 = unsteered stays allowed
