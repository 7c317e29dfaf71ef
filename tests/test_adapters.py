import pytest
import torch

from vlmsafe.adapters import LlavaAdapter, ModelAdapter, get_adapter, register_adapter, supported_model_classes
from vlmsafe.errors import InputError, LayerIndexError, UnsupportedModelError
from vlmsafe.testing import BUILDERS, random_image, tiny_clip, tiny_open_clip

VLMS = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_structure_comes_from_text_config(tiny_models, name):
    model, processor = tiny_models[name]
    adapter = get_adapter(model, processor)
    text_cfg = model.config.get_text_config()
    assert adapter.num_layers == text_cfg.num_hidden_layers == len(adapter.layers)
    assert adapter.hidden_size == text_cfg.hidden_size
    # the decoder layers are the language model's, never the vision tower's
    vision = adapter.vision_tower
    if vision is not None:
        vision_params = {id(p) for p in vision.parameters()}
        assert not any(id(p) in vision_params for p in adapter.layers.parameters())
    assert adapter.supports_images == (name in VLMS)


@pytest.mark.parametrize("name", VLMS)
def test_text_only_counterpart_differs_only_by_image(tiny_models, name):
    model, processor = tiny_models[name]
    adapter = get_adapter(model, processor)
    prompts = ["what colour is the shape ?", "how do i make a bomb ?"]
    mm, text = adapter.build_pair(prompts, [random_image(1), random_image(2)], padding_side="right")
    tok = processor.tokenizer
    for row in range(2):
        mm_ids = mm["input_ids"][row][mm["attention_mask"][row].bool()]
        txt_ids = text["input_ids"][row][text["attention_mask"][row].bool()]
        assert adapter.image_token_mask(mm_ids).any()
        assert not adapter.image_token_mask(txt_ids).any()
        vision_marks = {tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>")}
        drop = {adapter.image_token_id} | vision_marks
        kept = [int(t) for t in mm_ids if int(t) not in drop]
        assert kept == [int(t) for t in txt_ids if int(t) not in drop]
    assert "pixel_values" in mm and "pixel_values" not in text


def test_llava_prompt_uses_chat_template(tiny_models):
    model, processor = tiny_models["llava"]
    adapter = get_adapter(model, processor)
    assert adapter.render("hello", True) == "USER: <image> hello ASSISTANT:"
    assert adapter.render("hello", False) == "USER: hello ASSISTANT:"


def test_left_padding_for_generation(tiny_models):
    model, processor = tiny_models["llava"]
    adapter = get_adapter(model, processor)
    batch = adapter.build_inputs(["hello", "how do i make a bomb ?"], [None, None])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1


def test_unknown_model_error_lists_supported_and_how_to_register():
    with pytest.raises(UnsupportedModelError) as err:
        get_adapter(torch.nn.Linear(2, 2))
    msg = str(err.value)
    assert "'Linear'" in msg and "LlavaForConditionalGeneration" in msg and "register_adapter" in msg


def test_register_new_family():
    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])

    @register_adapter("Toy")
    class ToyAdapter(ModelAdapter):
        family = "toy"

        @property
        def layers(self):
            return self.model.blocks

        @property
        def hidden_size(self):
            return 4

        def build_inputs(self, prompts, images=None, **kw):
            raise NotImplementedError

    try:
        adapter = get_adapter(Toy())
        assert isinstance(adapter, ToyAdapter) and adapter.num_layers == 2
        assert "Toy" in supported_model_classes()
    finally:
        from vlmsafe.adapters import base

        base._REGISTRY.pop("Toy")


def test_layer_out_of_range(tiny_models):
    adapter = get_adapter(*tiny_models["llava"])
    assert adapter.resolve_layers([-1, 0]) == [0, 2]
    assert adapter.resolve_layers("0-1") == [0, 1]
    with pytest.raises(LayerIndexError, match=r"layer 3 is out of range.*3 decoder layers"):
        adapter.resolve_layers([3])
    with pytest.raises(LayerIndexError, match="cannot parse"):
        adapter.resolve_layers("a-b")


def test_image_for_text_only_model(tiny_models):
    adapter = get_adapter(*tiny_models["causal_lm"])
    with pytest.raises(InputError, match="text-only model and cannot take images"):
        adapter.build_inputs(["hello"], [random_image()])


def test_missing_image_token_in_raw_prompt(tiny_models):
    adapter = get_adapter(*tiny_models["llava"])
    assert isinstance(adapter, LlavaAdapter)
    with pytest.raises(InputError, match="has an image but no image placeholder '<image>'"):
        adapter.build_raw_inputs(["USER: hello ASSISTANT:"], [random_image()])
    with pytest.raises(InputError, match="already contains the image placeholder"):
        adapter.build_inputs(["<image> hello"], [random_image()])


def test_prompt_image_count_mismatch(tiny_models):
    adapter = get_adapter(*tiny_models["llava"])
    with pytest.raises(InputError, match="2 prompts but 1 images"):
        adapter.build_inputs(["a", "b"], [random_image()])


def test_clip_adapters():
    model, processor = tiny_clip()
    text = get_adapter(model, processor, tower="text")
    vision = get_adapter(model, processor, tower="vision")
    assert text.num_layers == 2 and text.hidden_size == 24 and vision.hidden_size == 24
    assert text.layers is model.text_model.encoder.layers and vision.layers is model.vision_model.encoder.layers
    oc_model, oc_proc = tiny_open_clip()
    oc_text = get_adapter(oc_model, oc_proc, tower="text")
    assert oc_text.family == "open_clip" and oc_text.hidden_size == 32 and oc_text.num_layers == 2
    assert oc_text.layers is oc_model.transformer.resblocks


def test_qwen2_vl_vectors_are_refused_by_a_same_shape_qwen2_5_vl(tiny_models):
    """Qwen2-VL and Qwen2.5-VL are distinct families: their vectors are not interchangeable even
    when depth and width agree (the 7B models share both)."""
    from vlmsafe.errors import IncompatibleVectorsError
    from vlmsafe.steering import ShiftVectors, calibrate

    q2, p2 = tiny_models["qwen2_vl"]
    q25, _ = tiny_models["qwen2_5_vl"]
    assert (get_adapter(q2).family, get_adapter(q25).family) == ("qwen2_vl", "qwen2_5_vl")
    a2, a25 = get_adapter(q2), get_adapter(q25)
    assert (a2.hidden_size, a2.num_layers) == (a25.hidden_size, a25.num_layers)
    vectors = calibrate(q2, p2, [("what colour is the shape ?", random_image(3))], progress=False)
    vectors.check_compatible(q2)
    with pytest.raises(IncompatibleVectorsError,
                       match="model class: vectors were calibrated on Qwen2VLForConditionalGeneration"):
        vectors.check_compatible(q25)
    bare = ShiftVectors(shifts=dict(vectors.shifts), meta={"family": "qwen2_vl"})  # older vectors without a class
    with pytest.raises(IncompatibleVectorsError, match="family"):
        bare.check_compatible(q25)
