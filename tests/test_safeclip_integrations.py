"""Safe-CLIP encoders inside a tiny Stable Diffusion pipeline and a tiny LLaVA (built from config)."""

import pytest
import torch

from vlmsafe.errors import InputError, UnsupportedModelError
from vlmsafe.safeclip import apply_safe_text_encoder, apply_safe_vision_encoder, load_safe_text_encoder
from vlmsafe.testbed.safeclip import tiny_clip_backend
from vlmsafe.testing import tiny_sd_pipeline

PROMPT = "a blue circle on the left on sand with blood"


pytestmark = pytest.mark.usefixtures("one_thread")  # Safe-CLIP results are bit-exact on one thread


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """An 'original' and a 'safe' tiny CLIP (different weights, same architecture), saved."""
    d = tmp_path_factory.mktemp("clips")
    original, safe = (
        tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1),
        tiny_clip_backend(1, hidden=32, layers=1, vision_layers=1),
    )
    safe.save_pretrained(d / "safe")
    return original, safe, d / "safe"


def tiny_sd(original):
    return tiny_sd_pipeline(original.model.text_model, original.tokenizer)


def test_stable_diffusion_prompt_to_image_with_safe_text_encoder(clips):
    original, safe, safe_dir = clips
    pipe = tiny_sd(original)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: (
        pipe(
            PROMPT,
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
    )
    before = run()
    old = pipe.text_encoder
    assert apply_safe_text_encoder(pipe, safe_dir) is pipe
    assert pipe.text_encoder is not old and pipe.components["text_encoder"] is pipe.text_encoder
    # the prompt embeddings are now the Safe-CLIP text tower's hidden states
    ids = pipe.tokenizer(
        PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        emb = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
        want = safe.model.text_model(ids).last_hidden_state
        old_emb = old(ids).last_hidden_state
    assert torch.allclose(emb, want, atol=1e-5)
    assert not torch.allclose(emb, old_emb, atol=1e-3)
    after = run()
    assert after.shape == before.shape == (1, 16, 16, 3)
    assert abs(after - before).max() > 1e-4
    # the replaced module itself is untouched
    assert torch.equal(
        old.embeddings.token_embedding.weight, original.model.text_model.embeddings.token_embedding.weight
    )


def test_text_encoder_with_projection_for_sdxl_style_encoders(clips):
    from transformers import CLIPTextModelWithProjection

    _, safe, safe_dir = clips
    enc = load_safe_text_encoder(safe_dir, with_projection=True)
    assert isinstance(enc, CLIPTextModelWithProjection)
    tok = safe.tokenize([PROMPT])
    with torch.no_grad():
        assert torch.allclose(enc(**tok).text_embeds, safe.encode_text(safe.model, tok), atol=1e-5)


def test_text_encoder_mismatch_is_a_clear_error(clips, tmp_path):
    _, _, safe_dir = clips
    other = tiny_clip_backend(0, hidden=48, layers=1, vision_layers=1)
    with pytest.raises(InputError, match="hidden_size"):
        load_safe_text_encoder(safe_dir, like=other.model.text_model)

    class NoEncoder:
        text_encoder = None

    with pytest.raises(UnsupportedModelError, match="text_encoder"):
        apply_safe_text_encoder(NoEncoder(), safe_dir)


def tiny_llava(vision_config):
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    cfg = LlavaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_index=5,
        image_seq_length=n_patches,
        vision_feature_layer=-1,
    )
    return LlavaForConditionalGeneration(cfg).eval(), n_patches


def test_llava_vision_tower_swap(clips):
    original, safe, safe_dir = clips
    model, n = tiny_llava(original.model.config.vision_config)
    model.model.vision_tower.load_state_dict(original.model.vision_model.state_dict())
    pixels = torch.randn(1, 3, 32, 32)
    ids = torch.tensor([[1] + [5] * n + [10, 11, 12]])
    with torch.no_grad():
        feats_before = model.model.vision_tower(pixels).last_hidden_state
    assert apply_safe_vision_encoder(model, safe_dir) is model
    tower = model.model.vision_tower
    for k, v in safe.model.vision_model.state_dict().items():
        assert torch.equal(tower.state_dict()[k], v), k
    with torch.no_grad():
        feats_after = tower(pixels).last_hidden_state
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels, max_new_tokens=3, do_sample=False
        )
    assert not torch.allclose(feats_before, feats_after)
    assert out.shape == (1, ids.shape[1] + 3)


def test_llava_with_other_vision_architecture_is_rejected(clips):
    _, _, safe_dir = clips
    other = tiny_clip_backend(0, hidden=48, layers=1, vision_layers=1)
    model, _ = tiny_llava(other.model.config.vision_config)
    with pytest.raises(InputError, match="hidden_size"):
        apply_safe_vision_encoder(model, safe_dir)
    with pytest.raises(UnsupportedModelError, match="vision_tower"):
        apply_safe_vision_encoder(torch.nn.Linear(2, 2), safe_dir)
