"""Tiny, offline, random-weight models of the VLM families people run today, with working processors.

Each builder returns ``(model, processor)``: the family's real transformers model class built from its
own config class with the default architecture shrunk (2-3 decoder layers, widths of 16-32, 32-pixel
images), and the family's real processor class around a word-level tokenizer that carries the family's
special tokens. The chat template is, by default (``template="published"``), the checkpoint's published
template byte for byte, read from ``tests/fixtures/templates/<family>/chat_template.json`` (sources in each
folder's ``SOURCE.md``; :mod:`vlmsafe.testing.family_text`); ``template="sketch"`` uses the short templates
below, written to render the same prompt format without tool calls, videos and role checks. Nothing is downloaded.

Kept apart from :data:`vlmsafe.testing.BUILDERS` (which ``tests/conftest.py`` builds for every session):
these are built only by the tests that use them (:data:`FAMILY_BUILDERS`).

Weights a fresh model initialises to zero are randomised so the image has an effect: Gemma 3's
multimodal projection and mllama's cross-attention gates.
"""

from __future__ import annotations

import torch

from vlmsafe.errors import InputError
from vlmsafe.testing import IMAGE_SIZE, _check_variant, _seed, _token_ids
from vlmsafe.testing.family_text import TEMPLATES, family_template, family_tokenizer


def _text(tok, **overrides) -> dict:
    kwargs = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                  tie_word_embeddings=False, **_token_ids(tok))
    kwargs.update(overrides)
    return kwargs


def _siglip(**overrides) -> dict:
    kwargs = dict(model_type="siglip_vision_model", image_size=IMAGE_SIZE, patch_size=8, hidden_size=24,
                  intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
    kwargs.update(overrides)
    return kwargs


def _user_turns(image: str, sep: str = "") -> str:
    """Jinja: a user turn's images (``image`` each) then its texts, as the published templates order them."""
    return ("{% for c in message['content'] %}{% if c['type'] == 'image' %}" + image + "{% endif %}{% endfor %}"
            "{% for c in message['content'] %}{% if c['type'] == 'text' %}"
            "{{ " + repr(sep) + " + c['text'] }}{% endif %}{% endfor %}")


# ------------------------------------------------------------------------------------------- LLaVA-OneVision
#: llava-hf/llava-onevision-qwen2-7b-ov-hf: ``<|im_start|>user <image>\n{text}<|im_end|><|im_start|>assistant\n``.
ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    + _user_turns("<image>", "\n") + "<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_llava_onevision(seed: int = 0, template: str = "published", text: dict | None = None):
    """``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2, AnyRes-max tiling) + its processor."""
    import transformers as t

    _seed(seed)
    chat_template = family_template("llava_onevision", template, ONEVISION_TEMPLATE)
    tok = family_tokenizer(("<image>", "<video>", "<|im_start|>", "<|im_end|>"),
                           {"image_token": "<image>", "video_token": "<video>"}, chat_template=chat_template,
                           bos="<|endoftext|>", eos="<|im_end|>")
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = t.LlavaOnevisionProcessor(
        image_processor=t.LlavaOnevisionImageProcessor(size=size, crop_size=size, image_grid_pinpoints=pinpoints),
        tokenizer=tok, video_processor=t.LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(IMAGE_SIZE // 8) ** 2, vision_feature_select_strategy="full",
        chat_template=chat_template,
    )
    config = t.LlavaOnevisionConfig(
        text_config=dict(model_type="qwen2", **_text(tok, **(text or {}))), vision_config=_siglip(),
        image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full", vision_feature_layer=-1,
    )
    return t.LlavaOnevisionForConditionalGeneration(config).eval(), processor


# ------------------------------------------------------------------------------------------------- Qwen3-VL
#: Qwen/Qwen3-VL-8B-Instruct (no default system turn, unlike Qwen2-VL).
QWEN3VL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN3VL_SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                   "<|video_pad|>")


def tiny_qwen3_vl(seed: int = 0, moe: bool = False, template: str = "published", text: dict | None = None):
    """``Qwen3VLForConditionalGeneration`` (``moe=True``: ``Qwen3VLMoeForConditionalGeneration``; DeepStack
    visual features added to the first decoder layers) + ``Qwen3VLProcessor``."""
    import transformers as t

    _seed(seed)
    chat_template = family_template("qwen3_vl", template, QWEN3VL_TEMPLATE)
    tok = family_tokenizer(QWEN3VL_SPECIAL, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                             "vision_bos_token": "<|vision_start|>",
                                             "vision_eos_token": "<|vision_end|>"},
                           chat_template=chat_template, bos="<|endoftext|>", eos="<|im_end|>")
    ids = {s: tok.convert_tokens_to_ids(s) for s in QWEN3VL_SPECIAL}
    processor = t.Qwen3VLProcessor(
        image_processor=t.Qwen2VLImageProcessor(patch_size=4, temporal_patch_size=2, merge_size=2,
                                                size={"shortest_edge": 16 * 16, "longest_edge": IMAGE_SIZE ** 2}),
        tokenizer=tok, video_processor=t.Qwen3VLVideoProcessor(patch_size=4, temporal_patch_size=2, merge_size=2),
        chat_template=chat_template,
    )
    text = _text(tok, **(text or {}))
    half = text["head_dim"] // 2  # M-RoPE sections (temporal, height, width) cover half the head: [2, 1, 1] at 8
    sections = [half // 2, half // 4, half - half // 2 - half // 4]
    text["rope_parameters"] = {"rope_type": "default", "mrope_section": sections, "rope_theta": 10000.0,
                               "mrope_interleaved": True}
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=4, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, decoder_sparse_step=1)
        config_cls, model_cls = t.Qwen3VLMoeConfig, t.Qwen3VLMoeForConditionalGeneration
    else:
        config_cls, model_cls = t.Qwen3VLConfig, t.Qwen3VLForConditionalGeneration
    config = config_cls(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"])
    return model_cls(config).eval(), processor


# --------------------------------------------------------------------------------------------------- Gemma 3
#: google/gemma-3-4b-it: a system turn is folded into the first user turn; images are ``<start_of_image>``.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set first = messages[0]['content'][0]['text'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _randomise(*tensors: torch.Tensor, std: float = 0.5) -> None:
    with torch.no_grad():
        for tensor in tensors:
            tensor.normal_(0.0, std)


def tiny_gemma3(seed: int = 0, template: str = "published", text: dict | None = None):
    """``Gemma3ForConditionalGeneration`` (SigLIP, pooled to 4 soft tokens, Gemma 3 text with sliding-window
    layers) + ``Gemma3Processor``. The multimodal projection (zero in a fresh model) is randomised."""
    import transformers as t

    _seed(seed)
    chat_template = family_template("gemma3", template, GEMMA3_TEMPLATE)
    tok = family_tokenizer(("<start_of_turn>", "<end_of_turn>"),
                           {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                            "eoi_token": "<end_of_image>"}, chat_template=chat_template, bos="<bos>", eos="<eos>")
    processor = t.Gemma3Processor(
        image_processor=t.Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tok, image_seq_length=4, chat_template=chat_template,
    )
    config = t.Gemma3Config(
        text_config=dict(model_type="gemma3_text", **_text(tok, sliding_window=16, tie_word_embeddings=True,
                                                          **(text or {}))),
        vision_config=_siglip(), mm_tokens_per_image=4, image_token_id=tok.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_id=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_id=tok.convert_tokens_to_ids("<end_of_image>"), tie_word_embeddings=True,
    )
    model = t.Gemma3ForConditionalGeneration(config).eval()
    _randomise(model.model.multi_modal_projector.mm_input_projection_weight, std=0.2)
    return model, processor


# ------------------------------------------------------------------------------------------ Mistral 3 / Pixtral
#: mistralai/Mistral-Small-3.1-24B-Instruct-2503 (hf): ``<s>[INST]{images}{text}[/INST]``.
MISTRAL3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ message['content'][0]['text'] }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]" + _user_turns("[IMG]") + "[/INST]"
    "{% else %}{{ message['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


def tiny_mistral3(seed: int = 0, template: str = "published", text: dict | None = None):
    """``Mistral3ForConditionalGeneration`` (Pixtral ViT, 2x2 patch merger, Mistral text) + ``PixtralProcessor``."""
    import transformers as t

    _seed(seed)
    chat_template = family_template("mistral3", template, MISTRAL3_TEMPLATE)
    tok = family_tokenizer(("[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]", "[IMG_BREAK]",
                            "[IMG_END]"), {"image_token": "[IMG]"}, chat_template=chat_template)
    processor = t.PixtralProcessor(
        image_processor=t.PixtralImageProcessor(size={"longest_edge": IMAGE_SIZE}, patch_size=4),
        tokenizer=tok, patch_size=4, spatial_merge_size=2, chat_template=chat_template,
    )
    config = t.Mistral3Config(
        text_config=dict(model_type="mistral", **_text(tok, **(text or {}))),
        vision_config=dict(model_type="pixtral", image_size=IMAGE_SIZE, patch_size=4, hidden_size=16,
                           intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=8),
        image_token_id=tok.convert_tokens_to_ids("[IMG]"), spatial_merge_size=2, vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return t.Mistral3ForConditionalGeneration(config).eval(), processor


# -------------------------------------------------------------------------------------- SmolVLM / Idefics3
#: HuggingFaceTB/SmolVLM-Instruct: ``<|im_start|>User:<image>{text}<end_of_utterance>\nAssistant:``.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tiny_smolvlm(seed: int = 0, variant: str = "smolvlm", template: str = "published", text: dict | None = None):
    """``SmolVLMForConditionalGeneration`` (or ``variant="idefics3"``): SigLIP + pixel-shuffle connector, the
    language model under ``model.text_model``; with ``Idefics3Processor`` (``SmolVLMProcessor`` needs the
    ``num2words`` package; both expand ``<image>`` the same way for one unsplit image)."""
    import transformers as t

    _check_variant(variant, "smolvlm", "idefics3")
    _seed(seed)
    chat_template = family_template("smolvlm", template, SMOLVLM_TEMPLATE)
    tok = family_tokenizer(("<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                            "<global-img>"), {"image_token": "<image>"}, chat_template=chat_template,
                           eos="<end_of_utterance>")
    processor = t.Idefics3Processor(
        image_processor=t.Idefics3ImageProcessor(size={"longest_edge": IMAGE_SIZE}, do_image_splitting=False,
                                                 max_image_size={"longest_edge": IMAGE_SIZE}),
        tokenizer=tok, image_seq_len=(IMAGE_SIZE // 8) ** 2 // 4, chat_template=chat_template,
    )
    vision = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2)
    text = dict(model_type="llama", **_text(tok, **(text or {})))
    image_token_id = tok.convert_tokens_to_ids("<image>")
    if variant == "smolvlm":
        config = t.SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=2, image_token_id=image_token_id)
        model = t.SmolVLMForConditionalGeneration(config)
    else:
        config = t.Idefics3Config(text_config=text, vision_config=vision, scale_factor=2,
                                  image_token_id=image_token_id)
        model = t.Idefics3ForConditionalGeneration(config)
    return model.eval(), processor


# ------------------------------------------------------------------------------------------------- Idefics2
#: HuggingFaceM4/idefics2-8b: ``User:<image>{text}<end_of_utterance>\nAssistant:`` (SmolVLM's format without its
#: ``<|im_start|>``; no published copy was found to store byte for byte: a sketch).
IDEFICS2_TEMPLATE = SMOLVLM_TEMPLATE.replace("<|im_start|>", "", 1)


def tiny_idefics2(seed: int = 0, template: str = "sketch", text: dict | None = None):
    """``Idefics2ForConditionalGeneration`` (SigLIP + perceiver resampler to a fixed number of latents + Mistral; the
    language model under ``model.text_model``) + ``Idefics2Processor`` (one unsplit 32-pixel image)."""
    import transformers as t

    _seed(seed)
    if template == "published":
        raise InputError("no published Idefics2 chat template is stored (tests/fixtures/templates has none); "
                         "pass template='sketch'")
    chat_template = family_template("idefics2", template, IDEFICS2_TEMPLATE)
    tok = family_tokenizer(("<end_of_utterance>", "<fake_token_around_image>", "<image>"), {},
                           chat_template=chat_template, eos="<end_of_utterance>")
    latents = 4
    processor = t.Idefics2Processor(
        image_processor=t.Idefics2ImageProcessor(size={"shortest_edge": IMAGE_SIZE, "longest_edge": IMAGE_SIZE},
                                                 do_image_splitting=False),
        tokenizer=tok, image_seq_len=latents, chat_template=chat_template,
    )
    text_config = dict(model_type="mistral", **_text(tok, **(text or {})))
    config = t.Idefics2Config(
        text_config=text_config,
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=24, intermediate_size=48,
                           num_hidden_layers=2, num_attention_heads=2),
        perceiver_config=dict(hidden_size=text_config["hidden_size"], resampler_n_latents=latents, resampler_depth=1,
                              resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=1),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )
    return t.Idefics2ForConditionalGeneration(config).eval(), processor


# ----------------------------------------------------------------------------------------------- Aya Vision
#: CohereForAI/aya-vision-8b (Command R7B turns; a sketch: no published copy was found to store byte for byte).
AYA_VISION_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|START_OF_TURN_TOKEN|>"
    "{% if message['role'] == 'user' %}<|USER_TOKEN|>{% elif message['role'] == 'system' %}<|SYSTEM_TOKEN|>"
    "{% else %}<|CHATBOT_TOKEN|>{% endif %}" + _user_turns("<image>") + "<|END_OF_TURN_TOKEN|>{% endfor %}"
    "{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
)
AYA_VISION_MARKUP = ("<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL")


def tiny_aya_vision(seed: int = 0, template: str = "sketch", text: dict | None = None):
    """``AyaVisionForConditionalGeneration`` (SigLIP, pixel-shuffle 2x2 + SwiGLU projector, Cohere2 text) +
    ``AyaVisionProcessor`` (one 32-pixel tile: 4 ``<|IMG_PATCH|>`` tokens after ``TILE_GLOBAL``)."""
    import transformers as t

    _seed(seed)
    if template == "published":
        raise InputError("no published Aya Vision chat template is stored (tests/fixtures/templates has none); "
                         "pass template='sketch'")
    chat_template = family_template("aya_vision", template, AYA_VISION_TEMPLATE)
    tok = family_tokenizer(("<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                            "<|SYSTEM_TOKEN|>", "<image>", "<|IMG_PATCH|>", *AYA_VISION_MARKUP),
                           {"image_token": "<image>"}, chat_template=chat_template, bos="<BOS_TOKEN>",
                           eos="<|END_OF_TURN_TOKEN|>")
    processor = t.AyaVisionProcessor(
        image_processor=t.GotOcr2ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                crop_to_patches=False),
        tokenizer=tok, patch_size=16, img_size=IMAGE_SIZE, chat_template=chat_template,
    )
    config = t.AyaVisionConfig(
        text_config=dict(model_type="cohere2", **_text(tok, **(text or {}))), vision_config=_siglip(),
        image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=2,
    )
    return t.AyaVisionForConditionalGeneration(config).eval(), processor


# -------------------------------------------------------------------------------------------------- GLM-4V
#: zai-org/GLM-4.1V-9B-Thinking style turns: ``[gMASK]<sop><|user|>\n<|begin_of_image|><|image|><|end_of_image|>
#: {text}<|assistant|>\n`` (a sketch without the thinking and tool parts: no published copy was stored).
GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}<|{{ message['role'] }}|>{{ '\n' }}"
    + _user_turns("<|begin_of_image|><|image|><|end_of_image|>") + "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{{ '\n' }}{% endif %}"
)
GLM4V_SPECIAL = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
                 "<|end_of_image|>", "<|image|>", "<|video|>", "<|begin_of_video|>", "<|end_of_video|>")


def tiny_glm4v(seed: int = 0, template: str = "sketch", text: dict | None = None):
    """``Glm4vForConditionalGeneration`` (GLM-4.1V: a Qwen2-VL-style native-resolution ViT with a 2x2 merger, the
    GLM-4 text model with partial, 3-section M-RoPE) + ``Glm4vProcessor``."""
    import transformers as t

    _seed(seed)
    if template == "published":
        raise InputError("no published GLM-4V chat template is stored (tests/fixtures/templates has none); "
                         "pass template='sketch'")
    chat_template = family_template("glm4v", template, GLM4V_TEMPLATE)
    tok = family_tokenizer(GLM4V_SPECIAL, {"image_token": "<|image|>", "video_token": "<|video|>"},
                           chat_template=chat_template, bos="<|endoftext|>", eos="<|user|>")
    patches = dict(patch_size=4, temporal_patch_size=2, merge_size=2)
    processor = t.Glm4vProcessor(
        image_processor=t.Glm4vImageProcessor(size={"shortest_edge": 16 * 16, "longest_edge": IMAGE_SIZE ** 2},
                                              **patches),
        tokenizer=tok, video_processor=t.Glm4vVideoProcessor(**patches), chat_template=chat_template,
    )
    text = _text(tok, partial_rotary_factor=0.5, **(text or {}))
    quarter = text["head_dim"] // 4  # the rotary half-dimension at partial_rotary_factor 0.5
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                               "mrope_section": [quarter // 2, quarter - quarter // 2 - quarter // 4, quarter // 4]}
    ids = {s: tok.convert_tokens_to_ids(s) for s in GLM4V_SPECIAL}
    config = t.Glm4vConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, image_size=IMAGE_SIZE,
                           out_hidden_size=text["hidden_size"], patch_size=4, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )
    return t.Glm4vForConditionalGeneration(config).eval(), processor


# ------------------------------------------------------------------------------------------------ InternVL
#: OpenGVLab/InternVL3-1B-hf: Qwen2 turns, an image is ``<IMG_CONTEXT>\n`` before the text.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_internvl(seed: int = 0, template: str = "published", text: dict | None = None):
    """``InternVLForConditionalGeneration`` (InternViT, pixel-shuffle MLP projector, Qwen2 text; the HF-native
    layout) + ``InternVLProcessor`` (one 32-pixel tile, no thumbnail)."""
    import transformers as t

    _seed(seed)
    chat_template = family_template("internvl", template, INTERNVL_TEMPLATE)
    tok = family_tokenizer(("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"),
                           {"start_image_token": "<img>", "end_image_token": "</img>",
                            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
                           chat_template=chat_template, bos="<|endoftext|>", eos="<|im_end|>")
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = t.InternVLProcessor(
        image_processor=t.GotOcr2ImageProcessor(size=size, crop_to_patches=False),
        tokenizer=tok, video_processor=t.InternVLVideoProcessor(size=size),
        image_seq_length=(IMAGE_SIZE // 8) ** 2 // 4, chat_template=chat_template,
    )
    config = t.InternVLConfig(
        text_config=dict(model_type="qwen2", **_text(tok, **(text or {}))),
        vision_config=dict(image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[8, 8], hidden_size=24,
                           intermediate_size=48, num_hidden_layers=2, num_attention_heads=2),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
    )
    return t.InternVLForConditionalGeneration(config).eval(), processor


# ----------------------------------------------------------------------------------------------- PaliGemma
def tiny_paligemma(seed: int = 0, template: str = "published", text: dict | None = None):
    """``PaliGemmaForConditionalGeneration`` (SigLIP + linear projector + Gemma, prefix-LM) + ``PaliGemmaProcessor``
    (no chat template, published or not: ``<image>*N<bos>{prompt}\\n``)."""
    import transformers as t

    if template not in TEMPLATES:
        raise InputError(f"template must be one of {TEMPLATES}, got {template!r}")
    _seed(seed)
    tok = family_tokenizer((), {"image_token": "<image>"}, bos="<bos>", eos="<eos>", chat_template=None)
    image_processor = t.SiglipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // 8) ** 2
    processor = t.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    config = t.PaliGemmaConfig(
        text_config=dict(model_type="gemma", **_text(tok, **(text or {}))),
        vision_config=_siglip(projection_dim=(text or {}).get("hidden_size", 32)),
        image_token_id=tok.convert_tokens_to_ids("<image>"), projection_dim=(text or {}).get("hidden_size", 32),
    )
    return t.PaliGemmaForConditionalGeneration(config).eval(), processor


# ---------------------------------------------------------------------------------- Llama 3.2 Vision (mllama)
#: meta-llama/Llama-3.2-11B-Vision-Instruct, without tools and dates: a system block only when no image is given.
MLLAMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(image=false) %}{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{% set ns.image = true %}{% endif %}{% endfor %}{% endfor %}"
    "{% if not ns.image %}<|start_header_id|>system<|end_header_id|>{{ '\n\n' }}"
    "Cutting Knowledge Date: December 2023<|eot_id|>{% endif %}"
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>{{ '\n\n' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|image|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{{ '\n\n' }}{% endif %}"
)


def tiny_mllama(seed: int = 0, template: str = "published", text: dict | None = None):
    """``MllamaForConditionalGeneration`` (tiled ViT + cross-attention layer 1 of 3 in the Llama text model) +
    ``MllamaProcessor``. The cross-attention gates (zero in a fresh model) are randomised."""
    import transformers as t

    _seed(seed)
    chat_template = family_template("mllama", template, MLLAMA_TEMPLATE)
    tok = family_tokenizer(("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|image|>"),
                           {"image_token": "<|image|>"}, chat_template=chat_template, bos="<|begin_of_text|>",
                           eos="<|eot_id|>", pad="<|finetune_right_pad_id|>")
    processor = t.MllamaProcessor(
        image_processor=t.MllamaImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=2),
        tokenizer=tok, chat_template=chat_template,
    )
    config = t.MllamaConfig(
        text_config={**dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1],
                            max_position_embeddings=512, **_token_ids(tok)),
                     **{k: v for k, v in (text or {}).items() if k != "head_dim"}},
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, vision_output_dim=32, image_size=IMAGE_SIZE, patch_size=8,
                           max_num_tiles=2, intermediate_layers_indices=[0],
                           supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"),
    )
    model = t.MllamaForConditionalGeneration(config).eval()
    for layer in config.text_config.cross_attention_layers:
        block = model.model.language_model.layers[layer]
        _randomise(block.cross_attn_attn_gate, block.cross_attn_mlp_gate, std=1.0)
    return model, processor


#: ``name -> builder(seed=0, template="published", text=None)``; ``text``: overrides of the language model's
#: config (widths, depth, heads: e.g. the GPU smoke run's reduced-but-real shapes), merged over the tiny defaults.
FAMILY_BUILDERS = {
    "llava_onevision": tiny_llava_onevision,
    "qwen3_vl": tiny_qwen3_vl,
    "qwen3_vl_moe": lambda seed=0, template="published", text=None: tiny_qwen3_vl(seed, True, template, text),
    "gemma3": tiny_gemma3,
    "mistral3": tiny_mistral3,
    "smolvlm": tiny_smolvlm,
    "idefics3": lambda seed=0, template="published", text=None: tiny_smolvlm(seed, "idefics3", template, text),
    "idefics2": tiny_idefics2,
    "aya_vision": tiny_aya_vision,
    "glm4v": tiny_glm4v,
    "internvl": tiny_internvl,
    "paligemma": tiny_paligemma,
    "mllama": tiny_mllama,
}
