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
from vlmsafe.testbed.safeclip import make_splits, quadruplets, render_split, tiny_clip_backend

COSINE_ONLY = SafeCLIPLossWeights(S_Vref=0.0, U_Vref=0.0, V_Sref=0.0, G_Sref=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # Safe-CLIP results are bit-exact on one thread


@pytest.fixture(scope="module")
def data():
    combos = make_splits(0)["train"][:16]
    return quadruplets(*render_split(combos, 1, 0))


def backend(seed=0):
    return tiny_clip_backend(seed, hidden=32, layers=1, vision_layers=1)


def cfg(**kw):
    base = dict(
        batch_size=8,
        num_epochs=1,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        learning_rate=1e-2,
        progress=False,
        early_stopping_patience=None,
    )
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
        trainer = SafeCLIPTrainer(
            backend(), cfg(batch_size=bs, gradient_accumulation_steps=accum, max_steps=2, weights=COSINE_ONLY), data
        )
        res = trainer.train()
        assert res.global_step == 2
        results.append(trainer.trainable_state_dict())
    a, b = results
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k


def capture_step_grads(trainer):
    """The trainable parameters' ``.grad`` each time the optimizer steps (after clipping), in order.

    ``hand`` (optional) is called at each step, before the optimizer changes anything, with the step index.
    """
    params = {n: p for n, p in trainer.inner.named_parameters() if p.requires_grad}
    steps = []

    def hook(optimizer, args, kwargs):
        steps.append(
            {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for n, p in params.items()}
        )
        for fn in trainer._at_step:
            fn(len(steps) - 1, params)

    trainer._at_step = []
    trainer.optimizer.optimizer.register_step_pre_hook(hook)  # the torch optimizer: runs only when it steps
    return steps


def grad_of(loss, params):
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), grads)}


def assert_grads_close(got, want, rtol=1e-4, atol=1e-8):
    assert set(got) == set(want)
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=rtol, atol=atol), (n, (got[n] - want[n]).abs().max())


def test_accumulated_gradient_is_the_group_mean_also_for_the_short_last_group(data):
    # 16 items, batch 4: 4 micro-batches per epoch; accumulation 3: groups [0, 1, 2] and [3] (the short last one,
    # which used to get 1/3 of its gradient). At each optimizer step the accumulated .grad must equal the gradient
    # of the mean loss of that group's micro-batches, computed here by hand.
    from vlmsafe.safeclip.batches import epoch_loader

    trainer = SafeCLIPTrainer(backend(), cfg(batch_size=4, gradient_accumulation_steps=3, max_grad_norm=None), data)
    micro = list(epoch_loader(data, trainer.collator, batch_size=4, seed=0, epoch=0, num_workers=0))
    groups = [micro[0:3], micro[3:4]]
    expected = []

    def by_hand(step, params):
        with torch.enable_grad():
            loss = sum(trainer.compute_losses(b)["loss"] for b in groups[step]) / len(groups[step])
            expected.append(grad_of(loss, params))

    got = capture_step_grads(trainer)
    trainer._at_step.append(by_hand)
    res = trainer.train()
    assert res.global_step == 2 and len(got) == 2
    for g, w in zip(got, expected):
        assert_grads_close(g, w)


def test_short_last_group_gradient_equals_full_batch_cosine_loss_by_hand(data):
    # Cosine terms are per-item means, so the last group (micro-batches of 4 items) must get exactly the gradient
    # of the weighted cosine loss over its items, written out here without the library's loss code.
    import torch.nn.functional as F

    from vlmsafe.safeclip.batches import epoch_loader

    trainer = SafeCLIPTrainer(
        backend(), cfg(batch_size=4, gradient_accumulation_steps=3, max_grad_norm=None, weights=COSINE_ONLY), data
    )
    micro = list(epoch_loader(data, trainer.collator, batch_size=4, seed=0, epoch=0, num_workers=0))
    b = trainer.backend
    expected = {}

    def by_hand(step, params):
        if step != 1:
            return
        items = [data.items[i] for i in micro[3]["index"].tolist()]
        batch = trainer.collator(items)
        with torch.enable_grad():
            ts, tu = (
                b.encode_text(trainer.inner, batch["safe_text"]),
                b.encode_text(trainer.inner, batch["unsafe_text"]),
            )
            iv = b.encode_image(trainer.inner, batch["safe_image_pixels"])
            ig = b.encode_image(trainer.inner, batch["unsafe_image_pixels"])
            with torch.no_grad():
                ts0 = b.encode_text(trainer.reference, batch["safe_text"])
                iv0 = b.encode_image(trainer.reference, batch["safe_image_pixels"])
            d = lambda x, y: (1 - F.cosine_similarity(x, y, dim=-1)).mean()
            loss = (0.1 * d(ts, ts0) + 0.1 * d(tu, ts0) + 0.1 * d(iv, iv0) + 0.2 * d(ig, iv0)) / 0.5
            expected.update(grad_of(loss, params))

    got = capture_step_grads(trainer)
    trainer._at_step.append(by_hand)
    trainer.train()
    assert expected
    assert_grads_close(got[1], expected, rtol=1e-4, atol=1e-7)


def test_reference_loss_scale_is_an_eighth_and_max_grad_norm_scales_with_it(data):
    # Same run twice; the reference scale gives 1/8 of the loss and of the gradient (no clipping) ...
    runs = {}
    for scale, clip in (("weighted_mean", None), ("reference", None), ("weighted_mean", 8e-3), ("reference", 1e-3)):
        trainer = SafeCLIPTrainer(backend(), cfg(max_steps=2, loss_scale=scale, max_grad_norm=clip), data)
        grads = capture_step_grads(trainer)
        res = trainer.train()
        runs[scale, clip] = (grads, [h["train/loss"] for h in res.history if "train/loss" in h], trainer)
    (g_mean, loss_mean, _), (g_ref, loss_ref, _) = runs["weighted_mean", None], runs["reference", None]
    assert loss_ref[0] == pytest.approx(loss_mean[0] / 8, rel=1e-5)
    assert_grads_close({n: 8 * v for n, v in g_ref[0].items()}, g_mean[0], rtol=1e-4)
    # ... and clipping at c with the reference scale clips exactly like 8c with the weighted mean (the clip is active:
    # the clipped gradient norm is the threshold, well below the unclipped one).
    (g_mean_c, _, _), (g_ref_c, _, _) = runs["weighted_mean", 8e-3], runs["reference", 1e-3]
    norm = lambda g: float(torch.sqrt(sum((v.double() ** 2).sum() for v in g.values())))
    assert norm(g_ref_c[0]) == pytest.approx(1e-3, rel=1e-3)
    assert norm(g_ref[0]) > 2e-3
    assert_grads_close({n: 8 * v for n, v in g_ref_c[0].items()}, g_mean_c[0], rtol=1e-4)
    # Adam removes the constant factor (up to its eps): without clipping both scales take (almost) the same steps;
    # each step moves the LoRA B weights by about lr = 1e-2, the two runs differ by < 1e-4.
    a, b = runs["weighted_mean", None][2].trainable_state_dict(), runs["reference", None][2].trainable_state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-2


def test_resume_reproduces_uninterrupted_run(tmp_path, data):
    straight = SafeCLIPTrainer(backend(), cfg(num_epochs=2, lora_dropout=0.1), data)
    straight.train()
    expected = straight.trainable_state_dict()

    first = SafeCLIPTrainer(backend(), cfg(num_epochs=2, lora_dropout=0.1, max_steps=3), data, output_dir=tmp_path)
    first.train()
    ckpt = tmp_path / "checkpoint-0000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000003"]  # no temporaries left
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "optimizer.json",
        "optimizer.safetensors",
        "rng_0.safetensors",
        "trainable.safetensors",
        "trainer_state.json",
    ]
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (
        state["trainer_state"]["global_step"] == 3
        and state["trainer_state"]["epoch"] == 1
        and state["trainer_state"]["batch_in_epoch"] == 1
    )

    resumed = SafeCLIPTrainer(backend(), cfg(num_epochs=2, lora_dropout=0.1), data, output_dir=tmp_path)
    res = resumed.train(resume_from="latest")
    assert res.global_step == 4 and resumed.global_step == 4  # the trainer forwards its state's step
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
    ckpt = next(tmp_path.glob("checkpoint-*"))
    (ckpt / "optimizer.json").write_text('{"param_groups": [')
    same = SafeCLIPTrainer(backend(), cfg(max_steps=1), data, output_dir=tmp_path)
    with pytest.raises(FileFormatError, match=r"optimizer\.json:1:\d+: invalid JSON .*resume from another checkpoint"):
        same.train(resume_from="latest")


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_early_stopping_and_best_weights(tmp_path, data):
    # weights frozen (the optimizer never steps): nothing improves after the first evaluation -> stop after
    # `patience` more. (A learning rate of 0 is refused by the config.)
    trainer = SafeCLIPTrainer(
        backend(),
        cfg(num_epochs=10, batch_size=4, eval_every=1, early_stopping_patience=2),
        data,
        data,
        output_dir=tmp_path,
    )
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

    model_cfg = dict(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=1, head_width=16, mlp_ratio=2),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    )
    torch.manual_seed(0)
    b = OpenCLIPBackend(open_clip.CLIP(**model_cfg), model_cfg=model_cfg)
    from PIL import Image

    imgs = [Image.new("RGB", (32, 32), (i * 30, 100, 200 - i * 20)) for i in range(8)]
    ds = QuadrupletDataset(
        Quadruplet(f"a photo of thing {i}", f"a photo of thing {i} with blood", imgs[i], imgs[(i + 1) % 8])
        for i in range(8)
    )
    trainer = SafeCLIPTrainer(
        b, cfg(batch_size=4, max_steps=2, lora_target_modules=["attn", "c_fc", "c_proj", "conv1"]), ds
    )
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
    cached = SafeCLIPTrainer(backend(), cfg(num_epochs=2, eval_batch_size=6), data)
    calls, keys = [], set()
    compute = cached.frozen._compute
    cached.frozen._compute = lambda batch: calls.append(int(batch["size"])) or keys.update(batch) or compute(batch)
    cached.train()
    # the reference ran once per item, before the first step (3 batches of eval_batch_size), never in a step
    assert calls == [6, 6, 4]
    assert not any(k.startswith("unsafe") for k in keys)  # its batches hold the safe half only
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
    calls.clear()
    compute_uncached = uncached.frozen._compute
    uncached.frozen._compute = lambda batch: calls.append(int(batch["size"])) or compute_uncached(batch)
    uncached.train()
    assert uncached.frozen.cache is None and calls == [8] * 4  # in every step: 2 epochs x 2 steps
    a, b = cached.trainable_state_dict(), uncached.trainable_state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_bf16_mixed_precision_runs_on_cpu(data):
    trainer = SafeCLIPTrainer(backend(), cfg(max_steps=2, mixed_precision="bf16"), data, data)
    assert trainer.accelerator.mixed_precision == "bf16"
    res = trainer.train()
    assert res.global_step == 2
    assert all(torch.isfinite(torch.tensor(h["train/loss"])) for h in res.history if "train/loss" in h)


def test_a_fresh_run_refuses_an_output_dir_with_earlier_checkpoints(tmp_path, data):
    from vlmsafe.errors import OutputExistsError

    SafeCLIPTrainer(backend(), cfg(max_steps=2), data, output_dir=tmp_path).train()
    # a new run would save checkpoint-0000001, which sorts before the old one and would be pruned at once
    with pytest.raises(OutputExistsError, match="resume_from='latest'"):
        SafeCLIPTrainer(backend(), cfg(max_steps=1), data, output_dir=tmp_path).train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-0000002"]


def test_train_safeclip_output_policy(tmp_path, data, monkeypatch):
    from vlmsafe.errors import InputError, OutputExistsError
    from vlmsafe.safeclip import train_safeclip
    from vlmsafe.safeclip.checkpoint import check_run_output

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(OutputExistsError, match="`overwrite=True`"):
        train_safeclip(backend(), data, out, cfg(max_steps=1))
    # a replacing run that fails leaves the earlier folder as it was, and no temporary behind
    monkeypatch.setattr(SafeCLIPTrainer, "train", lambda self, resume_from=None: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        train_safeclip(backend(), data, out, cfg(max_steps=1), overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"] and (out / "notes.txt").read_text() == "precious"
    monkeypatch.undo()
    res = train_safeclip(backend(), data, out, cfg(max_steps=1), overwrite=True)
    assert res.model_dir == out / "model" and sorted(p.name for p in out.iterdir()) == ["checkpoint-0000001", "model"]
    res = train_safeclip(backend(), data, out, cfg(max_steps=2), resume_from="latest")
    assert res.global_step == 2
    monkeypatch.setenv("WORLD_SIZE", "2")  # several processes would each make their own replacement folder
    with pytest.raises(InputError, match="several processes"):
        check_run_output(out, overwrite=True)


def test_a_batch_with_no_trainable_term_contributes_no_gradient(data):
    # vision tower only; one item of 8 has images, so at least one batch of 4 has none: its loss is a constant
    items = [Quadruplet(q.safe, q.unsafe) for q in data.items[:8]]
    items[0] = data.items[0]
    trainer = SafeCLIPTrainer(
        backend(), cfg(batch_size=4, train_text=False, max_grad_norm=None), QuadrupletDataset(items)
    )
    grads = capture_step_grads(trainer)
    res = trainer.train()
    assert res.global_step == 2 and trainer.towers == ("vision",)
    # one step saw the item with images (a gradient), the other none (no gradient, no crash)
    assert sorted(any(float(g.abs().sum()) > 0 for g in step.values()) for step in grads) == [False, True]


def test_weights_that_train_nothing_are_refused_before_training(data):
    text_only = QuadrupletDataset(Quadruplet(q.safe, q.unsafe) for q in data)
    zero_text = SafeCLIPLossWeights(text_safe=0.0, text_nsfw=0.0)  # the image terms cannot train without images
    with pytest.raises(InputError, match="text_safe, text_nsfw, text_safe_tokens\\) has weight 0"):
        SafeCLIPTrainer(backend(), cfg(weights=zero_text), text_only)
    SafeCLIPTrainer(backend(), cfg(weights=zero_text, max_steps=1), data).train()  # with images the NCE terms train


def test_pass_by_pass_backward_equals_one_backward_through_all_passes(data):
    # the loss is a sum of one part per trainable embedding; a ragged batch (one item without its unsafe image)
    items = list(data.items[:8])
    items[3] = Quadruplet(items[3].safe, items[3].unsafe, items[3].safe_image, None)
    trainer = SafeCLIPTrainer(backend(), cfg(), QuadrupletDataset(items))
    trainer.module.train()
    batch = trainer.collator(items)
    params = {n: p for n, p in trainer.inner.named_parameters() if p.requires_grad}
    joint = trainer.compute_losses(batch)
    want = grad_of(joint["loss"] * 3.0, params)
    got_losses = trainer.forward_backward(batch, scale=3.0)
    got = {n: p.grad for n, p in params.items()}
    for name in joint:
        assert got_losses[name].item() == pytest.approx(joint[name].item(), rel=1e-5, abs=1e-7), name
    assert_grads_close(got, want, rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ the reference's pooled-only pass

CAPTIONS = ["a blue circle on the left on sand with blood", "a red square", "a green circle on grass on the right"]


def check_pooled_equals_full(b, model, tok, pixels, text_blocks, vision_blocks, mlp_out):
    """The pooled passes ran their fast path (not the full one), equal the full forward, and left the model
    restored; returns the full text embeddings."""
    from vlmsafe.safeclip.pooled import pooled_image, pooled_text

    with torch.no_grad():
        full_text, full_image = b.encode_text(model, tok), b.encode_image(model, pixels)
        seen_t, hooks = spy_pooled(text_blocks, mlp_out)
        fast_text = pooled_text(b, model, tok)
        seen_i, more = spy_pooled(vision_blocks, mlp_out)
        fast_image = pooled_image(b, model, pixels)
    for h in hooks + more:
        h.remove()
    assert seen_t == seen_i == {"last_mlp_dims": [2], "inplace": [True]}
    assert torch.allclose(fast_text, full_text, atol=1e-5) and torch.allclose(fast_image, full_image, atol=1e-5)
    assert_restored(text_blocks, vision_blocks)
    return full_text


def spy_pooled(blocks, fc2: str):
    """Watch one pass: the dims of the last block's MLP input ([B, W] when only the pooled token runs) and whether
    the first block's MLP ran with its quick GELU in place (its ``forward`` shadowed while ``fc2`` runs)."""
    seen = {"last_mlp_dims": [], "inplace": []}
    hooks = [
        blocks[-1].mlp.register_forward_pre_hook(lambda m, args: seen["last_mlp_dims"].append(args[0].dim())),
        getattr(blocks[0].mlp, fc2).register_forward_hook(
            lambda m, i, o: seen["inplace"].append("forward" in blocks[0].mlp.__dict__)
        ),
    ]
    return seen, hooks


def assert_restored(*modules):
    assert not any("forward" in m.__dict__ for blocks in modules for b in blocks for m in (b, b.mlp))


@pytest.mark.parametrize("legacy_eos", [False, True])
def test_pooled_reference_pass_equals_the_full_forward_hf(legacy_eos):

    b = tiny_clip_backend(0, hidden=32, layers=2, vision_layers=2)
    model = b.model.eval()
    if legacy_eos:  # CLIPTextModel then pools at the argmax of the ids; the pooled pass must follow the same rule
        model.text_model.eos_token_id = 2
    tok = b.tokenize(CAPTIONS)  # ragged: padded rows
    assert bool((tok["attention_mask"] == 0).any())
    tok["attention_mask"][0, 2] = 0  # a masked key before the end of text (as left padding would give)
    size = model.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    text_blocks, vision_blocks = model.text_model.encoder.layers, model.vision_model.encoder.layers
    full_text = check_pooled_equals_full(b, model, tok, pixels, text_blocks, vision_blocks, "fc2")
    with torch.no_grad():  # and the model is unchanged
        assert torch.equal(b.encode_text(model, tok), full_text)


@pytest.mark.parametrize(
    "text_cfg", [{}, {"pool_type": "eos", "eos_id": 63}, {"pool_type": "last", "no_causal_mask": True}]
)
def test_pooled_reference_pass_equals_the_full_forward_open_clip(text_cfg):
    import open_clip

    from vlmsafe.safeclip import OpenCLIPBackend
    from vlmsafe.testing import tiny_open_clip

    _, extra = tiny_open_clip(0)  # its toy tokenizer: SOT=1, EOT=63, zero padding
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=dict(image_size=32, patch_size=8, width=32, layers=2, head_width=16, ls_init_value=0.5),
        text_cfg=dict(context_length=16, vocab_size=64, width=32, heads=2, layers=2, **text_cfg),
        quick_gelu=True,
    ).eval()
    b = OpenCLIPBackend(model, extra["tokenizer"], extra["preprocess"])
    tok = b.tokenize(CAPTIONS)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    text_blocks, vision_blocks = model.transformer.resblocks, model.visual.transformer.resblocks
    check_pooled_equals_full(b, model, tok, pixels, text_blocks, vision_blocks, "c_proj")


def test_pooled_reference_pass_falls_back_where_it_does_not_apply():
    from vlmsafe.safeclip.pooled import pooled_image

    b = tiny_clip_backend(0, hidden=32, layers=2, vision_layers=2)
    model = b.model.eval()
    blocks = model.vision_model.encoder.layers
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = b.encode_image(model, pixels)
    # a hook on the last block (whose own forward the fast path skips): the full forward runs, hook included
    outputs = []
    handle = blocks[-1].register_forward_hook(lambda m, i, o: outputs.append(o.shape))
    seen, hooks = spy_pooled(blocks, "fc2")
    with torch.no_grad():
        got = pooled_image(b, model, pixels)
    handle.remove()
    assert outputs and seen == {"last_mlp_dims": [3], "inplace": [False]} and torch.equal(got, full)
    for h in hooks:
        h.remove()
    # with autograd on, the last block still runs pooled, but nothing is computed in place
    seen, hooks = spy_pooled(blocks, "fc2")
    got = pooled_image(b, model, pixels)
    assert seen == {"last_mlp_dims": [2], "inplace": [False]} and torch.allclose(got, full, atol=1e-5)
    for h in hooks:
        h.remove()
    assert_restored(blocks)


def lora_trainer(data):
    """A trainer whose LoRA model is in training mode, and its inner model's two towers' blocks."""
    b = tiny_clip_backend(0, hidden=32, layers=2, vision_layers=2)
    trainer = SafeCLIPTrainer(b, cfg(), data)
    trainer.module.train()
    model = trainer.inner
    return trainer, model, model.text_model.encoder.layers, model.vision_model.encoder.layers


def pass_grads(trainer, encode):
    """The trainable parameters' gradients of one pass's ``encode(backend, model)`` embeddings (a fixed weighting)."""
    params = [(n, p) for n, p in trainer.inner.named_parameters() if p.requires_grad]
    with torch.no_grad():  # LoRA B starts at zero: give the adapters values, so every gradient is non-trivial
        for _, p in params:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(p.flatten()))) * 0.1)
    emb = encode(trainer.backend, trainer.inner)
    weights = torch.randn(emb.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad((emb * weights).sum(), [p for _, p in params], allow_unused=True)
    return emb.detach(), {n: g for (n, _), g in zip(params, grads) if g is not None}  # the pass's tower


def test_trainable_pooled_passes_backpropagate_like_the_full_forward(data):
    """The training passes run the last block on the pooled token too (LoRA model in training mode, autograd on):
    same embeddings, same gradients of every LoRA weight, the last block's among them."""
    from vlmsafe.safeclip.pooled import pooled_image, pooled_text

    trainer, model, text_blocks, vision_blocks = lora_trainer(data)
    tok = trainer.backend.tokenize(CAPTIONS)
    size = model.config.vision_config.image_size
    pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    for blocks, full, fast in (
        (text_blocks, lambda b, m: b.encode_text(m, tok), lambda b, m: pooled_text(b, m, tok)),
        (vision_blocks, lambda b, m: b.encode_image(m, pixels), lambda b, m: pooled_image(b, m, pixels)),
    ):
        want, want_grads = pass_grads(trainer, full)
        seen, hooks = spy_pooled(blocks, "fc2")
        got, got_grads = pass_grads(trainer, fast)
        for h in hooks:
            h.remove()
        assert seen == {"last_mlp_dims": [2], "inplace": [False]}  # the fast path ran, nothing in place
        assert torch.allclose(got, want, atol=1e-5)
        last = [n for n in want_grads if ".layers.1." in n and "lora_B" in n]  # the last block's k, v, out, fc1, fc2
        assert len(last) == 5 and all(want_grads[n].abs().max() > 1e-3 for n in last)
        assert set(got_grads) == set(want_grads)
        for n in want_grads:
            assert torch.allclose(got_grads[n], want_grads[n], rtol=1e-4, atol=1e-5), n
        assert_restored(blocks)


@pytest.mark.parametrize("token_term", [False, True])
def test_training_step_runs_every_trainable_pass_pooled_but_the_token_states_one(data, token_term):
    weights = SafeCLIPLossWeights(text_safe_tokens=1.0 if token_term else 0.0)
    trainer = SafeCLIPTrainer(tiny_clip_backend(0, hidden=32, layers=2, vision_layers=2),
                              cfg(reference="copy", weights=weights), data)
    trainer.module.train()
    batch = trainer.collator([data[i] for i in range(4)])
    model = trainer.inner  # the trainable passes only (the reference is a copy)
    seen_t, hooks = spy_pooled(model.text_model.encoder.layers, "fc2")
    seen_i, more = spy_pooled(model.vision_model.encoder.layers, "fc2")
    trainer.forward_backward(batch)
    for h in hooks + more:
        h.remove()
    # T(S), T(U): the pass that returns T(S)'s token states runs in full; I(V), I(G) pooled
    assert seen_t["last_mlp_dims"] == ([3, 2] if token_term else [2, 2])
    assert seen_i["last_mlp_dims"] == [2, 2]


def test_trainable_pass_keeps_the_full_forward_where_attention_dropout_is_on(data):
    from vlmsafe.safeclip.pooled import pooled_image

    trainer, model, _, vision_blocks = lora_trainer(data)
    vision_blocks[-1].self_attn.dropout = 0.1  # CLIPConfig(attention_dropout=0.1)
    size = model.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    seen, hooks = spy_pooled(vision_blocks, "fc2")
    pooled_image(trainer.backend, model, pixels)
    assert seen == {"last_mlp_dims": [3], "inplace": [False]}  # training mode with dropout: the full forward
    model.eval()
    pooled_image(trainer.backend, model, pixels)
    assert seen["last_mlp_dims"] == [3, 2]  # in eval mode that dropout is off: the fast path
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("reference", ["copy", "disable_adapter"])
def test_training_with_pooled_passes_matches_training_with_full_passes(data, monkeypatch, reference):
    import vlmsafe.safeclip.batches as batches_module
    import vlmsafe.safeclip.reference as ref_module

    # At the start T(S) = T0(S) and I(V) = I0(V), so the gradients of the text_safe / vision_safe cosines are
    # float noise, which Adam's first steps (about lr * sign(g)) turn into weight changes of the size of lr: those
    # terms are compared by their first losses; losses and weights after several steps without them (Adam still
    # magnifies rounding in near-zero gradient components, hence weights within 5% of the learning rate, and
    # losses within 1e-4, as the cosine terms 1 - cos of two close embeddings lose digits). The gradients
    # themselves are compared tightly in test_trainable_pooled_passes_backpropagate_like_the_full_forward.
    no_cosines = SafeCLIPLossWeights(text_safe=0.0, vision_safe=0.0)

    def run(weights, steps):
        trainer = SafeCLIPTrainer(tiny_clip_backend(0, hidden=32, layers=2, vision_layers=2),
                                  cfg(num_epochs=2, max_steps=steps, reference=reference, weights=weights), data)
        history = trainer.train().history
        return trainer.trainable_state_dict(), trainer.frozen.cache, history

    fast, fast_cache, fast_history = run(no_cosines, 3)
    fast_history += run(SafeCLIPLossWeights(), 1)[2]
    for module in (ref_module, batches_module):  # the frozen reference's passes and the trainable ones
        monkeypatch.setattr(module, "pooled_text", lambda b, m, tok: b.encode_text(m, tok))
        monkeypatch.setattr(module, "pooled_image", lambda b, m, px: b.encode_image(m, px))
    full, full_cache, full_history = run(no_cosines, 3)
    full_history += run(SafeCLIPLossWeights(), 1)[2]
    assert torch.allclose(fast_cache.text, full_cache.text, atol=1e-5)
    assert torch.allclose(fast_cache.image, full_cache.image, atol=1e-5)
    assert len(fast_history) == len(full_history) == 4
    for got, want in zip(fast_history, full_history):
        assert set(got) == set(want) and all(got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-5) for k in want)
    assert set(fast) == set(full) and all(torch.allclose(fast[k], full[k], atol=5e-4) for k in full)


def test_in_place_quick_gelu_mlp_is_bit_identical_in_row_blocks(monkeypatch):
    from transformers.activations import QuickGELUActivation

    import vlmsafe.safeclip.pooled as pooled

    torch.manual_seed(0)
    fc1, act, fc2 = torch.nn.Linear(8, 16), QuickGELUActivation(), torch.nn.Linear(16, 8)
    x = torch.randn(2, 37, 8)
    monkeypatch.setattr(pooled, "QUICK_GELU_ROWS", 4)  # 74 rows of 16: 18 blocks of 64 values and a short last one
    steps = []
    block_rows = pooled._gelu_block_rows
    monkeypatch.setattr(pooled, "_gelu_block_rows", lambda rows: steps.append(block_rows(rows)) or steps[-1])
    with torch.no_grad():
        assert torch.equal(pooled._quick_gelu_mlp(fc1, act, fc2)(x), fc2(act(fc1(x))))
    assert steps == [4]  # it ran in blocks
    assert block_rows(torch.zeros(74, 15)) == 74  # blocks of 60 values would move the vector tail: one pass


def test_lora_injection_is_quiet(data):
    """peft's read of transformers' deprecated is_gradient_checkpointing is not the user's to fix: not on stderr."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SafeCLIPTrainer(backend(), cfg(), data)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
