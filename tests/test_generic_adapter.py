"""The generic adapter: chosen only without an explicit one, says what it guessed, never picks the wrong layers,
and refuses structures it cannot read; plus the walk over every image-text-to-text class of transformers."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from vlmsafe.adapters import GenericVLMAdapter, GuessedAdapterWarning, get_adapter, support_table
from vlmsafe.adapters.base import adapter_class_for
from vlmsafe.adapters.generic import _CACHE
from vlmsafe.errors import UnsupportedModelError
from vlmsafe.steering import SafeVLM, SteeringConfig, calibrate, steer
from vlmsafe.testing import IMAGE_SIZE, coverage, random_image, tiny_llava, tiny_text_config, tiny_vision_config
from vlmsafe.testing.coverage import shrunk_config
from vlmsafe.testing.families import FAMILY_BUILDERS

#: Families with an explicit adapter (the walk must find each as explicit, never generic).
EXPLICIT = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", *FAMILY_BUILDERS}
#: Generic ones cheap enough to run a real forward on every test run (the rest: ``-m slow``).
FAST_FORWARD = ("vipllava", "llava_next_video", "video_llava", "got_ocr2", "lighton_ocr", "aria", "fuyu",
                "minicpmv4_6")


@pytest.fixture(scope="module")
def walk():
    return coverage.walk()  # the same (cached) walk the README's coverage section is generated from


def test_walk_reports_every_image_text_to_text_class(walk):
    rows, _ = walk
    by_status: dict[str, list] = {}
    for model_type, cls, status, detail in rows:
        by_status.setdefault(status, []).append(model_type)
        assert detail, (model_type, status)
        print(f"{model_type:28} {cls:48} {status:11} {detail[:110]}")  # the report (pytest -s)
    assert set(by_status["explicit"]) >= EXPLICIT
    assert not EXPLICIT & set(by_status.get("generic", []))
    generic, refused, share = coverage.coverage(rows)
    assert (generic, refused) == (len(by_status["generic"]), len(by_status["refused"]))
    print({k: len(v) for k, v in by_status.items()}, f"generic coverage {share:.0%}")
    assert share >= 0.8
    # models whose default config leaves out a modality or the image token id are covered (Gemma 4: no vision
    # config by default; MiniCPM-V, Nemotron-H Omni: the id comes from the processor; Fuyu: no vision tower)
    details = {m: d for m, _, s, d in rows if s == "generic"}
    assert {"gemma4", "gemma3n", "fuyu", "minicpmv4_6", "nemotron_h_omni"} <= set(details)
    assert details["minicpmv4_6"].endswith("(image token from the processor)")
    assert not details["gemma4"].endswith("(image token from the processor)")
    # what is not covered says why; encoder-decoders and models without image input are out of scope
    reasons = {m: d for m, _, s, d in rows if s == "refused"}
    scope = {m: d for m, _, s, d in rows if s == "out of scope"}
    for model_type in ("pix2struct", "florence2", "udop", "t5gemma2", "vision-encoder-decoder"):
        assert "is an encoder-decoder" in scope[model_type], model_type
    for model_type in ("mistral4", "evolla", "pi0"):
        assert "neither a vision config nor an image token" in scope[model_type], model_type
    for model_type in ("blip-2", "instructblip", "instructblipvideo"):  # no text-only twin can run, and generate
        assert "forward requires pixel_values" in reasons[model_type]  # bypasses forward (see the test below)
        assert "straight to language_model.generate, bypassing forward" in reasons[model_type]
    for model_type in ("kosmos-2", "kosmos-2.5"):  # image positions come from a mask, not from an id
        assert "image_embeds_position_mask" in reasons[model_type], model_type
    assert "gated cross-attention" in reasons["idefics"] and "cross_layer_interval" in reasons["idefics"]
    assert "(text_decoder.bert.encoder.layer.0.crossattention)" in reasons["blip"]
    assert "prepends the image embeddings" in reasons["git"]
    assert all(reason.startswith("the generic adapter") and "\n" not in reason for reason in reasons.values())


def test_readme_coverage_section_is_the_walks(walk):
    """The README block's coverage section is generated from this walk: counts, share, every gap with its reason."""
    rows, _ = walk
    section = coverage.coverage_section(rows)
    table = coverage.readme_block()
    assert table.startswith(support_table()) and table.endswith(section)
    generic, refused, share = coverage.coverage(rows)
    assert f"covers {generic} of the {generic + refused} decoder-only VLM classes without an explicit adapter " \
           f"({share:.0%})" in section
    # the stricter reading counts the out-of-scope classes as uncovered too; both shares are printed
    scope = sum(r[2] == "out of scope" for r in rows)
    assert coverage.strict_coverage(rows) == (generic, refused + scope, generic / (generic + refused + scope))
    assert f"{generic} of the {generic + refused + scope} buildable classes without an explicit adapter " \
           f"({generic / (generic + refused + scope):.0%})" in section
    for model_type, _, status, detail in rows:
        assert (f"| `{model_type}` |" in section) == (status not in ("explicit", "generic")), model_type
        assert status in ("explicit", "generic") or detail.replace("|", "/") in section
        if status == "generic":
            assert f"`{model_type}`" in section


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
    "exaone4_5", "fast_vlm", "hyperclovax_vision_v2", "janus", "lfm2_vl", "minimax_m3_vl", "molmo2",
    "muse_glimmer", "ovis2", "pp_chart2table", "qianfan_ocr", "video_llama_3", "gemma4", "gemma3n",
    "nemotron_h_omni", "minicpm_ocr"])
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
    _CACHE.pop(_VisionOnlyStack, None)
    with pytest.raises(UnsupportedModelError) as err:
        adapter_class_for(_VisionOnlyStack())
    msg = str(err.value)
    assert "found no decoder layers" in msg and "num_hidden_layers=2" in msg and "register_adapter" in msg
    # a layer list of the wrong depth is not taken either
    model = _VisionOnlyStack()
    model.model.language_model.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
    _CACHE.pop(_VisionOnlyStack, None)
    with pytest.raises(UnsupportedModelError, match="found no decoder layers"):
        adapter_class_for(model)


def test_cross_attention_decoder_is_refused_not_guessed():
    """A decoder whose blocks read the image by cross-attention (mllama, IDEFICS) has no image positions: refused."""
    model = _VisionOnlyStack()
    model.model.language_model.layers = nn.ModuleList([nn.Module() for _ in range(2)])
    model.model.language_model.layers[1].cross_attn = nn.Linear(4, 4)
    _CACHE.pop(_VisionOnlyStack, None)  # (the class's verdict is cached; this instance is built differently)
    with pytest.raises(UnsupportedModelError) as err:
        adapter_class_for(model)
    assert "cross-attention in _VisionOnlyStack's decoder layers (model.language_model.layers.1.cross_attn)" in str(
        err.value)


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
    assert SafeVLM(model, processor, SteeringConfig(vectors=vec, alpha=0.0, positions="prompt"),
                   max_new_tokens=4).generate(
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


def test_image_token_from_the_processor_when_the_config_leaves_it_unset():
    """MiniCPM-V / Nemotron-H Omni ship ``image_token_id=None`` as the class default: the adapter takes the
    processor's image token, and without either it refuses in one line instead of guessing positions."""
    model, processor = _tiny_vipllava()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = get_adapter(model, processor)
        bare = get_adapter(model)
    want = model.config.image_token_id
    model.config.image_token_id = None
    try:
        assert adapter.image_token_id == want == processor.tokenizer.convert_tokens_to_ids("<image>")
        mask = adapter.image_token_mask(adapter.build_inputs(["hello"], [random_image(1)])["input_ids"])
        assert int(mask.sum()) == (IMAGE_SIZE // 8) ** 2  # a 32-pixel image in 8-pixel patches
        with pytest.raises(UnsupportedModelError) as err:
            _ = bare.image_token_id
        assert "\n" not in str(err.value) and "leaves image_token_id unset and no processor was given" in str(
            err.value)
    finally:
        model.config.image_token_id = want


def test_explicit_adapter_wins_without_warning():
    model, processor = tiny_llava()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not isinstance(get_adapter(model, processor), GenericVLMAdapter)


def test_blip2_generate_bypasses_forward_as_its_refusal_says():
    """The BLIP-2 family's refusal rests on this: ``generate`` never calls the model's ``forward`` (the entry hooks
    steering and recording use), only the language model's; if transformers changes that, revisit the refusal."""
    import transformers

    cls = transformers.Blip2ForConditionalGeneration
    torch.manual_seed(0)
    config = shrunk_config(cls.config_class, narrow=True)
    assert config.use_decoder_only_language_model and config.image_token_index is None  # OPT by default
    config.image_token_index = 50
    model = cls(config).eval()
    calls = {"model": 0, "language_model": 0}
    model.register_forward_pre_hook(lambda *a: calls.__setitem__("model", calls["model"] + 1))
    model.language_model.register_forward_pre_hook(
        lambda *a: calls.__setitem__("language_model", calls["language_model"] + 1))
    ids = torch.tensor([[50] * config.num_query_tokens + [5, 6, 7]])
    pixels = torch.randn(1, 3, config.vision_config.image_size, config.vision_config.image_size)
    with torch.no_grad():
        model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=3, do_sample=False)
    assert calls == {"model": 0, "language_model": 3}
    with pytest.raises(UnsupportedModelError, match="bypassing forward"):
        _CACHE.pop(cls, None)
        adapter_class_for(model)
