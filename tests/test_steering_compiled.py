"""The compiled steering path (``static=True``): same tokens as the hooks, no graph breaks, no recompiles."""

import pytest
import torch
from conftest import hook_ids

from vlmsafe.activations import declare_prompt
from vlmsafe.adapters import get_adapter
from vlmsafe.errors import InputError
from vlmsafe.steering import SafetyDirections, SafeVLM, ShiftVectors, SteeringConfig, steer
from vlmsafe.testing import random_image, tiny_llava

PROMPTS = ["how do i make a bomb ?", "hello", "what colour is the shape in the image ?", "steal car"]
IMAGES = [random_image(1), None, random_image(2), random_image(3)]
CAPTIONS = ["red circle", None, "two green triangles", "the word cat"]
NEW = 6


@pytest.fixture(scope="module")
def llava():
    return tiny_llava(seed=0, num_layers=3)


@pytest.fixture(scope="module")
def vectors(llava):
    model, _ = llava
    torch.manual_seed(0)
    H = model.config.text_config.hidden_size
    return ShiftVectors(shifts={l: torch.randn(H) * 2.0 for l in range(3)},
                        meta={"num_layers": 3, "family": "llava", "model_class": type(model).__name__})


@pytest.fixture(scope="module")
def directions(llava):
    model, _ = llava
    torch.manual_seed(1)
    H = model.config.text_config.hidden_size
    return SafetyDirections(directions={l: torch.randn(H) for l in range(3)},
                            meta={"method": "shiftdc", "num_layers": 3, "family": "llava",
                                  "model_class": type(model).__name__, "caption_prompt": "describe the picture",
                                  "caption_tokens": 3})


def configs(vectors, directions):
    """One steering config per remedy (and per variant whose arithmetic differs)."""
    return {
        "dataset, prompt + decode": SteeringConfig(vectors=vectors, alpha=1.0, positions="prompt", decode=True),
        "dataset, last": SteeringConfig(vectors=vectors, alpha=1.0, positions="last"),
        "sample, own image": SteeringConfig(mode="sample", alpha=1.0, positions="prompt"),
        "sample, blank anchor": SteeringConfig(mode="sample", alpha=1.0, anchor="blank", positions="text"),
        "shiftdc, as published": SteeringConfig(directions=directions, alpha=1.0, layers=[1, 2]),
        "shiftdc, running": SteeringConfig(directions=directions, alpha=1.0, layers=[1, 2], shift_from="running"),
    }


REMEDIES = ["dataset, prompt + decode", "dataset, last", "sample, own image", "sample, blank anchor",
            "shiftdc, as published", "shiftdc, running"]


def run(llava, cfg, batch_size, **replace):
    from dataclasses import replace as dc_replace

    model, processor = llava
    vlm = SafeVLM(model, processor, steering=dc_replace(cfg, **replace), max_new_tokens=NEW, batch_size=batch_size)
    return vlm.generate(PROMPTS, IMAGES, captions=CAPTIONS if cfg.mode == "shiftdc" else None)


@pytest.mark.parametrize("name", REMEDIES)
def test_compiled_path_and_hooks_give_the_same_tokens_and_batch_of_one_equals_batch_of_n(llava, vectors, directions,
                                                                                          name):
    cfg = configs(vectors, directions)[name]
    hooks = run(llava, cfg, 4, static=False)
    assert run(llava, cfg, 4, static=True) == hooks
    assert run(llava, cfg, 1, static=True) == hooks
    assert run(llava, cfg, 1, static=False) == hooks
    plain = SafeVLM(*llava, max_new_tokens=NEW).generate(PROMPTS, IMAGES)
    assert hooks[1] == plain[1]  # the text-only row is never steered
    if name.startswith(("dataset", "sample")):
        assert hooks != plain  # steering changed something, so the comparisons above mean something


def test_decode_steering_reaches_generated_tokens_on_the_compiled_path(llava, vectors):
    model, processor = llava
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(PROMPTS, IMAGES, padding_side="left")
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    out = {}
    for decode in (False, True):
        for static in (False, True):
            with steer(model, vectors, alpha=1.0, positions="last", decode=decode, static=static):
                out[decode, static] = model.generate(**inputs, **kw)
    assert torch.equal(out[True, True], out[True, False]) and torch.equal(out[False, True], out[False, False])
    assert not torch.equal(out[True, True], out[False, True])


def _compile_config():
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, backend="eager", mode=None)  # fullgraph: a graph break raises
    cc._compile_all_devices = True  # transformers compiles on CUDA only unless told
    return cc


def test_static_cache_compiled_generate_matches_hooks_without_graph_breaks_or_recompiles(llava, vectors):
    """transformers compiles the decode step (fullgraph) when the cache is static; steering must ride along,
    also when the model was compiled unsteered first (torch.compile does not guard on hooks added later), and
    leave plain compiled generation plain afterwards."""
    from torch._dynamo.utils import counters

    model, processor = llava
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(PROMPTS, IMAGES, padding_side="left")
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    torch._dynamo.reset()
    plain = model.generate(**inputs, **kw)
    compiled_kw = dict(cache_implementation="static", compile_config=_compile_config())
    assert torch.equal(model.generate(**inputs, **kw, **compiled_kw), plain)  # compiled unsteered first
    before = hook_ids(model)
    graphs = []
    for alpha in (1.0, 0.5):  # a second context (another batch, another alpha) reuses the compiled graph
        with steer(model, vectors, alpha=alpha, positions="prompt", decode=True, static=False):
            hooks = model.generate(**inputs, **kw)
        with steer(model, vectors, alpha=alpha, positions="prompt", decode=True, static=True):
            compiled = model.generate(**inputs, **kw, **compiled_kw)
        assert torch.equal(compiled, hooks) and not torch.equal(compiled, plain)
        assert torch.equal(model.generate(**inputs, **kw, **compiled_kw), plain)  # and back to plain
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 2 and graphs[1] == graphs[0]
    assert hook_ids(model) == before
    torch._dynamo.reset()


def test_steered_decode_step_has_zero_graph_breaks(llava, vectors):
    from transformers import StaticCache

    model, processor = llava
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(PROMPTS, IMAGES, padding_side="left")
    B, P = inputs["input_ids"].shape
    cache = StaticCache(config=model.config, max_cache_len=P + 4)
    torch._dynamo.reset()
    with torch.no_grad(), steer(model, vectors, alpha=1.0, positions="prompt", decode=True, static=True), \
            declare_prompt(model, inputs["input_ids"], inputs["attention_mask"]):
        out = model(**inputs, cache=cache, use_cache=True)
        step = dict(input_ids=out.logits[:, -1].argmax(-1, keepdim=True),
                    attention_mask=torch.cat([inputs["attention_mask"], torch.ones(B, 1, dtype=torch.long)], 1),
                    position_ids=inputs["attention_mask"].sum(1, keepdim=True), cache=cache, use_cache=True)
        explained = torch._dynamo.explain(model)(**step)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_path_refuses_calls_it_cannot_place_in_one_line(llava, vectors):
    model, processor = llava
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(PROMPTS, IMAGES, padding_side="left")
    with steer(model, vectors, alpha=1.0, decode=True, static=True):
        with pytest.raises(InputError, match=r"use_cache=False.*static=False"):
            model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
        with pytest.raises(InputError, match=r"1 token.*static=False"):
            model.generate(input_ids=inputs["input_ids"][:, -1:], max_new_tokens=2, do_sample=False, pad_token_id=0)
    with pytest.raises(InputError, match="static must be True, False or None"):
        SteeringConfig(vectors=vectors, static="yes")


def test_automatic_choice_follows_the_generation_config(llava, vectors):
    model, _ = llava  # compiled by an earlier test through generate(compile_config=...): that alone does not count
    with steer(model, vectors, alpha=1.0) as state:
        assert "static" not in state  # hooks: they also handle use_cache=False and chunked prefill
    model.generation_config.cache_implementation = "static"
    try:
        with steer(model, vectors, alpha=1.0) as state:
            assert state["static"] is True
        with steer(model, vectors, alpha=1.0, static=False) as state:
            assert "static" not in state
    finally:
        model.generation_config.cache_implementation = None


def test_vectors_apply_themselves_as_a_context_manager_or_a_handle(llava, vectors):
    """``vectors.apply(model, alpha=...)`` (as steering-vectors' ``SteeringVector.apply``) = ``steer``."""
    model, processor = llava
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(PROMPTS, IMAGES, padding_side="left")
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    model.generate(**inputs, **kw)  # transformers adds its own hooks on first use
    before = hook_ids(model)
    with steer(model, vectors, alpha=0.7, positions="prompt", decode=True):
        expected = model.generate(**inputs, **kw)
    with vectors.apply(model, alpha=0.7, positions="prompt", decode=True) as handle:
        assert torch.equal(model.generate(**inputs, **kw), expected)
    assert hook_ids(model) == before
    handle = vectors.apply(model, alpha=0.7, positions="prompt", decode=True, static=True)
    assert handle.state["static"] is True and hook_ids(model) != before
    assert torch.equal(model.generate(**inputs, **kw), expected)
    handle.remove()
    handle.remove()  # idempotent
    assert hook_ids(model) == before
    assert not torch.equal(model.generate(**inputs, **kw), expected)
    with pytest.raises(InputError, match="alpha"):
        vectors.apply(model, alpha=-5)


def test_aggregation_strategies_are_callables(llava, tmp_path):
    """``calibrate(aggregate=fn)``: any function of the per-item shifts; the named ones are such functions."""
    from vlmsafe.steering import ShiftVectors as SV
    from vlmsafe.steering import calibrate
    from vlmsafe.steering.cmrm.aggregation import first_principal_component, mean_shift

    model, processor = llava
    items = [(p, random_image(i)) for i, p in enumerate(PROMPTS)]
    kw = dict(layers=[0, 2], progress=False, anchor="noise", batch_size=2)
    named = {a: calibrate(model, processor, items, aggregate=a, **kw) for a in ("mean", "pca")}
    same = {"mean": calibrate(model, processor, items, aggregate=mean_shift, **kw),
            "pca": calibrate(model, processor, items, aggregate=first_principal_component, **kw)}
    for a in ("mean", "pca"):
        for l in (0, 2):
            torch.testing.assert_close(same[a].shifts[l], named[a].shifts[l], atol=1e-6, rtol=0)

    def median(diffs, mean):
        return diffs.median(dim=0).values

    custom = calibrate(model, processor, items, aggregate=median, **kw)
    assert custom.meta["aggregate"] == "custom:median"
    custom.save(tmp_path / "v")
    assert SV.load(tmp_path / "v", model).meta["aggregate"] == "custom:median"  # loads back
    with pytest.raises(InputError, match="return one vector"):
        calibrate(model, processor, items, aggregate=lambda d, m: d, **kw)
    with pytest.raises(InputError, match="aggregate must be one of"):
        calibrate(model, processor, items, aggregate="median", **kw)
