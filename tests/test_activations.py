import pytest
import torch

from conftest import hook_ids
from vlmsafe.activations import EditPlan, edit_activations, record_activations
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
    with pytest.raises(InputError, match="explicit position mask has shape"):
        with torch.no_grad(), record_activations(adapter, layers=[0], positions=explicit[:, :3]):
            model(**inputs)


def test_hooks_removed_on_exception(tiny_models):
    model, processor = tiny_models["llava"]
    adapter = get_adapter(model, processor)
    inputs = _mixed_batch(adapter, "left")
    model(**inputs, output_hidden_states=True)
    before = hook_ids(model)
    with pytest.raises(RuntimeError, match="boom"):
        with record_activations(adapter, layers="all"):
            raise RuntimeError("boom")
    plan = EditPlan({1: torch.ones(adapter.hidden_size)}, prefill_mask=lambda call: None)
    with pytest.raises(RuntimeError, match="boom"):
        with edit_activations(adapter, plan):
            model(**inputs)
            raise RuntimeError("boom")
    assert hook_ids(model) == before


def test_edit_adds_vector_at_masked_positions_only(tiny_models):
    model, processor = tiny_models["llava"]
    adapter = get_adapter(model, processor)
    inputs = _mixed_batch(adapter, "left")
    vec = torch.randn(adapter.hidden_size)
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states[2]  # output of layer 1
    mask = torch.zeros(inputs["input_ids"].shape)
    mask[0, -1] = 1.0
    mask[2, -3:] = 0.5
    plan = EditPlan({1: vec}, prefill_mask=lambda call: mask, scale=-2.0)
    with torch.no_grad(), edit_activations(adapter, plan):
        edited = model(**inputs, output_hidden_states=True).hidden_states[2]
    expected = base - 2.0 * mask.unsqueeze(-1) * vec
    torch.testing.assert_close(edited, expected, atol=1e-5, rtol=0)
    untouched = mask == 0
    assert torch.equal(edited[untouched], base[untouched])


def test_edit_per_row_vectors_and_decode_steps(tiny_models):
    model, processor = tiny_models["causal_lm"]
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(["hello", "write a poem about cats"])
    per_row = torch.randn(2, adapter.hidden_size) * 5
    seen = {"prefill": 0, "decode": 0}

    def prefill(call):
        seen["prefill"] += 1
        assert call.seq_len == inputs["input_ids"].shape[1]
        return None

    def decode(call):
        seen["decode"] += 1
        assert call.seq_len == 1
        return torch.tensor([[1.0], [0.0]])

    plan = EditPlan({0: per_row}, prefill_mask=prefill, decode_mask=decode)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        with edit_activations(adapter, plan):
            edited = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert seen == {"prefill": 1, "decode": 3}
    assert torch.equal(plain[1], edited[1])  # row 1 never edited
    assert torch.equal(plain[:, : inputs["input_ids"].shape[1] + 1], edited[:, : inputs["input_ids"].shape[1] + 1])


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
