"""Safe-CLIP trainer: frozen reference, accumulation, resume, early stopping, saving, backends."""

import json

import pytest
import torch

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.safeclip import (
    HFCLIPBackend,
    Quadruplet,
    QuadrupletDataset,
    SafeCLIPLossWeights,
    SafeCLIPTrainer,
    SafeCLIPTrainingConfig,
)
from vlmsafe.safeclip.testbed import make_splits, quadruplets, render_split, tiny_clip_backend

COSINE_ONLY = SafeCLIPLossWeights(S_Vref=0.0, U_Vref=0.0, V_Sref=0.0, G_Sref=0.0)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data():
    combos = make_splits(0)["train"][:16]
    return quadruplets(*render_split(combos, 1, 0))


def backend(seed=0):
    return tiny_clip_backend(seed, hidden=32, layers=1, vision_layers=1)


def cfg(**kw):
    base = dict(batch_size=8, num_epochs=1, lora_r=4, lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2, progress=False, early_stopping_patience=None)
    base.update(kw)
    return SafeCLIPTrainingConfig(**base)


def test_reference_is_bit_identical_after_training_and_lora_moves(data):
    b = backend()
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    trainer = SafeCLIPTrainer(b, cfg(max_steps=3), data)
    trainer.train()
    ref = trainer.reference.state_dict()
    assert set(ref) == set(before)
    assert all(torch.equal(ref[k], before[k]) for k in before)
    assert all(not p.requires_grad for p in trainer.reference.parameters())
    assert not trainer.reference.training
    lora = trainer.trainable_state_dict()
    assert lora and all("lora_" in k for k in lora)
    assert any(k.startswith("vision_model") for k in lora) and any(k.startswith("text_model") for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # the adapter has moved
    # the merged model differs from the reference
    merged = trainer.merged_model("last")
    tok = b.tokenize(["a blue circle on the left on sand with blood"])
    assert not torch.allclose(b.encode_text(merged, tok), b.encode_text(trainer.reference, tok))


def test_disable_adapter_reference_equals_original_model(data):
    b = backend()
    original = backend()  # same seed: same weights
    trainer = SafeCLIPTrainer(b, cfg(max_steps=2, reference="disable_adapter"), data)
    assert trainer.reference is None
    trainer.train()
    batch = trainer.collator(data.items[:4])
    ref = trainer.frozen(batch, trainer.accelerator.device)
    with torch.no_grad():
        expected = original.encode_text(original.model, batch["safe_text"])
    assert torch.allclose(ref["ref_text_safe"], expected, atol=1e-6)


def test_gradient_accumulation_matches_full_batch(data):
    # Cosine terms are per-item means, so 2 micro-batches of 4 must equal one batch of 8.
    results = []
    for bs, accum in ((8, 1), (4, 2)):
        trainer = SafeCLIPTrainer(backend(), cfg(batch_size=bs, gradient_accumulation_steps=accum, max_steps=2, weights=COSINE_ONLY), data)
        res = trainer.train()
        assert res.global_step == 2
        results.append(trainer.trainable_state_dict())
    a, b = results
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_partial_accumulation_at_epoch_end_is_not_discarded(data):
    # 16 items, batch 4, accumulation 3: the 4th micro-batch forms a short final step.
    trainer = SafeCLIPTrainer(backend(), cfg(batch_size=4, gradient_accumulation_steps=3), data)
    res = trainer.train()
    assert res.global_step == 2


def test_resume_reproduces_uninterrupted_run(tmp_path, data):
    straight = SafeCLIPTrainer(backend(), cfg(num_epochs=2, lora_dropout=0.1), data)
    straight.train()
    expected = straight.trainable_state_dict()

    first = SafeCLIPTrainer(backend(), cfg(num_epochs=2, lora_dropout=0.1, max_steps=3), data, output_dir=tmp_path)
    first.train()
    ckpt = tmp_path / "checkpoint-0000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000003"]  # no temporaries left
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.json", "optimizer.safetensors", "rng_0.safetensors", "trainable.safetensors", "trainer_state.json"]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["trainer_state"]["global_step"] == 3 and state["trainer_state"]["epoch"] == 1 and state["trainer_state"]["batch_in_epoch"] == 1

    resumed = SafeCLIPTrainer(backend(), cfg(num_epochs=2, lora_dropout=0.1), data, output_dir=tmp_path)
    res = resumed.train(resume_from="latest")
    assert res.global_step == 4
    got = resumed.trainable_state_dict()
    for k in expected:
        assert torch.allclose(got[k], expected[k], atol=1e-6), k
    steps = [h["train/loss"] for h in res.history if "train/loss" in h]
    assert len(steps) == 4


def test_resume_rejects_mismatched_or_missing_checkpoints(tmp_path, data):
    SafeCLIPTrainer(backend(), cfg(max_steps=1), data, output_dir=tmp_path).train()
    text_only = SafeCLIPTrainer(backend(), cfg(train_vision=False), data, output_dir=tmp_path)
    with pytest.raises(FileFormatError, match="towers"):
        text_only.train(resume_from="latest")
    with pytest.raises(FileFormatError, match="not a Safe-CLIP checkpoint"):
        text_only.train(resume_from=tmp_path / "nope")


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_early_stopping_and_best_weights(tmp_path, data):
    # weights frozen (the optimizer never steps): nothing improves after the first evaluation -> stop after
    # `patience` more. (A learning rate of 0 is refused by the config.)
    trainer = SafeCLIPTrainer(backend(), cfg(num_epochs=10, batch_size=4, eval_every=1, early_stopping_patience=2),
                              data, data, output_dir=tmp_path)
    trainer.optimizer.step = lambda *a, **k: None
    res = trainer.train()
    assert res.stopped_early and res.global_step == 3 and res.best_step == 1
    evals = [h for h in res.history if "val/loss" in h]
    assert len(evals) == 3
    assert {"val/recall_sum", "val/R@1 S->V0", "val/R@1 G->S0", "val/text_nsfw"} <= set(evals[0])
    assert json.loads((tmp_path / "best" / "metrics.json").read_text())["step"] == 1


def test_training_reduces_validation_loss(data):
    trainer = SafeCLIPTrainer(backend(), cfg(num_epochs=6, batch_size=4, learning_rate=2e-2), data, data)
    before = trainer.evaluate(data)
    res = trainer.train()
    after = trainer.evaluate(data)
    assert after["loss"] < 0.8 * before["loss"]
    assert len([h for h in res.history if "val/loss" in h]) == 6  # one evaluation per epoch


def test_save_pretrained_merges_lora(tmp_path, data):
    from transformers import CLIPModel

    b = backend()
    trainer = SafeCLIPTrainer(b, cfg(max_steps=2), data)
    trainer.train()
    out = trainer.save_pretrained(tmp_path / "model", which="last")
    loaded = CLIPModel.from_pretrained(out)
    assert not any("lora" in k for k in loaded.state_dict())
    tok = b.tokenize(["a pink cross on the right on grass with fire"])
    with torch.no_grad():
        want = b.encode_text(trainer.inner, tok)  # LoRA-injected live model
        got = b.encode_text(loaded, tok)
    assert torch.allclose(want, got, atol=1e-5)
    reloaded = HFCLIPBackend.from_pretrained(out)
    assert reloaded.tokenizer is not None and reloaded.image_processor is not None


def test_text_only_mode_leaves_vision_tower_untouched(data):
    text_only = QuadrupletDataset(Quadruplet(q.safe, q.unsafe) for q in data)
    assert not text_only.has_images
    b = backend()
    trainer = SafeCLIPTrainer(b, cfg(use_lora=False, max_steps=2), text_only, text_only)
    assert trainer.towers == ("text",)
    vision_before = {k: v.clone() for k, v in b.model.vision_model.state_dict().items()}
    text_before = b.model.text_model.embeddings.token_embedding.weight.clone()
    res = trainer.train()
    assert all(torch.equal(v, b.model.vision_model.state_dict()[k]) for k, v in vision_before.items())
    assert not torch.equal(text_before, b.model.text_model.embeddings.token_embedding.weight)
    assert b.model.logit_scale.requires_grad is False
    ev = [h for h in res.history if "val/recall_sum" in h][-1]
    assert {"val/R@1 S->S0", "val/R@1 U->S0"} <= set(ev)
    with pytest.raises(InputError, match="text-only"):
        SafeCLIPTrainer(backend(), cfg(train_vision=True), text_only)


def test_config_errors_are_clear(data):
    with pytest.raises(InputError, match="disable_adapter"):
        cfg(use_lora=False, reference="disable_adapter")
    with pytest.raises(InputError, match="lora_target_modules"):
        SafeCLIPTrainer(backend(), cfg(lora_target_modules=["no_such_module"]), data)
    with pytest.raises(InputError, match="batch_size"):
        SafeCLIPTrainer(backend(), cfg(batch_size=64), data).train()


def test_open_clip_backend_trains_and_round_trips(tmp_path):
    import open_clip

    from vlmsafe.safeclip import OpenCLIPBackend, load_backend

    model_cfg = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16, mlp_ratio=2), text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1))
    torch.manual_seed(0)
    b = OpenCLIPBackend(open_clip.CLIP(**model_cfg), model_cfg=model_cfg)
    from PIL import Image

    imgs = [Image.new("RGB", (32, 32), (i * 30, 100, 200 - i * 20)) for i in range(8)]
    ds = QuadrupletDataset(Quadruplet(f"a photo of thing {i}", f"a photo of thing {i} with blood", imgs[i], imgs[(i + 1) % 8]) for i in range(8))
    trainer = SafeCLIPTrainer(b, cfg(batch_size=4, max_steps=2, lora_target_modules=["attn", "c_fc", "c_proj", "conv1"]), ds)
    trainer.train()
    names = trainer.trainable_names
    assert any(n.startswith("visual.conv1") for n in names) and any(".attn." in n for n in names)
    trainer.save_pretrained(tmp_path / "oc", which="last")
    loaded = load_backend(tmp_path / "oc")
    assert isinstance(loaded, OpenCLIPBackend)
    tok = b.tokenize(["a photo of thing 3 with blood"])
    px = b.preprocess(imgs[:2])
    with torch.no_grad():
        assert torch.allclose(b.encode_text(trainer.inner, tok), loaded.encode_text(loaded.model, tok), atol=1e-5)
        assert torch.allclose(b.encode_image(trainer.inner, px), loaded.encode_image(loaded.model, px), atol=1e-5)


def test_reference_cache_is_filled_once_and_exact(data):
    cached = SafeCLIPTrainer(backend(), cfg(num_epochs=2), data)
    cached.train()
    cache = cached.frozen.cache
    assert bool(cache.filled.all()) and len(cache) == 16 and cache.image.shape == (16, 32)
    # the cache holds exactly what the frozen reference computes
    items = data.items[:4]
    batch = cached.collator(items)
    with torch.no_grad():
        fresh_text = cached.backend.encode_text(cached.reference, batch["safe_text"])
        fresh_img = cached.backend.encode_image(cached.reference, batch["safe_image_pixels"])
    assert torch.allclose(cache.text[:4], fresh_text, atol=1e-5)
    assert torch.allclose(cache.image[:4], fresh_img, atol=1e-5)
    uncached = SafeCLIPTrainer(backend(), cfg(num_epochs=2, cache_reference=False), data)
    uncached.train()
    assert uncached.frozen.cache is None
    a, b = cached.trainable_state_dict(), uncached.trainable_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bf16_mixed_precision_runs_on_cpu(data):
    trainer = SafeCLIPTrainer(backend(), cfg(max_steps=2, mixed_precision="bf16"), data, data)
    assert trainer.accelerator.mixed_precision == "bf16"
    res = trainer.train()
    assert res.global_step == 2
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in res.history if "train/loss" in h)
