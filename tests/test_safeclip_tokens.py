"""The optional ``text_safe_tokens`` term: token states as a diffusion UNet reads them, the trainer, the cache.

The term keeps safe captions' per-token text states at the frozen reference (Safe-CLIP's eight terms only
see the pooled embedding, while Stable Diffusion's UNet cross-attends to every token state).
"""

import pytest
import torch

from vlmsafe.errors import InputError
from vlmsafe.safeclip import (
    Quadruplet,
    QuadrupletDataset,
    SafeCLIPLossWeights,
    SafeCLIPTrainer,
    SafeCLIPTrainingConfig,
)
from vlmsafe.safeclip.losses import token_drift
from vlmsafe.testbed.safeclip import make_splits, quadruplets, render_split, tiny_clip_backend

pytestmark = pytest.mark.usefixtures("one_thread")  # Safe-CLIP results are bit-exact on one thread

TOKENS = SafeCLIPLossWeights(text_safe_tokens=2.0)


@pytest.fixture(scope="module")
def data():
    return quadruplets(*render_split(make_splits(0)["train"][:16], 1, 0))


def backend(seed=0):
    return tiny_clip_backend(seed, hidden=32, layers=1, vision_layers=1)


def cfg(**kw):
    base = dict(batch_size=8, num_epochs=1, lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2,
                progress=False, early_stopping_patience=None)
    return SafeCLIPTrainingConfig(**{**base, **kw})


def safe_drift(b, model, reference, texts, layer="last"):
    """Mean token drift of ``model``'s states from ``reference``'s for ``texts`` padded as diffusers pads them."""
    tokens = b.tokenize_padded(texts)
    with torch.no_grad():
        return float(token_drift(b.encode_text_states(model, tokens, layer)[1],
                                 b.encode_text_states(reference, tokens, layer)[1]).mean())


# --------------------------------------------------------------------------- backends
def test_hf_token_states_are_what_a_stable_diffusion_pipeline_feeds_its_unet():
    from vlmsafe.testing import tiny_sd_pipeline

    b = backend()
    pipe = tiny_sd_pipeline(b.model.text_model, b.tokenizer)
    texts = ["a blue circle on the left on sand", "a pink cross on the right on sky with a knife"]
    tokens = b.tokenize_padded(texts)
    assert set(tokens) == {"input_ids"} and tokens["input_ids"].shape == (2, b.tokenizer.model_max_length)
    with torch.no_grad():
        pooled, states = b.encode_text_states(b.model, tokens)
        fed = pipe.encode_prompt(texts, "cpu", 1, False)[0]  # what the UNet cross-attends to
        _, penultimate = b.encode_text_states(b.model, tokens, "penultimate")
        hidden = b.model.text_model(input_ids=tokens["input_ids"], output_hidden_states=True).hidden_states
        assert torch.allclose(states, fed, atol=1e-6)
        assert torch.allclose(penultimate, hidden[-2], atol=1e-6)  # SDXL's prompt_embeds
        assert not torch.allclose(penultimate, states, atol=1e-3)
        # the pooled embedding is the one retrieval uses (padding after the end token changes nothing)
        assert torch.allclose(pooled, b.encode_text(b.model, b.tokenize(texts)), atol=1e-5)
    with pytest.raises(InputError, match="token state layer"):
        b.encode_text_states(b.model, tokens, "first")


def test_open_clip_token_states_come_from_its_own_encode_text():
    import open_clip

    from vlmsafe.safeclip import OpenCLIPBackend

    model_cfg = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16, mlp_ratio=2),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2),
    )
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg).eval()
    b = OpenCLIPBackend(model, model_cfg=model_cfg)
    tokens = b.tokenize_padded(["a photo of thing 3 with blood", "a photo"])
    ids = tokens["input_ids"]
    with torch.no_grad():
        pooled, states = b.encode_text_states(model, tokens)
        assert torch.equal(pooled, model.encode_text(ids)) and not model.ln_final._forward_hooks
        eot = ids.argmax(dim=-1)
        assert torch.allclose(states[torch.arange(2), eot] @ model.text_projection, pooled, atol=1e-6)
        x = model.token_embedding(ids) + model.positional_embedding
        x = model.transformer.resblocks[0](x, attn_mask=model.attn_mask)  # the first of two blocks
        assert torch.allclose(b.encode_text_states(model, tokens, "penultimate")[1], x, atol=1e-5)
    one_block = open_clip.CLIP(**{**model_cfg, "text_cfg": {**model_cfg["text_cfg"], "layers": 1}})
    with pytest.raises(InputError, match="2 or more blocks"):
        b.encode_text_states(one_block, tokens, "penultimate")
    ds = QuadrupletDataset(Quadruplet(f"a photo of thing {i}", f"a photo of thing {i} with blood") for i in range(8))
    trainer = SafeCLIPTrainer(b, cfg(batch_size=4, max_steps=2, weights=TOKENS,
                                     lora_target_modules=["attn", "c_fc", "c_proj"]), ds)
    res = trainer.train()
    assert res.history[-1]["train/text_safe_tokens"] > 0  # the term runs on open_clip (its reference too)


# --------------------------------------------------------------------------- trainer
def test_weight_zero_computes_no_token_states(data):
    trainer = SafeCLIPTrainer(backend(), cfg(max_steps=1), data)
    assert trainer.token_layer is None and trainer.module.token_layer is None
    batch = trainer.collator(data.items[:4])
    assert "safe_text_padded" not in batch
    assert trainer.frozen(batch, trainer.accelerator.device)["ref_text_safe_tokens"] is None
    res = trainer.train()
    assert res.history[-1]["train/text_safe_tokens"] == 0.0
    on = SafeCLIPTrainer(backend(), cfg(max_steps=1, weights=TOKENS, token_layer="penultimate"), data)
    assert on.token_layer == "penultimate" and "safe_text_padded" in on.collator(data.items[:4])


@pytest.mark.parametrize("weights", [SafeCLIPLossWeights(), TOKENS], ids=["paper", "tokens"])
def test_pass_by_pass_backward_equals_one_joint_backward(data, weights):
    trainer = SafeCLIPTrainer(backend(), cfg(weights=weights), data)
    trainer.module.train()
    batch = trainer.collator(data.items[:8])
    params = {n: p for n, p in trainer.inner.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    for p in params.values():  # LoRA B starts at 0, where the token term's gradient vanishes: move off it
        p.data.add_(0.05 * torch.randn_like(p))
    joint = trainer.compute_losses(batch)
    assert (joint["text_safe_tokens"].item() > 0) == (weights is TOKENS)
    want = torch.autograd.grad(joint["loss"], list(params.values()), allow_unused=True)
    got_losses = trainer.forward_backward(batch)
    for name in joint:
        assert got_losses[name].item() == pytest.approx(joint[name].item(), rel=1e-5, abs=1e-7), name
    for (n, p), w in zip(params.items(), want):
        w = torch.zeros_like(p) if w is None else w
        got = torch.zeros_like(p) if p.grad is None else p.grad
        assert torch.allclose(got, w, rtol=1e-4, atol=1e-7), n


def test_the_term_keeps_safe_token_states_and_enters_validation(data):
    held_out = [q.safe for q in quadruplets(*render_split(make_splits(0)["test"][:12], 1, 3))]
    runs, strong = {}, SafeCLIPLossWeights(text_safe_tokens=10.0)
    for name, weights in (("paper", SafeCLIPLossWeights()), ("tokens", strong)):
        b = backend()
        trainer = SafeCLIPTrainer(b, cfg(num_epochs=4, weights=weights), data, data)
        runs[name] = (trainer.train(), safe_drift(b, trainer.merged_model("last"), trainer.reference, held_out))
    (paper, paper_drift), (tokens, tokens_drift) = runs["paper"], runs["tokens"]
    # without the term the safe captions' token states move; with it they move much less (captions never trained on)
    assert paper_drift > 0.01
    assert tokens_drift < 0.5 * paper_drift
    val = [h for h in tokens.history if "val/loss" in h][-1]
    assert val["val/text_safe_tokens"] > 0
    weighted = sum(w * val[f"val/{k}"] for k, w in strong.as_dict().items())
    assert val["val/loss"] == pytest.approx(weighted / strong.denominator, rel=1e-5)
    assert all(h.get("val/text_safe_tokens", 0.0) == 0.0 for h in paper.history)


def test_token_states_cached_when_small_else_computed_in_each_step(data, monkeypatch):
    import vlmsafe.safeclip.reference as reference

    cached = SafeCLIPTrainer(backend(), cfg(num_epochs=2, weights=TOKENS), data)
    cached.train()
    cache = cached.frozen.cache
    assert cache.tokens is not None and cache.tokens.shape == (16, 16, 32)  # [items, context length, width]
    batch = cached.collator(data.items[:4])
    with torch.no_grad():
        fresh = cached.backend.encode_text_states(cached.reference, batch["safe_text_padded"])
    assert torch.allclose(cache.tokens[:4], fresh[1], atol=1e-5)
    assert torch.allclose(cache.text[:4], fresh[0], atol=1e-5)

    monkeypatch.setattr(reference, "TOKEN_CACHE_MAX_BYTES", 16 * 16 * 32 * 4 - 1)  # one float too small
    in_step = SafeCLIPTrainer(backend(), cfg(num_epochs=2, weights=TOKENS), data)
    calls = []
    compute = in_step.frozen._compute
    in_step.frozen._compute = lambda batch, **kw: calls.append(kw) or compute(batch, **kw)
    in_step.train()
    assert in_step.frozen.cache.tokens is None and in_step.frozen.cache.text is not None
    assert calls == [{}] + [{"images": False}] * 4  # filling the cache, then the text pass of each of 4 steps
    uncached = SafeCLIPTrainer(backend(), cfg(num_epochs=2, weights=TOKENS, cache_reference=False), data)
    uncached.train()
    want = cached.trainable_state_dict()
    for other in (in_step, uncached):
        got = other.trainable_state_dict()
        assert all(torch.allclose(got[k], want[k], atol=1e-5) for k in want)


def test_disable_adapter_reference_gives_the_original_token_states(data):
    b, original = backend(), backend()  # same seed: same weights
    trainer = SafeCLIPTrainer(b, cfg(max_steps=2, weights=TOKENS, reference="disable_adapter"), data)
    trainer.train()
    batch = trainer.collator(data.items[:4])
    ref = trainer.frozen(batch, trainer.accelerator.device)
    with torch.no_grad():
        want = original.encode_text_states(original.model, batch["safe_text_padded"])[1]
    assert torch.allclose(ref["ref_text_safe_tokens"], want, atol=1e-6)
    assert safe_drift(b, trainer.inner, original.model, [q.safe for q in data.items[:4]]) > 0  # the adapter moved
