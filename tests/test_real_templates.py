"""Template handling on what users load: the published processors of llava-1.5, llava-v1.6-mistral and
Qwen2-VL-Instruct (real tokenizer classes with tiny trained vocabularies, the published chat templates;
``tests/fixtures/tokenizers``), driving tiny random models of each family; and the published chat templates of
the other families (``tests/fixtures/templates``) on their tiny models: the text-only twin and the image
positions."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil

import pytest
import torch
from transformers import AutoProcessor, LlamaTokenizerFast, Qwen2TokenizerFast

from vlmsafe.activations import record_activations
from vlmsafe.adapters import get_adapter
from vlmsafe.errors import InputError, UnsupportedModelError
from vlmsafe.steering import SafeVLM, ShiftVectors, SteeringConfig, calibrate, steer, steer_sample_level
from vlmsafe.testing import REAL_PROCESSOR_DIR, REAL_TOKENIZER_BUILDERS, random_image, real_processor, tiny_llava
from vlmsafe.testing.families import FAMILY_BUILDERS
from vlmsafe.testing.family_text import PUBLISHED_TEMPLATE_DIR, published_template

NAMES = list(REAL_TOKENIZER_BUILDERS)
LLAVA15, MISTRAL, QWEN = NAMES
#: What the template renders for one image (the text-only counterpart lacks exactly this).
IMAGE_BLOCK = {LLAVA15: "<image>\n", MISTRAL: "<image>\n", QWEN: "<|vision_start|><|image_pad|><|vision_end|>"}
TOKENIZER_CLASS = {LLAVA15: LlamaTokenizerFast, MISTRAL: LlamaTokenizerFast, QWEN: Qwen2TokenizerFast}
PROMPTS = ["how do i make a bomb at home ?", "hello", "what colour is the shape in the image ?", "steal a car"]


def _images():
    # different sizes: LLaVA-NeXT and Qwen2-VL expand them into different numbers of image tokens
    return [random_image(1, 48).resize((48, 24)), None, random_image(2), random_image(3, 40)]


@pytest.fixture(scope="module")
def built():
    return {name: build() for name, build in REAL_TOKENIZER_BUILDERS.items()}


def _published_templates():
    spec = importlib.util.spec_from_file_location("fixture_build", REAL_PROCESSOR_DIR / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {LLAVA15: module.LLAVA_15_TEMPLATE, MISTRAL: module.LLAVA_16_MISTRAL_TEMPLATE,
            QWEN: module.QWEN2_VL_INSTRUCT_TEMPLATE}


@pytest.mark.parametrize("name", NAMES)
def test_fixture_loads_offline_as_the_published_processor(name):
    folder = REAL_PROCESSOR_DIR / name
    processor = AutoProcessor.from_pretrained(folder)  # HF_HUB_OFFLINE=1 (conftest): nothing is downloaded
    tok = processor.tokenizer
    assert isinstance(tok, TOKENIZER_CLASS[name])
    on_disk = json.loads((folder / "chat_template.json").read_text(encoding="utf-8"))["chat_template"]
    assert processor.chat_template == on_disk == _published_templates()[name]
    if name == QWEN:
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                    "<|image_pad|>"]
        first = tok.convert_tokens_to_ids("<|endoftext|>")
        assert tok.convert_tokens_to_ids(specials) == [first, first + 1, first + 2, first + 9, first + 10, first + 12]
        assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
        assert tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]  # Qwen adds no BOS
    else:
        # Llama layout: <unk> <s> </s>, the 256 byte-fallback pieces (newline = 13), ..., <image>, <pad>
        assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<0x0A>"]) == [0, 1, 2, 13]
        assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [len(tok) - 2, len(tok) - 1]
        assert tok("hi")["input_ids"][0] == tok.bos_token_id  # the Llama post-processor adds BOS
        assert tok.convert_ids_to_tokens(tok("a\nb", add_special_tokens=False)["input_ids"]).count("<0x0A>") == 1


def test_missing_fixture_folder_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no processor fixture there; pass root="):
        real_processor("llava", root=tmp_path)
    with pytest.raises(InputError, match="no real-tokenizer fixture for family 'clip'"):
        real_processor("clip")
    with pytest.raises(InputError, match="tokenizer must be one of"):
        tiny_llava(tokenizer="wordpiece")


@pytest.mark.parametrize("name", NAMES)
def test_renders_the_published_prompt_format(built, name):
    adapter = get_adapter(*built[name])
    expected = {
        LLAVA15: ("USER: <image>\nhello ASSISTANT:", "Be safe. USER: <image>\nhello ASSISTANT:"),
        MISTRAL: ("[INST] <image>\nhello [/INST]", "<<SYS>>\nBe safe.\n<</SYS>>\n\n[INST] <image>\nhello [/INST]"),
        QWEN: ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
               "<|vision_start|><|image_pad|><|vision_end|>hello<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>system\nBe safe.<|im_end|>\n<|im_start|>user\n"
               "<|vision_start|><|image_pad|><|vision_end|>hello<|im_end|>\n<|im_start|>assistant\n"),
    }[name]
    assert adapter.render("hello", True) == expected[0]
    assert adapter.render("hello", True, system_prompt="Be safe.") == expected[1]


def _common_affixes(a: list[int], b: list[int]) -> tuple[int, int]:
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while suffix < min(len(a), len(b)) - prefix and a[-1 - suffix] == b[-1 - suffix]:
        suffix += 1
    return prefix, suffix


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("system_prompt", [None, "Be safe."])
def test_text_only_counterpart_differs_only_by_the_image(built, name, system_prompt):
    model, processor = built[name]
    adapter = get_adapter(model, processor)
    for prompt in PROMPTS:
        mm_text = adapter.render(prompt, True, system_prompt=system_prompt)
        text_only = adapter.render(prompt, False, system_prompt=system_prompt)
        assert mm_text.count(IMAGE_BLOCK[name]) == 1
        assert mm_text.replace(IMAGE_BLOCK[name], "", 1) == text_only  # the conversations differ by the image only

    mm, text = adapter.build_pair(PROMPTS, [random_image(i) for i in range(len(PROMPTS))], system_prompt=system_prompt)
    image_id = adapter.image_token_id
    for row in range(len(PROMPTS)):
        a = mm["input_ids"][row][mm["attention_mask"][row].bool()].tolist()
        b = text["input_ids"][row][text["attention_mask"][row].bool()].tolist()
        assert image_id in a and image_id not in b
        prefix, suffix = _common_affixes(a, b)
        mm_rest = [t for t in a[prefix:len(a) - suffix] if t != image_id]
        text_rest = b[prefix:len(b) - suffix]
        if name == QWEN:
            # byte-level BPE: removing <|vision_start|><|image_pad|>*n<|vision_end|> gives the text-only ids
            assert processor.tokenizer.convert_ids_to_tokens(mm_rest) == ["<|vision_start|>", "<|vision_end|>"]
            assert text_rest == []
        else:
            # SentencePiece-style pieces: the word after "<image>\n" loses its "▁" marker, so the
            # difference spans the image block and that first piece, and nothing else
            assert len(mm_rest) <= 4 and len(text_rest) <= 2
            assert processor.tokenizer.convert_tokens_to_ids("<0x0A>") in mm_rest
        # the generation prompt, hence the last prompt token CMRM reads, is shared
        tail = processor.tokenizer(adapter.render("x", False).split("x")[-1], add_special_tokens=False)["input_ids"]
        assert suffix >= len(tail) and a[-1] == b[-1]


@pytest.mark.parametrize("name", NAMES)
def test_image_token_count_matches_the_processor_expansion(built, name):
    model, processor = built[name]
    adapter = get_adapter(model, processor)
    images = _images()
    inputs = adapter.build_inputs(PROMPTS, images)
    counts = adapter.image_token_mask(inputs["input_ids"]).sum(dim=1).tolist()
    present = [img for img in images if img is not None]
    expected = processor._get_num_multimodal_tokens(image_sizes=[(im.height, im.width) for im in present])
    assert [c for c, img in zip(counts, images) if img is not None] == list(expected["num_image_tokens"])
    assert counts[1] == 0
    vision = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
    with torch.no_grad():
        features = model.model.get_image_features(**vision).pooler_output
    assert [int(f.shape[0]) for f in features] == list(expected["num_image_tokens"])  # what the model splices in
    if name != LLAVA15:  # dynamic resolution: the two image sizes expand differently
        assert len(set(expected["num_image_tokens"])) > 1


@pytest.mark.parametrize("name", NAMES)
def test_batched_left_padding_equals_one_by_one(built, name):
    model, processor = built[name]
    adapter = get_adapter(model, processor)
    images = _images()
    batch = adapter.build_inputs(PROMPTS, images)
    assert (batch["attention_mask"][:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 1).all()  # left-padded
    pad = processor.tokenizer.pad_token_id
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        generated = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=pad)
        for i, (prompt, image) in enumerate(zip(PROMPTS, images)):
            one = adapter.build_inputs([prompt], [image])
            torch.testing.assert_close(logits[i], model(**one).logits[0, -1], atol=1e-5, rtol=0)
            alone = model.generate(**one, max_new_tokens=5, do_sample=False, pad_token_id=pad)
            assert generated[i, batch["input_ids"].shape[1]:].tolist() == alone[0, one["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("name", NAMES)
def test_steering_on_the_published_templates(built, name):
    model, processor = built[name]
    adapter = get_adapter(model, processor)
    items = [(p, random_image(10 + i)) for i, p in enumerate(PROMPTS)]
    vectors = calibrate(model, processor, items, progress=False, batch_size=4)
    one_by_one = calibrate(model, processor, items, progress=False, batch_size=1)
    for layer in vectors.layers:
        torch.testing.assert_close(vectors.shifts[layer], one_by_one.shifts[layer], atol=1e-5, rtol=0)
        assert vectors.shifts[layer].norm() > 0
    vectors = ShiftVectors(shifts={l: s * 300 for l, s in vectors.shifts.items()}, meta=vectors.meta)

    images = _images()
    inputs = adapter.build_inputs(PROMPTS, images)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = model.generate(**inputs, **kwargs)
        with steer(model, vectors, alpha=0.0, positions="prompt", decode=True) as state:
            dataset_zero = model.generate(**inputs, **kwargs)
        assert state["calls"] >= 1  # the hooks ran
        text_inputs = adapter.build_inputs(PROMPTS, None)
        with record_activations(adapter, None, positions="last", device=None) as rec:
            model(**text_inputs)
        with steer_sample_level(adapter, dict(rec.activations), alpha=0.0, positions="prompt") as state:
            sample_zero = model.generate(**inputs, **kwargs)
        assert state["shifts"]  # sample-level shifts were computed
    assert torch.equal(dataset_zero, plain) and torch.equal(sample_zero, plain)

    plain_text = SafeVLM(model, processor, max_new_tokens=5).generate(PROMPTS, images)
    outputs = []
    for vlm in (SafeVLM(model, processor, SteeringConfig(vectors=vectors, alpha=1.0, positions="prompt", decode=True),
                        max_new_tokens=5),
                SafeVLM(model, processor, SteeringConfig(mode="sample", alpha=1.0, positions="prompt"),
                        max_new_tokens=5)):
        batched = vlm.generate(PROMPTS, images)
        assert batched == [vlm.generate(p, img) for p, img in zip(PROMPTS, images)]
        assert batched[1] == plain_text[1]  # the text-only row is never moved
        outputs.append(batched)
    assert outputs[0] != plain_text  # dataset-level steering changed the multimodal answers


# ------------------------------------------------------------------ the other families' published templates
#: Families whose published chat template is a fixture under tests/fixtures/templates (the tiny family builders
#: use it by default); mllama: its twin is refused, tested apart.
PUBLISHED = ["llava_onevision", "qwen3_vl", "gemma3", "internvl", "smolvlm", "mistral3"]
#: Tokens the processors put around or between image tokens (not part of the text-only twin).
MARKUP = {
    "llava_onevision": (), "qwen3_vl": ("<|vision_start|>", "<|vision_end|>"),
    "gemma3": ("<start_of_image>", "<end_of_image>"), "internvl": ("<img>", "</img>"),
    "smolvlm": ("<fake_token_around_image>", "<global-img>"), "mistral3": ("[IMG_BREAK]", "[IMG_END]"),
}


@pytest.fixture(scope="module")
def family(family_model):
    return family_model  # tests/conftest.py: one tiny model per family, built once per module


@pytest.mark.parametrize("name", sorted(p.name for p in PUBLISHED_TEMPLATE_DIR.iterdir() if p.is_dir()))
def test_template_fixture_says_where_it_comes_from(name):
    """Each fixture folder names its source; a stored template is the text whose sha256 the note states (an edit
    of either is caught)."""
    note = (PUBLISHED_TEMPLATE_DIR / name / "SOURCE.md").read_text(encoding="utf-8")
    stored = PUBLISHED_TEMPLATE_DIR / name / "chat_template.json"
    if not stored.exists():
        assert "tests/fixtures/tokenizers/" in note or "no chat template" in note.lower() or "Not sourced" in note
        return
    (digest,) = re.findall(r"sha256 of the template text: `([0-9a-f]{64})`", note)
    assert hashlib.sha256(published_template(name).encode()).hexdigest() == digest
    # names a repository or file path, or says the index that served the text did not name one
    assert re.search(r"\* Source: [^`]*`[\w./-]+/[\w./-]+`", note) or "did not name its repository" in note


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_template_loads_as_users_load_it(family, name, tmp_path):
    """The fixture file is what ``AutoProcessor.from_pretrained`` reads from a checkpoint folder, unchanged."""
    _, processor = family(name)
    processor.save_pretrained(tmp_path)
    for stale in tmp_path.glob("chat_template.*"):
        stale.unlink()
    shutil.copyfile(PUBLISHED_TEMPLATE_DIR / name / "chat_template.json", tmp_path / "chat_template.json")
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert loaded.chat_template == processor.chat_template == published_template(name)


def _collapse(ids: list[int], block: set[int], placeholder: int) -> list[int]:
    """Each run of image / markup tokens replaced by one placeholder: where the template put the image."""
    out: list[int] = []
    for t in ids:
        if t in block:
            if not (out and out[-1] == placeholder):
                out.append(placeholder)
        else:
            out.append(t)
    return out


@pytest.mark.parametrize("system_prompt", [None, "be safe ."])
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_template_twin_and_image_positions(family, name, system_prompt):
    """(a) the text-only twin is the published template applied to the conversation without the image, and the
    multimodal prompt is the template applied with it; (b) the image tokens sit where the template put the image,
    as many as the family's processor expands an image of that size into (the model checks its features
    against them), and removing them and their markup leaves exactly the twin."""
    model, processor = family(name)
    adapter = get_adapter(model, processor)
    tok = processor.tokenizer
    for prompt in PROMPTS:
        for with_image in (False, True):
            conv = [{"role": "user", "content": ([{"type": "image"}] if with_image else [])
                     + [{"type": "text", "text": prompt}]}]
            if system_prompt:
                conv.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
            want = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
            assert adapter.render(prompt, with_image, system_prompt=system_prompt) == want
    images = [random_image(1, 48).resize((48, 24)), random_image(2), random_image(3), random_image(4, 40)]
    mm, text = adapter.build_pair(PROMPTS, images, padding_side="right", system_prompt=system_prompt)
    markup = {tok.convert_tokens_to_ids(t) for t in MARKUP[name]}
    placeholder = tok.convert_tokens_to_ids(adapter.image_placeholder)
    block = markup | {adapter.image_token_id, placeholder}
    for row, prompt in enumerate(PROMPTS):
        mm_ids = mm["input_ids"][row][mm["attention_mask"][row].bool()].tolist()
        txt_ids = text["input_ids"][row][text["attention_mask"][row].bool()].tolist()
        assert txt_ids == tok(adapter.render(prompt, False, system_prompt=system_prompt),
                              add_special_tokens=False)["input_ids"]
        assert [t for t in mm_ids if t not in block] == txt_ids
        rendered = tok(adapter.render(prompt, True, system_prompt=system_prompt),
                       add_special_tokens=False)["input_ids"]
        assert _collapse(mm_ids, block, placeholder) == _collapse(rendered, block, placeholder)
        assert mm_ids.count(adapter.image_token_id) > 0
    with torch.no_grad():
        model(**mm)  # raises if the image tokens and the image features differ in number


def test_published_mllama_template_explains_the_twin_refusal(family):
    """Llama 3.2 Vision's published template adds its system block only without an image and refuses a system
    message with an image: the twin differs by more than the image, so vlmsafe refuses what needs it."""
    model, processor = family("mllama")
    adapter = get_adapter(model, processor)
    text_only, with_image = adapter.render("hello", False), adapter.render("hello", True)
    conv = [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]
    assert text_only == processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert "Cutting Knowledge Date: December 2023" in text_only and "Cutting Knowledge" not in with_image
    assert with_image.endswith("<|start_header_id|>user<|end_header_id|>\n\n<|image|>hello<|eot_id|>"
                               "<|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(Exception, match="Prompting with images is incompatible with system messages"):
        adapter.render("hello", True, system_prompt="be safe .")
    with pytest.raises(UnsupportedModelError, match="cross-attention"):
        adapter.build_pair(["hello"], [random_image(1)])


def test_missing_published_template_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="no published chat template there; pass template='sketch'"):
        published_template("gemma3", root=tmp_path)
    with pytest.raises(InputError, match="template must be one of"):
        FAMILY_BUILDERS["gemma3"](template="hub")
    _, processor = FAMILY_BUILDERS["internvl"](template="sketch")  # the short stand-in, same prompt format
    assert processor.chat_template != published_template("internvl")
