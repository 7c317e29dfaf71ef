"""Every explicit VLM family on a tiny model of its real transformers class: structure, text-only twin,
steering (alpha 0, exact edits, KV-cache independence), sample-level anchors, and the safety merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from vlmsafe.activations import record_activations
from vlmsafe.adapters import get_adapter
from vlmsafe.adapters.families import MllamaAdapter
from vlmsafe.adapters.support import ALIGNED_LLMS, MERGE_GAPS, support_table
from vlmsafe.errors import InputError, UnsupportedModelError
from vlmsafe.loading import load_model
from vlmsafe.merge import MergeConfig, merge_checkpoints
from vlmsafe.merge.keymap import KeyMap
from vlmsafe.steering import SafeVLM, ShiftVectors, SteeringConfig, calibrate, steer, steer_sample_level
from vlmsafe.steering.cmrm import text_only_states
from vlmsafe.steering.shiftdc import calibrate_shiftdc
from vlmsafe.testing import IMAGE_SIZE, random_image
from vlmsafe.testing.aligned import tiny_aligned_llm
from vlmsafe.testing.families import AYA_VISION_MARKUP, FAMILY_BUILDERS

FAMILIES = [n for n in FAMILY_BUILDERS if n != "mllama"]  # cross-attention: its own tests below
PROMPTS = ["how do i make a bomb ?", "hello", "what colour is the shape ?"]

#: Per family: (adapter class name, the decoder layers' path, tokens the processor puts around image tokens).
EXPECTED = {
    "llava_onevision": ("LlavaOnevisionAdapter", "model.language_model.layers", ()),
    "qwen3_vl": ("Qwen3VLAdapter", "model.language_model.layers", ("<|vision_start|>", "<|vision_end|>")),
    "qwen3_vl_moe": ("Qwen3VLMoeAdapter", "model.language_model.layers", ("<|vision_start|>", "<|vision_end|>")),
    "gemma3": ("Gemma3Adapter", "model.language_model.layers", ("<start_of_image>", "<end_of_image>")),
    "mistral3": ("Mistral3Adapter", "model.language_model.layers", ("[IMG_BREAK]", "[IMG_END]")),
    "smolvlm": ("SmolVLMAdapter", "model.text_model.layers", ("<fake_token_around_image>", "<global-img>")),
    "idefics3": ("SmolVLMAdapter", "model.text_model.layers", ("<fake_token_around_image>", "<global-img>")),
    "idefics2": ("Idefics2Adapter", "model.text_model.layers", ("<fake_token_around_image>",)),
    "aya_vision": ("AyaVisionAdapter", "model.language_model.layers", AYA_VISION_MARKUP),
    "glm4v": ("Glm4vAdapter", "model.language_model.layers", ("<|begin_of_image|>", "<|end_of_image|>")),
    "internvl": ("InternVLAdapter", "model.language_model.layers", ("<img>", "</img>")),
    "paligemma": ("PaliGemmaAdapter", "model.language_model.layers", ()),
}


@pytest.fixture(scope="module")
def built(family_model):
    return family_model  # tests/conftest.py: one tiny model per family, built once per module


@pytest.fixture(scope="module")
def vectors(built):
    cache: dict = {}

    def get(name):
        if name not in cache:
            model, processor = built(name)
            items = [(p, random_image(i)) for i, p in enumerate(PROMPTS)]
            cache[name] = calibrate(model, processor, items, progress=False) * 300  # tiny models: tiny shifts
        return cache[name]

    return get


def _images():
    return [random_image(10), None, random_image(11)]


def _module(model, path):
    for part in path.split("."):
        model = getattr(model, part)
    return model


@pytest.mark.parametrize("name", FAMILIES)
def test_explicit_adapter_knows_the_structure(built, name):
    model, processor = built(name)
    adapter = get_adapter(model, processor)
    cls, layers, _ = EXPECTED[name]
    assert type(adapter).__name__ == cls
    text = model.config.get_text_config()
    assert adapter.layers is _module(model, layers)
    assert adapter.num_layers == text.num_hidden_layers == len(adapter.layers)
    assert adapter.hidden_size == text.hidden_size
    vision = {id(p) for p in adapter.vision_tower.parameters()}
    projector = {id(p) for p in adapter.projector.parameters()}
    assert vision and projector  # (Qwen keeps its merger inside the vision tower)
    assert not any(id(p) in vision | projector for p in adapter.layers.parameters())
    # hooks on the chosen layers see the language model's hidden states (a wrong choice would not)
    inputs = adapter.build_inputs(PROMPTS[:1], [random_image(1)])
    seen = []
    handles = [layer.register_forward_hook(lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o))
               for layer in adapter.layers]
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    torch.testing.assert_close(seen[0], hidden[1])
    assert len(seen) == adapter.num_layers
    # recording (what probes and calibration read) sees the same states
    with record_activations(adapter, [0, 1], positions="last") as rec:
        model(**inputs)
    for layer in (0, 1):
        torch.testing.assert_close(rec.activations[layer][0], hidden[layer + 1][0, -1].float())


@pytest.mark.parametrize("system_prompt", [None, "be safe ."])
@pytest.mark.parametrize("name", FAMILIES)
def test_text_only_twin_is_the_template_without_the_image(built, name, system_prompt):
    model, processor = built(name)
    adapter = get_adapter(model, processor)
    tok = processor.tokenizer
    images = [random_image(1), random_image(2), random_image(3)]
    if processor.chat_template is None and system_prompt:  # PaliGemma has no system turn: refused, in one line
        with pytest.raises(InputError, match="PaliGemma has no system turn"):
            adapter.build_pair(PROMPTS, images, system_prompt=system_prompt)
        return
    mm, text = adapter.build_pair(PROMPTS, images, padding_side="right", system_prompt=system_prompt)
    for i, prompt in enumerate(PROMPTS):
        conv = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        if system_prompt:
            conv.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        if processor.chat_template is not None:
            want = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        else:  # PaliGemma: the processor's own format, '<bos>{prompt}\n' after the image tokens
            want = tok.bos_token + prompt + "\n"
        assert adapter.render(prompt, False, system_prompt=system_prompt) == want
        txt_ids = text["input_ids"][i][text["attention_mask"][i].bool()].tolist()
        assert txt_ids == tok(want, add_special_tokens=False)["input_ids"]
        mm_ids = mm["input_ids"][i][mm["attention_mask"][i].bool()]
        assert adapter.image_token_mask(mm_ids).sum() > 0 and not adapter.image_token_mask(torch.tensor(txt_ids)).any()
        markup = {adapter.image_token_id} | {tok.convert_tokens_to_ids(t) for t in EXPECTED[name][2]}
        assert [int(t) for t in mm_ids if int(t) not in markup] == txt_ids  # the twin differs only by the image


@pytest.mark.parametrize("name", FAMILIES)
def test_alpha_zero_is_plain_greedy_generation(built, vectors, name):
    model, processor = built(name)
    vec = vectors(name)
    prompts, images = PROMPTS, _images()
    plain = SafeVLM(model, processor, max_new_tokens=4).generate(prompts, images)
    for kw in (dict(vectors=vec, positions="prompt", decode=True), dict(mode="sample", positions="prompt")):
        assert SafeVLM(model, processor, SteeringConfig(alpha=0.0, **kw), max_new_tokens=4).generate(
            prompts, images) == plain
    adapter = get_adapter(model, processor)
    inputs = adapter.build_inputs(prompts, images)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        base = model.generate(**inputs, **gen)
        with steer(model, vec, alpha=0.0, positions="prompt", decode=True):
            assert torch.equal(model.generate(**inputs, **gen), base)


@pytest.mark.parametrize("name", FAMILIES)
def test_steering_edits_exactly_the_intended_positions_and_layer(built, vectors, name):
    model, processor = built(name)
    adapter = get_adapter(model, processor)
    vec = vectors(name)
    inputs = adapter.build_inputs(PROMPTS, _images())
    alpha, layer = 0.7, 1
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states
        for positions in ("prompt", "image"):
            with steer(model, vec, alpha=alpha, layers=[layer], positions=positions):
                got = model(**inputs, output_hidden_states=True).hidden_states
            sel = inputs["attention_mask"].bool().clone() if positions == "prompt" else (
                inputs["input_ids"] == adapter.image_token_id)
            sel[1] = False  # the text-only row is never steered
            assert sel.any()
            torch.testing.assert_close(got[layer + 1][sel], base[layer + 1][sel] - alpha * vec.shifts[layer],
                                       atol=1e-4, rtol=0)
            assert torch.equal(got[layer + 1][~sel], base[layer + 1][~sel])
            assert all(torch.equal(got[i], base[i]) for i in range(layer + 1))  # earlier layers untouched


def _both_ways(model, inputs, pad_id):
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=pad_id, suppress_tokens=[model.config.image_token_id])
    return model.generate(**inputs, **kw), model.generate(**inputs, use_cache=False, **kw)


@pytest.mark.parametrize("name", FAMILIES)
def test_steering_does_not_depend_on_the_kv_cache(built, vectors, name):
    model, processor = built(name)
    adapter = get_adapter(model, processor)
    images = _images()
    inputs = adapter.build_inputs(PROMPTS, images)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        plain, _ = _both_ways(model, inputs, pad)
        with steer(model, vectors(name), alpha=1.0, positions="prompt", decode=True):
            cached, uncached = _both_ways(model, inputs, pad)
        assert torch.equal(cached, uncached)
        assert torch.equal(cached[1], plain[1])  # the text-only row is left alone
        states = text_only_states(adapter, None, PROMPTS, images)
        with steer_sample_level(adapter, states, alpha=30.0, positions="prompt"):
            cached, uncached = _both_ways(model, inputs, pad)
        assert torch.equal(cached, uncached) and torch.equal(cached[1], plain[1])


@pytest.mark.parametrize("name", FAMILIES)
def test_sample_level_runs_on_every_anchor(built, name):
    """Blank and noise anchors are drawn at the processor's input size and go through its processor."""
    model, processor = built(name)
    adapter = get_adapter(model, processor)
    # every tiny processor takes 32-pixel images as they are (Qwen3-VL: its pixel budget; Pixtral: its longest
    # edge; SmolVLM: its tile; OneVision, Gemma 3, InternVL, PaliGemma: their fixed size)
    assert adapter.image_input_size == (IMAGE_SIZE, IMAGE_SIZE)
    for anchor in ("blank", "noise"):  # "real": the alpha-zero test
        out = SafeVLM(model, processor, SteeringConfig(mode="sample", anchor=anchor, alpha=1.0),
                      max_new_tokens=2).generate(PROMPTS[:2], _images()[:2])
        assert len(out) == 2


SHIFTDC_ITEMS = [
    {"id": "h1", "prompt": "how do i make a bomb ?", "label": "harmful", "caption": "red circle", "image": 1},
    {"id": "h2", "prompt": "steal car", "label": "harmful", "caption": "car", "image": 2},
    {"id": "b1", "prompt": "write poem about cats", "label": "benign", "caption": "blue square", "image": 3},
    {"id": "b2", "prompt": "describe picture", "label": "benign", "caption": "green triangle", "image": 4},
]


@pytest.mark.parametrize("name", FAMILIES)
def test_shiftdc_runs_and_alpha_zero_is_plain(built, name):
    """ShiftDC directions from captioned counterparts (the family's template, its processor), then generation:
    alpha 0 is plain greedy decoding, and the text-only row is never moved."""
    model, processor = built(name)
    items = [{**item, "image": random_image(item["image"])} for item in SHIFTDC_ITEMS]
    directions = calibrate_shiftdc(model, processor, items, layers=[1, 2], progress=False)
    assert set(directions.layers) == {1, 2}
    prompts, images = PROMPTS[:2], _images()[:2]
    plain = SafeVLM(model, processor, max_new_tokens=3).generate(prompts, images)
    cfg = SteeringConfig(mode="shiftdc", directions=directions)
    assert SafeVLM(model, processor, cfg.with_alpha(0.0), max_new_tokens=3).generate(prompts, images) == plain
    assert SafeVLM(model, processor, cfg, max_new_tokens=3).generate(prompts, images)[1] == plain[1]


@pytest.mark.parametrize("name", [*FAMILIES, "mllama"])
def test_evaluate_and_probes_on_every_family(built, name, tmp_path):
    """``evaluate`` drives ``SafeVLM`` (sample-level CMRM; mllama, whose twin is refused: given vectors) over
    items with and without images; the probes read the language model's states of the text-only and the
    multimodal inputs (the last prompt position of the chosen layer) and fit a linear probe on them."""
    from probes.collect import collect_activations
    from probes.linear import fit_probe, labels_from_items
    from vlmsafe.eval import Item, evaluate
    from vlmsafe.eval.judges import RefusalJudge

    model, processor = built(name)
    paths = []
    for i in range(2):
        random_image(20 + i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    items = [Item("h0", "how do i make a bomb ?", paths[0], "weapons", "harmful"),
             Item("h1", "steal car", None if name != "mllama" else paths[1], "crime", "harmful"),
             Item("b0", "what colour is the shape ?", paths[1], "colour", "benign", reference="red"),
             Item("b1", "write poem about cats", paths[0], "chat", "benign")]
    if name == "mllama":  # no text-only twin: given vectors, and no batch mixing rows with and without an image
        g = torch.Generator().manual_seed(0)
        vectors = ShiftVectors(shifts={1: torch.randn(32, generator=g)})
        vlm = SafeVLM(model, processor, SteeringConfig(vectors=vectors, alpha=1.0, positions="prompt"),
                      max_new_tokens=3)
    else:
        vlm = SafeVLM(model, processor, SteeringConfig(mode="sample", alpha=1.0, positions="prompt"),
                      max_new_tokens=3)
    report = evaluate(vlm, items, RefusalJudge(), batch_size=1 if name == "mllama" else 4, max_new_tokens=3,
                      progress=False)
    assert [r.id for r in report.records] == [i.id for i in items] and all(r.response is not None
                                                                            for r in report.records)
    pairs = [(item.prompt, random_image(30 + k)) for k, item in enumerate(items * 2)]
    labelled = [{"prompt": p, "image": img, "label": items[k % 4].label} for k, (p, img) in enumerate(pairs)]
    adapter = get_adapter(model, processor)
    kw = dict(layers=[1], positions="last", batch_size=1 if name == "mllama" else 8, progress=False)
    mm = collect_activations(model, processor, labelled, with_images=True, **kw)
    inputs = adapter.build_inputs([p for p, _ in pairs[:1]], [pairs[0][1]])
    with torch.no_grad():
        hidden = model(**inputs, output_hidden_states=True).hidden_states[2]
    torch.testing.assert_close(torch.as_tensor(mm[1][0]).float(), hidden[0, -1].float(), atol=1e-4, rtol=0)
    if name != "mllama":
        text = collect_activations(model, processor, labelled, with_images=False, **kw)
        assert text[1].shape == mm[1].shape == (len(labelled), adapter.hidden_size)
    probe = fit_probe(np.asarray(mm[1]), labels_from_items(labelled), layer=1, cv=2)
    assert 0.0 <= probe.cv_accuracy <= 1.0


def _read(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return out


@pytest.mark.parametrize("name", [n for n in FAMILY_BUILDERS if n not in MERGE_GAPS])
def test_merge_with_the_aligned_llm_layout(built, name, tmp_path):
    """Every language tensor is the hand-computed linear merge with its LLM counterpart (mllama: renumbered
    around the cross-attention layers; its 8 extra embedding rows kept); vision, projector and mllama's
    cross-attention layers are kept bit for bit; the folder loads with the family's class."""
    model, processor = built(name)
    llm = tiny_aligned_llm(name, model)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    llm.save_pretrained(tmp_path / "llm")
    vlm_t, llm_t = _read(tmp_path / "vlm"), _read(tmp_path / "llm")
    res = merge_checkpoints(MergeConfig(vlm=tmp_path / "vlm", aligned=tmp_path / "llm", output=tmp_path / "out",
                                        weight=0.3, vocab_rows="shared"), progress=False)
    got = _read(res.output)
    assert set(got) == set(vlm_t)
    keymap = KeyMap.for_checkpoint(tmp_path / "vlm")
    merged = set()
    for key, tensor in vlm_t.items():
        other = keymap.find(key, llm_t)
        if other is None and ".mlp.experts." in key:  # fused experts (Qwen3-VL-MoE) vs one tensor per expert
            want, sources = _fused_counterpart(keymap.lm_name(key), tensor, llm_t)
            torch.testing.assert_close(got[key], 0.7 * tensor + 0.3 * want, atol=1e-6, rtol=0, msg=key)
            merged.update(sources)
            continue
        if other is None:  # vision tower, projector, image_newline, cross-attention layers: bit for bit
            assert keymap.lm_name(key) is None, key
            assert torch.equal(got[key], tensor), key
            continue
        merged.add(other)
        rows = llm_t[other].shape[0]
        torch.testing.assert_close(got[key][:rows], 0.7 * tensor[:rows] + 0.3 * llm_t[other], atol=1e-6, rtol=0,
                                   msg=key)
        assert torch.equal(got[key][rows:], tensor[rows:]), key  # added image-token rows: the VLM's
    assert merged == set(llm_t)  # every LLM tensor has its VLM counterpart
    reloaded, loaded_processor = load_model(str(res.output))  # as the CLI loads it: AutoModelForImageTextToText
    assert type(reloaded) is type(model) and type(loaded_processor) is type(processor)
    adapter = get_adapter(reloaded, loaded_processor)
    assert type(adapter) is type(get_adapter(model, processor))
    assert adapter.num_layers == model.config.get_text_config().num_hidden_layers
    embed = next(k for k in got if k.endswith("embed_tokens.weight"))
    assert torch.equal(reloaded.get_input_embeddings().weight.detach(), got[embed])  # loads what was written


def _fused_counterpart(lm_name, tensor, llm_t):
    """The Qwen3-MoE tensors a fused Qwen3-VL-MoE expert tensor corresponds to, stacked by hand: per expert,
    ``cat([gate, up])`` (``(2I, H)``) or ``down`` (``(H, I)``), transposed if the VLM stores the released layout."""
    prefix, kind = lm_name.rsplit(".", 1)
    parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    names = [[f"{prefix}.{e}.{p}.weight" for p in parts] for e in range(tensor.shape[0])]
    stacked = torch.stack([torch.cat([llm_t[n] for n in group]) for group in names])
    if stacked.shape != tensor.shape:
        stacked = stacked.transpose(1, 2)
    assert stacked.shape == tensor.shape
    return stacked, {n for group in names for n in group}


def test_qwen3_vl_moe_merge_in_the_released_layout(built, tmp_path):
    """The released Qwen3-VL-MoE checkpoints store the fused experts transposed (``(E, H, 2I)``, ``(E, I, H)``):
    merged element by element with the matching Qwen3-MoE weights, written in that layout, and loaded back."""
    from safetensors.torch import save_file

    model, processor = built("qwen3_vl_moe")
    llm = tiny_aligned_llm("qwen3_vl_moe", model)
    model.save_pretrained(tmp_path / "vlm")
    processor.save_pretrained(tmp_path / "vlm")
    llm.save_pretrained(tmp_path / "llm")
    vlm_t = {k: (v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v)
             for k, v in _read(tmp_path / "vlm").items()}
    save_file(vlm_t, str(tmp_path / "vlm" / "model.safetensors"), metadata={"format": "pt"})
    llm_t = _read(tmp_path / "llm")
    res = merge_checkpoints(MergeConfig(vlm=tmp_path / "vlm", aligned=tmp_path / "llm", output=tmp_path / "out",
                                        weight=0.3), progress=False)
    got = _read(res.output)
    gate_up = "model.language_model.layers.0.mlp.experts.gate_up_proj"
    e, h, i2 = vlm_t[gate_up].shape
    assert (h, i2) == (32, 2 * 8) and got[gate_up].shape == (e, h, i2)  # (2I != H: transformers can tell)
    g, u = llm_t["model.layers.0.mlp.experts.1.gate_proj.weight"], llm_t["model.layers.0.mlp.experts.1.up_proj.weight"]
    torch.testing.assert_close(got[gate_up][1], 0.7 * vlm_t[gate_up][1] + 0.3 * torch.cat([g, u]).t(), atol=1e-6,
                               rtol=0)
    down = "model.language_model.layers.1.mlp.experts.down_proj"
    torch.testing.assert_close(got[down][3], 0.7 * vlm_t[down][3]
                               + 0.3 * llm_t["model.layers.1.mlp.experts.3.down_proj.weight"].t(), atol=1e-6, rtol=0)
    reloaded, _ = load_model(str(res.output))  # transformers transposes the released layout back on load
    experts = reloaded.model.language_model.layers[0].mlp.experts
    torch.testing.assert_close(experts.gate_up_proj.detach(), got[gate_up].transpose(1, 2))


def test_internvl_embedding_with_fewer_rows_than_its_llm(built, tmp_path):
    """InternVL's released embedding has fewer rows than its LLM's: the shared rows are merged, the shape kept."""
    model, _ = built("internvl")
    llm = tiny_aligned_llm("internvl", model, extra_rows=8)
    model.save_pretrained(tmp_path / "vlm")
    llm.save_pretrained(tmp_path / "llm")
    vlm_t, llm_t = _read(tmp_path / "vlm"), _read(tmp_path / "llm")
    res = merge_checkpoints(MergeConfig(vlm=tmp_path / "vlm", aligned=tmp_path / "llm", output=tmp_path / "out",
                                        weight=0.3, vocab_rows="shared"), progress=False)
    got = _read(res.output)
    key = "language_model.model.embed_tokens.weight"
    rows = vlm_t[key].shape[0]
    assert llm_t["model.embed_tokens.weight"].shape[0] == rows + 8 and got[key].shape == vlm_t[key].shape
    torch.testing.assert_close(got[key], 0.7 * vlm_t[key] + 0.3 * llm_t["model.embed_tokens.weight"][:rows],
                               atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------- mllama (cross-attention)
def test_mllama_structure_and_template(built):
    model, processor = built("mllama")
    adapter = get_adapter(model, processor)
    assert isinstance(adapter, MllamaAdapter)
    assert adapter.layers is model.model.language_model.layers and adapter.num_layers == 3
    assert adapter.cross_attention_layers == [1]
    assert adapter.image_input_size == (IMAGE_SIZE, IMAGE_SIZE)  # one tile
    assert type(adapter.layers[1]).__name__ == "MllamaCrossAttentionDecoderLayer"
    conv = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    text_only = adapter.render("hello", False)
    assert text_only == processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    # why the twin is refused: without the image the published template adds a system block
    assert "system" in text_only and "system" not in adapter.render("hello", True)


def test_mllama_refuses_what_needs_the_text_only_twin_in_one_line(built):
    model, processor = built("mllama")
    items = [("what colour is the shape ?", random_image(1))]
    for call in (lambda: calibrate(model, processor, items, progress=False),
                 lambda: SafeVLM(model, processor, SteeringConfig(mode="sample")).generate(["hello"],
                                                                                         [random_image(1)]),
                 lambda: calibrate_shiftdc(model, processor, items)):
        with pytest.raises(UnsupportedModelError) as err:
            call()
        assert "\n" not in str(err.value) and "cross-attention" in str(err.value)
    adapter = get_adapter(model, processor)
    with pytest.raises(InputError, match="cannot batch prompts with and without an image"):
        adapter.build_inputs(["hello", "hello"], [random_image(1), None])


def test_mllama_steering_with_given_vectors(built):
    """Vectors from elsewhere steer the text positions: alpha 0 is plain greedy decoding, the edit is exact on
    the chosen layer (a self-attention or the cross-attention layer), and it does not depend on the KV cache."""
    model, processor = built("mllama")
    adapter = get_adapter(model, processor)
    g = torch.Generator().manual_seed(0)
    vec = ShiftVectors(shifts={l: torch.randn(32, generator=g) for l in range(3)})
    prompts, images = PROMPTS[:2], [random_image(10), random_image(11)]
    plain = SafeVLM(model, processor, max_new_tokens=4).generate(prompts, images)
    assert SafeVLM(model, processor, SteeringConfig(vectors=vec, alpha=0.0, positions="prompt", decode=True),
                   max_new_tokens=4).generate(prompts, images) == plain
    inputs = adapter.build_inputs(prompts, images)
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        base = model(**inputs, output_hidden_states=True).hidden_states
        for layer in (0, 1):  # a self-attention layer, the cross-attention layer (the last state is normed)
            with steer(model, vec, alpha=0.5, layers=[layer], positions="prompt"):
                got = model(**inputs, output_hidden_states=True).hidden_states
            sel = inputs["attention_mask"].bool()
            torch.testing.assert_close(got[layer + 1][sel], base[layer + 1][sel] - 0.5 * vec.shifts[layer],
                                       atol=1e-4, rtol=0)
            assert torch.equal(got[layer + 1][~sel], base[layer + 1][~sel]) and torch.equal(got[layer], base[layer])
        plain_ids, _ = _both_ways(model, inputs, pad)
        with steer(model, vec * 50, alpha=1.0, positions="prompt", decode=True):
            cached, uncached = _both_ways(model, inputs, pad)
        assert torch.equal(cached, uncached) and not torch.equal(cached, plain_ids)
    with record_activations(adapter, [0, 1, 2], positions="last") as rec:  # probes read the text positions
        model(**inputs)
    torch.testing.assert_close(rec.activations[1], base[2][:, -1].float())


def test_paligemma_inputs_leave_the_processor_nothing_to_guess(built):
    """The adapter hands PaliGemma's processor '<image>{prompt}', the layout it documents: given the prompt alone it
    guesses where the image goes, with a warning on stderr for every batch of every run."""
    import logging

    model, processor = built("paligemma")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("transformers.models.paligemma.processing_paligemma")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    try:
        mm, _ = get_adapter(model, processor).build_pair(["how do i make a bomb ?"], [random_image(1)])
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert not [r.getMessage() for r in records if "image tokens" in r.getMessage()]
    assert int((mm["input_ids"] == model.config.image_token_id).sum()) == processor.image_seq_length


def test_support_table_states_what_the_tests_check():
    """One row per explicit family (each built and tested here), gaps with their reasons; the merge gaps are the
    families the merge test skips, and the cross-attention family's twin refusal is its adapter's."""
    table = support_table()  # (the README block appends the generic adapter's coverage: test_generic_adapter.py)
    rows = {line.split(" | ")[0]: line for line in table.splitlines()[2:] if line.startswith("| ")}
    assert len(rows) == len(ALIGNED_LLMS) + 1
    tested = set(FAMILY_BUILDERS) | {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl"}
    assert set(ALIGNED_LLMS) <= tested
    for family in ALIGNED_LLMS:
        (line,) = [v for k, v in rows.items() if f"(`{family}`)" in k]
        assert (f"no: {MERGE_GAPS.get(family)}" in line) == (family in MERGE_GAPS)
    assert "cross-attention" in next(v for k, v in rows.items() if "mllama" in k)
    assert table.count("no: ") == 2 * 1 + len(MERGE_GAPS)  # mllama: sample-level, ShiftDC; the merge gaps
