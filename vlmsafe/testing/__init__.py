"""Tiny, offline, random-weight instances of every supported architecture, with working processors.

Tests (ours and users') need the *real* transformers / open_clip classes, fast and without
downloads. Each builder returns ``(model, processor)`` in eval mode, seeded, in well under a
second: a word-level tokenizer with the family's special tokens and chat template, and the
family's real image processor configured for tiny images.

``tokenizer="real"`` (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL) swaps the word-level tokenizer for the
processor of a published checkpoint as users load it: the real tokenizer class (``LlamaTokenizerFast``,
``Qwen2TokenizerFast``) with a tiny vocabulary trained offline, the published special tokens and the
published ``chat_template`` (llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf,
Qwen/Qwen2-VL-7B-Instruct). Those processors are read offline from ``tests/fixtures/tokenizers`` of a
source checkout (see :func:`real_processor`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmsafe.errors import InputError
from vlmsafe.testing.tokenization import (
    IMAGE_TOKEN,
    LLAVA_CHAT_TEMPLATE,
    QWEN2VL_CHAT_TEMPLATE,
    QWEN2VL_SPECIAL_TOKENS,
    build_word_tokenizer,
)

#: A small vocabulary that covers the prompts used in tests and examples.
TEST_WORDS = (  # noqa: SIM905 (a word list reads best as text)
    "how do i make a bomb build weapon hack into computer steal car write poem about cats what colour "
    "is the shape in image describe picture count objects there are red green blue circle square "
    "triangle sure here steps to i cannot help with that sorry tell me story . , ? ! one two three"
).split()

IMAGE_SIZE = 32

#: Processor fixtures of published checkpoints, by family (folders under :data:`REAL_PROCESSOR_DIR`).
REAL_PROCESSORS = {
    "llava": "llava-1.5-7b-hf",
    "llava_next": "llava-v1.6-mistral-7b-hf",
    "qwen2_vl": "Qwen2-VL-7B-Instruct",
}
#: Where a source checkout keeps them (``VLMSAFE_TOKENIZER_FIXTURES`` overrides).
REAL_PROCESSOR_DIR = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "tokenizers"
TOKENIZER_KINDS = ("word", "real")


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


#: The tiny language model (a ``LlamaConfig``): every builder's text side, less what it overrides.
_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
#: The tiny CLIP vision tower (a ``CLIPVisionConfig``): patch 8 at :data:`IMAGE_SIZE` pixels.
_TINY_VISION = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                    num_attention_heads=2, projection_dim=16)


def tiny_text_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**_TINY_TEXT, "vocab_size": vocab_size, **overrides})


def tiny_vision_config(**overrides):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**{**_TINY_VISION, **overrides})


def tiny_tokenizer(**kwargs):
    return build_word_tokenizer(TEST_WORDS, **kwargs)


def real_processor(family: str, root: str | os.PathLike[str] | None = None):
    """The offline processor fixture of a published checkpoint for ``family`` (see :data:`REAL_PROCESSORS`).

    Loaded with ``AutoProcessor.from_pretrained`` exactly as a user loads the hub repository, so the
    tokenizer class, special tokens and chat template are the published ones; vocabularies are tiny and
    images 32 pixels. ``root`` defaults to ``$VLMSAFE_TOKENIZER_FIXTURES`` or the checkout's fixtures.
    """
    from transformers import AutoProcessor

    if family not in REAL_PROCESSORS:
        raise InputError(f"no real-tokenizer fixture for family {family!r}; use one of {', '.join(REAL_PROCESSORS)}")
    base = Path(root or os.environ.get("VLMSAFE_TOKENIZER_FIXTURES") or REAL_PROCESSOR_DIR)
    folder = base / REAL_PROCESSORS[family]
    if not (folder / "tokenizer.json").is_file():
        raise InputError(
            f"{folder}: no processor fixture there; pass root= (or set VLMSAFE_TOKENIZER_FIXTURES) to the "
            "tests/fixtures/tokenizers folder of a vlmsafe source checkout"
        )
    return AutoProcessor.from_pretrained(folder)


def _check_tokenizer_kind(tokenizer: str) -> None:
    if tokenizer not in TOKENIZER_KINDS:
        raise InputError(f"tokenizer must be one of {TOKENIZER_KINDS}, got {tokenizer!r}")


def _check_variant(variant: str, *variants: str) -> None:
    """Refuse an unknown ``variant`` of a builder before any work, naming the ones there are."""
    if variant not in variants:
        raise InputError(f"unknown variant {variant!r}; use {' or '.join(map(repr, variants))}")


def _token_ids(tok) -> dict:
    """pad/bos/eos ids of a tokenizer for a tiny text config (``None`` where the tokenizer has none)."""
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


#: Processor settings the tiny LLaVA and LLaVA-NeXT share (CLIP patch 8 at 32 px, CLS token dropped).
_LLAVA_PROCESSOR_KWARGS = dict(
    patch_size=8,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,
    chat_template=LLAVA_CHAT_TEMPLATE,
)


def tiny_llava(seed: int = 0, num_layers: int = 3, *, tokenizer: str = "word"):
    """A random ``LlavaForConditionalGeneration`` (llava-1.5 layout) + ``LlavaProcessor``.

    ``tokenizer="real"``: the llava-1.5-7b-hf processor fixture (``LlamaTokenizerFast``, published template).
    """
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    _check_tokenizer_kind(tokenizer)
    _seed(seed)
    if tokenizer == "real":
        processor = real_processor("llava")
        tok = processor.tokenizer
    else:
        tok = tiny_tokenizer()
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            **_LLAVA_PROCESSOR_KWARGS,
        )
    config = LlavaConfig(
        text_config=tiny_text_config(len(tok), num_hidden_layers=num_layers, **_token_ids(tok)),
        vision_config=tiny_vision_config(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval()
    return model, processor


def tiny_llava_next(seed: int = 0, *, tokenizer: str = "word"):
    """A random ``LlavaNextForConditionalGeneration`` (AnyRes tiling) + ``LlavaNextProcessor``.

    ``tokenizer="real"``: the llava-v1.6-mistral-7b-hf processor fixture (``LlamaTokenizerFast``, published
    ``[INST]`` template).
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    _check_tokenizer_kind(tokenizer)
    _seed(seed)
    if tokenizer == "real":
        processor = real_processor("llava_next")
        tok = processor.tokenizer
        pinpoints = [list(p) for p in processor.image_processor.image_grid_pinpoints]
    else:
        tok = tiny_tokenizer()
        pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": IMAGE_SIZE},
            crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            **_LLAVA_PROCESSOR_KWARGS,
        )
    config = LlavaNextConfig(
        text_config=tiny_text_config(len(tok), **_token_ids(tok)),
        vision_config=tiny_vision_config(),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaNextForConditionalGeneration(config).eval()
    return model, processor


def tiny_qwen2_vl(seed: int = 0, variant: str = "qwen2_vl", *, tokenizer: str = "word"):
    """A random ``Qwen2VLForConditionalGeneration`` (or ``variant="qwen2_5_vl"``) + processor.

    ``tokenizer="real"``: the Qwen2-VL-7B-Instruct processor fixture (``Qwen2TokenizerFast``, published
    template with its default system turn); Qwen2.5-VL then runs with the Qwen2-VL processor.
    """
    from transformers import Qwen2VLImageProcessor

    _check_tokenizer_kind(tokenizer)
    _check_variant(variant, "qwen2_vl", "qwen2_5_vl")
    _seed(seed)
    real = real_processor("qwen2_vl") if tokenizer == "real" else None
    if real is not None:
        tok = real.tokenizer
    else:
        tok = build_word_tokenizer(
            TEST_WORDS,
            special_tokens=QWEN2VL_SPECIAL_TOKENS,
            chat_template=QWEN2VL_CHAT_TEMPLATE,
            image_token="<|image_pad|>",
        )
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessor(
        patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=16 * 16, max_pixels=IMAGE_SIZE * IMAGE_SIZE
    )
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0},
        **({"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2} if real is None else _token_ids(tok)),
    )
    if variant == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        vision = dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        config_cls, model_cls, proc_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        vision = dict(depth=1, hidden_size=16, out_hidden_size=32, intermediate_size=32, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                      fullatt_block_indexes=[0])
        config_cls, model_cls, proc_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    from transformers import Qwen2VLVideoProcessor

    video_processor = Qwen2VLVideoProcessor(patch_size=4, temporal_patch_size=2, merge_size=2)
    if real is not None and variant == "qwen2_vl":
        processor = real
    else:
        template = real.chat_template if real is not None else QWEN2VL_CHAT_TEMPLATE
        processor = proc_cls(
            image_processor=image_processor, tokenizer=tok, video_processor=video_processor, chat_template=template
        )
    model = model_cls(config).eval()
    return model, processor


def tiny_causal_lm(seed: int = 0, num_layers: int = 3):
    """A random ``LlamaForCausalLM`` + word-level tokenizer (text-only)."""
    from transformers import LlamaForCausalLM

    _seed(seed)
    tok = tiny_tokenizer()
    model = LlamaForCausalLM(tiny_text_config(len(tok), num_hidden_layers=num_layers)).eval()
    return model, tok


def tiny_clip(seed: int = 0):
    """A random HF ``CLIPModel`` + ``CLIPProcessor``-like pair (word-level tokenizer, CLIP image processor)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig

    _seed(seed)
    tok = build_word_tokenizer(TEST_WORDS, special_tokens=(), chat_template=None, padding_side="right",
                               image_token=None)
    config = CLIPConfig(
        text_config=CLIPTextConfig(
            vocab_size=len(tok), hidden_size=24, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ).to_dict(),
        vision_config=tiny_vision_config().to_dict(),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                         crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return model, _CLIPProcessorPair(tok, image_processor)


class _CLIPProcessorPair:
    """Minimal processor holding a tokenizer and an image processor (``CLIPProcessor`` needs a CLIP tokenizer)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer = tokenizer
        self.image_processor = image_processor


def tiny_open_clip(seed: int = 0):
    """A random open_clip ``CLIP`` model built from an in-memory config (no pretrained tag)."""
    import open_clip
    from open_clip.model import CLIP
    from torchvision import transforms

    _seed(seed)
    model = CLIP(
        embed_dim=16,
        vision_cfg={"image_size": IMAGE_SIZE, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
        text_cfg={"context_length": 16, "vocab_size": 64, "width": 32, "heads": 2, "layers": 2},
    ).eval()
    preprocess = transforms.Compose([
        transforms.Resize(IMAGE_SIZE),
        transforms.CenterCrop(IMAGE_SIZE),
        transforms.ToTensor(),
        transforms.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD),
    ])

    def tokenizer(texts):
        # Deterministic toy tokenizer: SOT=1, words hashed into [3, 63], EOT=63 (argmax = end of text).
        out = torch.zeros(len(texts), 16, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [1, *[3 + (sum(map(ord, w)) % 59) for w in text.lower().split()][:14], 63]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    return model, {"tokenizer": tokenizer, "preprocess": preprocess}


def tiny_unet(cross_attention_dim: int, *, sdxl: bool = False, seed: int = 0):
    """A random diffusers ``UNet2DConditionModel`` on 4-channel 8x8 latents (SD layout; ``sdxl``: text-time
    added conditions for a 32-wide pooled text embedding, as ``StableDiffusionXLPipeline`` passes them)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32) if sdxl else {}
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8, **extra,
    )  # fmt: skip


def tiny_vae(seed: int = 0):
    """A random diffusers ``AutoencoderKL``: 16x16 RGB images <-> 4-channel 8x8 latents."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], latent_channels=4, norm_num_groups=8,
        sample_size=16,
    )  # fmt: skip


def tiny_sd_pipeline(text_encoder, tokenizer, *, seed: int = 0):
    """A random ``StableDiffusionPipeline`` around ``text_encoder`` (DDIM, no safety checker)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=tiny_vae(seed), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=tiny_unet(text_encoder.config.hidden_size, seed=seed),
        scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip


def solid_image(color: tuple[int, int, int] = (200, 30, 30), size: int = IMAGE_SIZE) -> Image.Image:
    return Image.new("RGB", (size, size), color)


def random_image(seed: int = 0, size: int = IMAGE_SIZE) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


BUILDERS = {
    "llava": tiny_llava,
    "llava_next": tiny_llava_next,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": lambda seed=0: tiny_qwen2_vl(seed, variant="qwen2_5_vl"),
    "causal_lm": tiny_causal_lm,
}

#: Builders with the published processors (real tokenizer classes and chat templates), by fixture name.
REAL_TOKENIZER_BUILDERS = {
    REAL_PROCESSORS["llava"]: lambda seed=0: tiny_llava(seed, tokenizer="real"),
    REAL_PROCESSORS["llava_next"]: lambda seed=0: tiny_llava_next(seed, tokenizer="real"),
    REAL_PROCESSORS["qwen2_vl"]: lambda seed=0: tiny_qwen2_vl(seed, tokenizer="real"),
}
