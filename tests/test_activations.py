
import pytest
import torch
from conftest import hook_ids

from vlmsafe.activations import EditPlan, declare_prompt, edit_activations, gather_rows, record_activations
from vlmsafe.adapters import get_adapter
from vlmsafe.errors import InputError
from vlmsafe.testing import BUILDERS, random_image, tiny_clip, tiny_open_clip

PROMPTS = ["what colour is the shape ?", "how do i make a bomb ?", "describe the picture"]


def _mixed_batch(adapter, padding_side):
    images = [random_image(1), None, random_image(2)] if adapter.supports_images else None
    return adapter.build_inputs(PROMPTS, images, padding_side=padding_side)


def _final_norm(model):
    for name in ("model.language_model.norm", "model.norm"):
        obj = model
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AssertionError("no final norm")


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_recording_matches_output_hidden_states(tiny_models, name, padding_side):
    model, processor = tiny_models[name]
    adapter = get_adapter(model, processor)
    inputs = _mixed_batch(adapter, padding_side)
    model(**inputs, output_hidden_states=True)  # let transformers install its own lazy hooks first
    before = hook_ids(model)
    with torch.no_grad(), record_activations(adapter, layers="all", positions="prompt") as rec:
        out = model(**inputs, output_hidden_states=True)
    with torch.no_grad(), record_activations(adapter, layers="all", positions="last") as last:
        model(**inputs)
    assert hook_ids(model) == before
    mask = inputs["attention_mask"].bool()
    n = adapter.num_layers
    for layer in range(n):
        got = rec.activations[layer]
        assert got.dtype == torch.float32 and got.device.type == "cpu"
        if layer < n - 1:
            ref = out.hidden_states[layer + 1]
        else:  # transformers returns the last layer after the final norm
            ref = out.hidden_states[-1]
            got = _final_norm(model)(got)
        torch.testing.assert_close(got, ref[mask], atol=1e-5, rtol=0)
        # "last" = last non-padding token of each row
        idx = mask.long().cumsum(1).argmax(1)
        if layer < n - 1:
            torch.testing.assert_close(last.activations[layer], ref[torch.arange(3), idx], atol=1e-5, rtol=0)
    assert last.activations[0].shape == (3, adapter.hidden_size)
    assert torch.equal(last.row_index, torch.arange(3))


def test_image_and_text_positions(tiny_models):
    model, processor = tiny_models["llava"]
    adapter = get_adapter(model, processor)
    inputs = _mixed_batch(adapter, "left")
    with torch.no_grad(), record_activations(adapter, layers=[0], positions="image") as img:
        model(**inputs)
    with torch.no_grad(), record_activations(adapter, layers=[0], positions="text") as txt:
        model(**inputs)
    image_mask = inputs["input_ids"] == adapter.image_token_id
    assert img.activations[0].shape[0] == int(image_mask.sum())
    assert set(img.row_index.tolist()) == {0, 2}  # row 1 is text-only
    valid = inputs["attention_mask"].bool()
    assert txt.activations[0].shape[0] == int((valid & ~image_mask).sum())
    explicit = torch.zeros_like(valid)
    explicit[1, -2:] = True
    with torch.no_grad(), record_activations(adapter, layers=[0], positions=explicit) as ex:
        model(**inputs)
    assert ex.row_index.tolist() == [1, 1]
    with (
        pytest.raises(InputError, match="explicit position mask has shape"),
        torch.no_grad(),
        record_activations(adapter, layers=[0], positions=explicit[:, :3]),
    ):
        model(**inputs)


def test_hooks_removed_on_exception(tiny_models):
    model, processor = tiny_models["llava"]
    adapter = get_adapter(model, processor)
    inputs = _mixed_batch(adapter, "left")
    model(**inputs, output_hidden_states=True)
    before = hook_ids(model)
    with pytest.raises(RuntimeError, match="boom"), record_activations(adapter, layers="all"):
        raise RuntimeError("boom")
    plan = EditPlan({1: torch.ones(adapter.hidden_size)}, positions="prompt", decode=True)
    with pytest.raises(RuntimeError, match="boom"), edit_activations(adapter, plan):
        during = []
        probe = model.lm_head.register_forward_hook(lambda m, a, o: during.append(hook_ids(model)))
        model(**inputs)
        probe.remove()
        assert len(during[0] - before) == 3  # entry pre-hook, one hook on the edited layer, the probe
        raise RuntimeError("boom")
    assert hook_ids(model) == before
    assert "generate" not in model.__dict__  # the generate wrapper is gone too


def test_edit_adds_vector_at_masked_positions_only(tiny_models):
    model, processor = tiny_models["llava"]
    adapter = get_adapter(model, processor)
    inputs = _mixed_batch(adapter, "left")
    vec = torch.randn(adapter.hidden_size)
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states[2]  # output of layer 1
    mask = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    mask[0, -1] = True
    mask[2, -3:] = True
    plan = EditPlan({1: vec}, positions=mask, scale=-2.0)
    with torch.no_grad(), edit_activations(adapter, plan):
        edited = model(**inputs, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(edited[mask], base[mask] - 2.0 * vec, atol=1e-5, rtol=0)
    assert torch.equal(edited[~mask], base[~mask])


class RawAndEdited:
    """Per forward call, a layer's output before vlmsafe's edit (its own forward) and after every hook."""

    def __init__(self, layer):
        self.layer, self.raw, self.edited = layer, [], []

    def __enter__(self):
        forward = self.layer.forward

        def spy(*args, **kwargs):
            out = forward(*args, **kwargs)
            self.raw.append(out.clone())
            return out

        self.layer.forward = spy
        self.handle = self.layer.register_forward_hook(lambda m, a, out: self.edited.append(out.clone()))
        return self

    def __exit__(self, *exc):
        del self.layer.forward
        self.handle.remove()

    def deltas(self):
        assert len(self.raw) == len(self.edited)
        return [e - r for r, e in zip(self.raw, self.edited)]


@pytest.mark.parametrize("use_cache", [True, False])
def test_prompt_and_generated_positions_are_edited_by_absolute_position(tiny_models, use_cache):
    """The same edit lands on the same positions whether or not generate keeps a KV cache."""
    model, processor = tiny_models["causal_lm"]
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(["hello", "write a poem about cats"])
    P, new = inputs["input_ids"].shape[1], 4
    vec = torch.randn(adapter.hidden_size)
    plan = EditPlan({0: vec}, positions="last", decode=True, rows=lambda prompt: torch.tensor([True, False]))
    with torch.no_grad(), edit_activations(adapter, plan), RawAndEdited(adapter.layers[0]) as spy:
        model.generate(**inputs, max_new_tokens=new, do_sample=False, pad_token_id=0, use_cache=use_cache)
    deltas = spy.deltas()
    assert len(deltas) == new
    for step, delta in enumerate(deltas):
        T = delta.shape[1]
        start = 0 if not use_cache else (0 if step == 0 else P + step - 1)
        expected = torch.zeros_like(delta)
        for col in range(T):
            pos = start + col
            if pos == P - 1 or pos >= P:  # the last prompt token (left padding) and every generated token
                expected[0, col] = vec
        torch.testing.assert_close(delta, expected, atol=1e-6, rtol=0)  # row 1 is never edited


def test_chunked_prefill_edits_the_last_prompt_token_once(tiny_models):
    model, processor = tiny_models["causal_lm"]
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(["hello", "write a poem about cats"])  # 9 tokens: chunks of 4, 4 and 1
    vec = torch.randn(adapter.hidden_size)
    plan = EditPlan({0: vec}, positions="last")
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        with edit_activations(adapter, plan), RawAndEdited(adapter.layers[0]) as spy:
            chunked = model.generate(**inputs, prefill_chunk_size=4, **kw)
        with edit_activations(adapter, plan):
            whole = model.generate(**inputs, **kw)
    assert torch.equal(chunked, whole)
    edited = [[(i, *pos) for pos in d.abs().sum(-1).nonzero().tolist()] for i, d in enumerate(spy.deltas())]
    assert edited == [[], [], [(2, 0, 0), (2, 1, 0)], [], []]


def test_decode_false_leaves_generated_tokens_alone(tiny_models):
    model, processor = tiny_models["causal_lm"]
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(["write a poem about cats"])
    vec = torch.randn(adapter.hidden_size)
    plan = EditPlan({0: vec}, positions="prompt", decode=False)
    with torch.no_grad(), edit_activations(adapter, plan), RawAndEdited(adapter.layers[0]) as spy:
        model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, use_cache=False)
    P = inputs["input_ids"].shape[1]
    for delta in spy.deltas():
        torch.testing.assert_close(delta[0, :P], vec.expand(P, -1), atol=1e-6, rtol=0)
        assert torch.equal(delta[0, P:], torch.zeros_like(delta[0, P:]))


def test_layer_hooks_are_attached_only_while_a_call_edits(tiny_models):
    model, processor = tiny_models["causal_lm"]
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(["write a poem about cats"])
    seen, base = [], len(adapter.layers[1]._forward_hooks)  # transformers may keep its own output-capturing hook
    count = lambda m, a, o: seen.append(len(adapter.layers[1]._forward_hooks) - base)
    probe = model.lm_head.register_forward_hook(count)
    plan = EditPlan({1: torch.ones(adapter.hidden_size)}, positions="last")
    try:
        with torch.no_grad(), edit_activations(adapter, plan):
            model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    finally:
        probe.remove()
    assert seen == [1, 0, 0]  # the prefill edits; prompt-only steering leaves decode steps hook-free


def test_manual_decoding_loop_declares_its_prompt(tiny_models):
    """Outside generate each call is its own prompt; declare_prompt makes later calls generated tokens."""
    model, processor = tiny_models["causal_lm"]
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(["write a poem about cats"])
    vec = torch.randn(adapter.hidden_size)
    plan = EditPlan({0: vec}, positions="last", decode=False)
    for declared in (False, True):
        with torch.no_grad(), edit_activations(adapter, plan), RawAndEdited(adapter.layers[0]) as spy:
            ctx = declare_prompt(model, inputs["input_ids"], inputs["attention_mask"]) if declared else None
            with ctx or torch.no_grad():
                out = model(**inputs, use_cache=True)
                mask = torch.cat([inputs["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
                step = out.logits[:, -1:].argmax(-1)
                model(input_ids=step, attention_mask=mask, past_key_values=out.past_key_values)
        prefill, step = spy.deltas()
        torch.testing.assert_close(prefill[0, -1], vec, atol=1e-6, rtol=0)
        assert torch.equal(prefill[0, :-1], torch.zeros_like(prefill[0, :-1]))
        expected_step = torch.zeros_like(step) if declared else vec.expand_as(step)
        torch.testing.assert_close(step, expected_step, atol=1e-6, rtol=0)


def test_selection_is_nan_safe(tiny_models):
    """A non-finite value at an unselected (padded) position never reaches a selected row."""
    hidden = torch.randn(2, 4, 3)
    hidden[0, 0] = float("inf")  # a padded position
    hidden[1, 1] = float("nan")
    got = gather_rows(hidden, torch.tensor([3, -1]))
    assert torch.equal(got[0], hidden[0, 3]) and torch.equal(got[1], torch.zeros(3))

    model, processor = tiny_models["llava"]
    adapter = get_adapter(model, processor)
    inputs = _mixed_batch(adapter, "left")
    pad = inputs["attention_mask"] == 0
    assert pad.any()
    last = adapter.layers[adapter.num_layers - 1]

    def poison(module, args, out):
        out = out.clone()
        out[pad] = float("inf")
        return out

    handle = last.register_forward_hook(poison)
    try:
        with torch.no_grad(), record_activations(adapter, [adapter.num_layers - 1], positions="prompt") as rec:
            model(**inputs)
    finally:
        handle.remove()
    means = rec.per_row_mean(adapter.num_layers - 1, 3)
    assert torch.isfinite(means).all()
    assert rec.activations[adapter.num_layers - 1].shape[0] == int(inputs["attention_mask"].sum())


def test_stop_early_runs_only_up_to_the_deepest_layer(tiny_models):
    model, processor = tiny_models["llava"]
    adapter = get_adapter(model, processor)
    inputs = _mixed_batch(adapter, "left")
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i))
               for i, layer in enumerate(adapter.layers)]
    head = model.lm_head.register_forward_hook(lambda m, a, o: ran.append("head"))
    try:
        with torch.no_grad(), record_activations(adapter, [0, 1], positions="last") as full:
            model(**inputs)
        ran.clear()
        with torch.no_grad(), record_activations(adapter, [0, 1], positions="last", stop_early=True) as early:
            model(**inputs)
            raise AssertionError("not reached: the forward pass stops after layer 1")
    finally:
        for h in [*handles, head]:
            h.remove()
    assert ran == [0, 1]
    for layer in (0, 1):
        assert torch.equal(early.activations[layer], full.activations[layer])


def test_recording_on_clip_towers():
    model, processor = tiny_clip()
    text = get_adapter(model, processor, tower="text")
    inputs = text.build_inputs(["a red circle", "three blue squares here"])
    with torch.no_grad(), record_activations(text, layers="all", positions="prompt") as rec:
        out = model.text_model(**inputs, output_hidden_states=True)
    mask = inputs["attention_mask"].bool()
    torch.testing.assert_close(rec.activations[0], out.hidden_states[1][mask], atol=1e-5, rtol=0)

    oc_model, oc_proc = tiny_open_clip()
    oc_text = get_adapter(oc_model, oc_proc, tower="text")
    tokens = oc_text.build_inputs(["a red circle"])
    with torch.no_grad(), record_activations(oc_text, layers=[1], positions=None) as full:
        oc_model.encode_text(tokens["input_ids"])
    assert full.activations[1].shape == (1, 16, 32)
    vision = get_adapter(oc_model, oc_proc, tower="vision")
    pixels = vision.build_inputs(images=[random_image(0)])
    with torch.no_grad(), record_activations(vision, layers=[0], positions=None) as vis:
        oc_model.encode_image(pixels["pixel_values"])
    assert vis.activations[0].shape == (1, 17, 32)
