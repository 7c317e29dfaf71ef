"""The generic adapter: chosen only without an explicit one, says what it guessed, never picks the wrong layers,
and refuses structures it cannot read; plus the walk over every image-text-to-text class of transformers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from vlmsafe.adapters import GenericVLMAdapter, GuessedAdapterWarning, get_adapter
from vlmsafe.adapters.base import adapter_class_for
from vlmsafe.adapters.generic import _CACHE
from vlmsafe.errors import UnsupportedModelError
from vlmsafe.steering import SafeVLM, calibrate, steer
from vlmsafe.testing import random_image, tiny_llava, tiny_text_config, tiny_vision_config
from vlmsafe.testing.families import FAMILY_BUILDERS, shrunk_config, walk_image_text_to_text

#: Families with an explicit adapter (the walk must find each as explicit, never generic).
EXPLICIT = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", *FAMILY_BUILDERS}
#: Generic ones cheap enough to run a real forward on every test run (the rest: ``-m slow``).
FAST_FORWARD = ("vipllava", "llava_next_video", "video_llava", "got_ocr2", "lighton_ocr", "aria")


@pytest.fixture(scope="module")
def walk():
    models: dict = {}
    rows = walk_image_text_to_text(models=models)
    return rows, models


def test_walk_reports_every_image_text_to_text_class(walk):
    rows, _ = walk
    by_status: dict[str, list] = {}
    for model_type, cls, status, detail in rows:
        by_status.setdefault(status, []).append(model_type)
        assert detail, (model_type, status)
        print(f"{model_type:28} {cls:48} {status:11} {detail[:110]}")  # the report (pytest -s)
    assert set(by_status["explicit"]) >= EXPLICIT
    assert not EXPLICIT & set(by_status.get("generic", []))
    generic, refused = len(by_status.get("generic", [])), len(by_status.get("refused", []))
    print({k: len(v) for k, v in by_status.items()}, f"generic coverage {generic / (generic + refused):.0%}")
    assert generic / (generic + refused) >= 0.6
    # encoder-decoders and models without an image token are refused with the reason, not guessed
    reasons = {m: d for m, _, s, d in rows if s == "refused"}
    for model_type in ("pix2struct", "florence2"):
        assert "found no decoder layers" in reasons[model_type]
    assert "found no image token" in reasons["minicpmv4_6"]
    assert all("the generic adapter" in reason for reason in reasons.values())  # every refusal says why


def test_generic_layers_belong_to_the_language_model(walk):
    """Structure check on every generic model: the chosen blocks are the decoder's (``get_decoder()``), as many
    as ``text_config.num_hidden_layers``, and none is the vision tower's."""
    rows, models = walk
    checked = 0
    for model_type, _, status, _ in rows:
        if status != "generic":
            continue
        model = models[model_type]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            adapter = get_adapter(model)
        layers = {id(p) for p in adapter.layers.parameters()}
        assert len(adapter.layers) == model.config.get_text_config().num_hidden_layers, model_type
        if adapter.vision_tower is not None:
            assert not layers & {id(p) for p in adapter.vision_tower.parameters()}, model_type
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        if isinstance(decoder, nn.Module) and decoder is not model:
            assert layers <= {id(p) for p in decoder.parameters()}, model_type
            checked += 1
    assert checked >= 30


def _forward_check(model_type):
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type])
    torch.manual_seed(0)
    model = cls(shrunk_config(cls.config_class, narrow=True)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = get_adapter(model)
    assert isinstance(adapter, GenericVLMAdapter)
    ids = torch.randint(5, 100, (1, 6))
    seen: list = []
    hooks = [layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
             for layer in adapter.layers]
    try:
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True).hidden_states
    finally:
        for hook in hooks:
            hook.remove()
    assert len(seen) == adapter.num_layers
    torch.testing.assert_close(seen[0], hidden[1])  # the language model's residual stream, not another stack


@pytest.mark.parametrize("model_type", FAST_FORWARD)
def test_generic_layers_carry_the_language_models_hidden_states(model_type):
    _forward_check(model_type)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [
    "apertus1p5", "cohere2_vision", "cosmos3_edge", "cosmos3_omni", "deepseek_vl", "deepseek_vl_hybrid",
    "exaone4_5", "fast_vlm", "hyperclovax_vision_v2", "idefics2", "janus", "lfm2_vl", "minimax_m3_vl", "molmo2",
    "muse_glimmer", "ovis2", "pp_chart2table", "qianfan_ocr", "video_llama_3"])
def test_generic_layers_carry_the_language_models_hidden_states_slow(model_type):
    _forward_check(model_type)


class _VisionOnlyStack(nn.Module):
    """A VLM-shaped module whose only ModuleList of the text depth is the vision tower's: a frequency or
    "longest ModuleList" heuristic would pick it."""

    def __init__(self):
        super().__init__()
        from transformers import LlavaConfig

        self.config = LlavaConfig(text_config=tiny_text_config(40, num_hidden_layers=2),
                                  vision_config=tiny_vision_config(num_hidden_layers=2), image_token_id=4)
        self.model = nn.Module()
        self.model.vision_tower = nn.Module()
        self.model.vision_tower.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.model.language_model = nn.Module()
        self.model.language_model.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])


def test_unknown_structure_fails_loudly_instead_of_guessing():
    with pytest.raises(UnsupportedModelError) as err:
        adapter_class_for(_VisionOnlyStack())
    msg = str(err.value)
    assert "found no decoder layers" in msg and "num_hidden_layers=2" in msg and "register_adapter" in msg
    # a layer list of the wrong depth is not taken either
    model = _VisionOnlyStack()
    model.model.language_model.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    with pytest.raises(UnsupportedModelError, match="found no decoder layers"):
        adapter_class_for(model)


def _tiny_vipllava():
    from transformers import VipLlavaConfig, VipLlavaForConditionalGeneration

    _, processor = tiny_llava()
    tok = processor.tokenizer
    config = VipLlavaConfig(text_config=tiny_text_config(len(tok), pad_token_id=0, bos_token_id=1, eos_token_id=2),
                            vision_config=tiny_vision_config(), image_token_id=tok.convert_tokens_to_ids("<image>"),
                            vision_feature_layers=[-2, -1])
    torch.manual_seed(0)
    return VipLlavaForConditionalGeneration(config).eval(), processor


def test_generic_adapter_runs_the_remedies_with_a_one_line_warning():
    model, processor = _tiny_vipllava()
    _CACHE.pop(type(model), None)
    with pytest.warns(GuessedAdapterWarning) as record:
        adapter = get_adapter(model, processor)
    (warning,) = record
    msg = str(warning.message)
    assert "\n" not in msg and "VipLlavaForConditionalGeneration" in msg
    assert "model.language_model.layers (3)" in msg and "model.vision_tower" in msg and "image token id 4" in msg
    assert adapter.family == "generic:vipllava" and adapter.layers is model.model.language_model.layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per class
        get_adapter(model, processor)
    prompts, images = ["how do i make a bomb ?", "hello"], [random_image(1), None]
    vec = calibrate(model, processor, [(p, random_image(i)) for i, p in enumerate(prompts * 2)], progress=False)
    plain = SafeVLM(model, processor, max_new_tokens=4).generate(prompts, images)
    assert SafeVLM(model, processor, vec, alpha=0.0, positions="prompt", max_new_tokens=4).generate(
        prompts, images) == plain
    inputs = adapter.build_inputs(prompts, images)
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states[2]
        with steer(model, vec, alpha=1.0, layers=[1], positions="prompt"):
            got = model(**inputs, output_hidden_states=True).hidden_states[2]
    sel = inputs["attention_mask"].bool()
    sel[1] = False
    torch.testing.assert_close(got[sel], base[sel] - vec.shifts[1], atol=1e-5, rtol=0)
    assert torch.equal(got[~sel], base[~sel])


def test_explicit_adapter_wins_without_warning():
    model, processor = tiny_llava()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not isinstance(get_adapter(model, processor), GenericVLMAdapter)
