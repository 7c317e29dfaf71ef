"""The pieces the Safe-CLIP trainer is composed of, each used without a trainer object.

``TrainState`` round-trips through the ``Checkpointer``; the ``Evaluator`` gives known metrics on known
embeddings; the ``TrainingLoop``, given its collaborators by hand, reproduces the golden run of
``tests/test_safeclip_golden.py`` bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from test_safeclip_golden import GOLDEN_CUT, golden_config, golden_data, weights_hash
from torch import nn

from vlmsafe.errors import FileFormatError
from vlmsafe.safeclip.checkpoint import Checkpointer
from vlmsafe.safeclip.distributed import build_accelerator
from vlmsafe.safeclip.evaluation import Evaluator, validation_recalls
from vlmsafe.safeclip.state import TrainState
from vlmsafe.safeclip.weights import TrainableWeights

pytestmark = pytest.mark.usefixtures("one_thread")


def linear_parts(seed: int):
    """Weights, optimizer and scheduler of a small linear model (what a checkpointer saves, no CLIP needed)."""
    from transformers import get_scheduler

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[1].requires_grad_(False)
    weights = TrainableWeights(model, ["0.weight", "0.bias"])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=1, num_training_steps=10)
    return model, weights, optimizer, scheduler


def checkpointer(out, weights, optimizer, scheduler, towers=("text",)):
    return Checkpointer(out, build_accelerator(gradient_accumulation_steps=1, mixed_precision="no", cpu=True),
                        weights=weights, optimizer=optimizer, scheduler=scheduler,
                        run_info={"towers": list(towers)}, keep=2)


def test_train_state_round_trips_through_the_checkpointer(tmp_path):
    model, weights, optimizer, scheduler = linear_parts(0)
    for _ in range(3):  # moments, a scheduler position and moved weights to restore
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    state = TrainState(global_step=3, epoch=1, batch_in_epoch=2, best_metric=-1.5, best_tie=0.25, best_loss=0.25,
                       best_recall_sum=1.5, best_step=2, bad_evals=1,
                       history=[{"step": 1, "epoch": 0, "train/loss": 0.5}, {"step": 2, "epoch": 0, "val/loss": 0.25}])
    state.best_weights = {k: v + 1 for k, v in weights.state_dict().items()}
    ckpt = checkpointer(tmp_path, weights, optimizer, scheduler)
    ckpt.save_best(state, {"loss": 0.25, "recall_sum": 1.5})
    path = ckpt.save(state)
    assert path.name == "checkpoint-0000003"
    saved = json.loads((path / "trainer_state.json").read_text())
    assert list(saved) == ["trainer_state", "scheduler", "towers"]  # the run's info after the state, as before
    assert saved["trainer_state"] == state.to_dict() and "best_weights" not in saved["trainer_state"]
    assert json.loads((tmp_path / "best" / "metrics.json").read_text()) == {"step": 3, "loss": 0.25, "recall_sum": 1.5}
    want_weights, want_opt, want_sched = weights.state_dict(), optimizer.state_dict(), scheduler.state_dict()
    want_rng = torch.rand(3)  # the draws that follow the saved RNG state

    _, other_weights, other_opt, other_sched = linear_parts(1)  # different weights, fresh optimizer
    got = checkpointer(tmp_path, other_weights, other_opt, other_sched).load("latest")
    assert got == state  # every JSON field (best_weights is compared below)
    assert set(got.best_weights) == set(state.best_weights)
    assert all(torch.equal(got.best_weights[k], state.best_weights[k]) for k in state.best_weights)
    assert all(torch.equal(other_weights.state_dict()[k], v) for k, v in want_weights.items())
    assert other_sched.state_dict() == want_sched
    loaded = other_opt.state_dict()
    assert loaded["param_groups"] == want_opt["param_groups"]
    assert all(torch.equal(loaded["state"][i][k], want_opt["state"][i][k]) for i in want_opt["state"]
               for k in ("exp_avg", "exp_avg_sq", "step"))
    assert torch.equal(torch.rand(3), want_rng)  # the RNG continues where the checkpoint left it

    with pytest.raises(FileFormatError, match="trained towers \\['text'\\] but this trainer trains \\['vision'\\]"):
        checkpointer(tmp_path, other_weights, other_opt, other_sched, towers=("vision",)).load(path)


def test_checkpointer_prunes_and_refuses_to_save_without_a_folder(tmp_path):
    from vlmsafe.errors import InputError

    _, weights, optimizer, scheduler = linear_parts(0)
    ckpt = checkpointer(tmp_path, weights, optimizer, scheduler)
    for step in (1, 2, 3):
        ckpt.save(TrainState(global_step=step))
    assert [p.name for p in ckpt.earlier_checkpoints()] == ["checkpoint-0000002", "checkpoint-0000003"]  # keep=2
    with pytest.raises(InputError, match="no output_dir"):
        checkpointer(None, weights, optimizer, scheduler).save(TrainState())


def test_train_state_tracks_early_stopping_and_the_best_step():
    cfg = golden_config(early_stopping_patience=2, best_metric="recall_sum")
    st = TrainState()
    marks = []
    for step, (loss, rsum) in enumerate([(1.0, 1.0), (0.9, 1.0), (0.95, 0.5), (0.95, 1.0), (0.95, 1.0)], 1):
        st.global_step = step
        marks.append(st.track({"loss": loss, "recall_sum": rsum}, cfg))
    # best by recall sum, ties broken by the loss: step 2; the loss fell at 2, nothing improved at 3, 4 -> stop
    assert marks == [True, True, False, False, False] and st.best_step == 2
    assert (st.best_loss, st.best_recall_sum, st.bad_evals, st.stopped_early) == (0.9, 1.0, 3, True)
    assert st.result().best_metrics == {"loss": 0.9, "recall_sum": 1.0}


def test_validation_recalls_on_known_embeddings():
    eye = torch.eye(4)
    flipped = eye.flip(0)
    ref = {"S": eye, "V": eye, "has_V": torch.tensor([True] * 4), "has_G": torch.tensor([True, True, False, False])}
    got = validation_recalls({"S": eye, "U": flipped, "V": eye, "G": eye[[1, 0, 2, 3]]}, ref)
    # S and V find their own partner; U's row i is row 3 - i's (never its own); G has rows 0, 1 only, swapped
    assert got == {"S->V0": 1.0, "U->V0": 0.0, "V->S0": 1.0, "G->S0": 0.0}
    text_only = {"S": eye, "has_V": torch.zeros(4, dtype=torch.bool), "has_G": torch.zeros(4, dtype=torch.bool)}
    assert validation_recalls({"U": eye[[1, 0, 2, 3]]}, text_only) == {"S->S0": 1.0, "U->S0": 0.5}


def test_evaluator_of_the_reference_itself_has_no_drift_and_the_recalls_of_its_embeddings():
    from vlmsafe.safeclip.reference import FrozenReference, frozen_copy
    from vlmsafe.safeclip.retrieval import embed_quadruplets, recall_at_k
    from vlmsafe.testbed.safeclip import tiny_clip_backend

    _, val = golden_data()
    b = tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1)
    reference = frozen_copy(b.model)
    acc = build_accelerator(gradient_accumulation_steps=1, mixed_precision="no", cpu=True)
    evaluator = Evaluator(b, b.model, FrozenReference(b, reference), golden_config(),
                          towers=("text", "vision"), token_layer=None, accelerator=acc)
    metrics = evaluator.evaluate(val)
    # the trained towers are the reference: T(S) = T0(S), I(V) = I0(V)
    assert metrics["text_safe"] == pytest.approx(0, abs=1e-6) and metrics["vision_safe"] == pytest.approx(0, abs=1e-6)
    with torch.no_grad():
        emb = embed_quadruplets(b, b.model, val, batch_size=4, progress=False)
    assert metrics["R@1 S->V0"] == recall_at_k(emb["S"], emb["V"], (1,))[1]
    assert metrics["R@1 V->S0"] == recall_at_k(emb["V"], emb["S"], (1,))[1]
    assert metrics["recall_sum"] == sum(v for k, v in metrics.items() if k.startswith("R@1"))
    first = evaluator._reference
    evaluator.evaluate(val)
    assert evaluator._reference is first  # the reference's embeddings of a validation set: computed once


def test_training_loop_with_explicit_collaborators_reproduces_the_golden_run(tmp_path):
    """No SafeCLIPTrainer: every part built here and handed to the loop, which gives the golden cut run."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from vlmsafe.safeclip.batches import QuadrupletCollator, TrainableTowers, epoch_loader
    from vlmsafe.safeclip.loop import TrainingLoop
    from vlmsafe.safeclip.reference import FrozenReference, frozen_copy
    from vlmsafe.safeclip.step import LossStep
    from vlmsafe.safeclip.weights import make_trainable
    from vlmsafe.testbed.safeclip import tiny_clip_backend

    data, val = golden_data()
    cfg = golden_config(max_steps=3)
    b = tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1)
    acc = build_accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps, mixed_precision="no",
                            cpu=True)
    set_seed(cfg.seed)
    towers = ("text", "vision")
    reference = frozen_copy(b.model)
    weights = make_trainable(b, b.model, towers, cfg)
    optimizer = torch.optim.AdamW([p for p in weights.inner.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=0, num_training_steps=3)
    module, optimizer, scheduler = acc.prepare(TrainableTowers(b, weights.inner, towers), optimizer, scheduler)
    frozen = FrozenReference(b, reference, peft_model=weights.peft_model, inner=weights.inner, autocast=acc.autocast,
                             cache_items=len(data))
    collator = QuadrupletCollator(b, use_images=True)
    frozen.fill_cache(data, collator, batch_size=cfg.eval_batch_size, device=acc.device, progress=False)
    loop = TrainingLoop(
        config=cfg, accelerator=acc, module=module, optimizer=optimizer, scheduler=scheduler,
        step=LossStep(module, frozen, acc, cfg),
        loaders=lambda epoch: epoch_loader(data, collator, batch_size=4, seed=cfg.seed, epoch=epoch, num_workers=0),
        weights=weights,
        checkpointer=Checkpointer(tmp_path, acc, weights=weights, optimizer=optimizer, scheduler=scheduler,
                                  run_info={"towers": list(towers)}, keep=5),
        evaluator=Evaluator(b, weights.inner, frozen, cfg, towers=towers, token_layer=None, accelerator=acc,
                            module=module),
        val_data=val, total_steps=3, micro_batches_per_epoch=4,
    )
    state = loop.run(TrainState(), tqdm(disable=True))
    assert state.history == GOLDEN_CUT["history"] and state.best_step == GOLDEN_CUT["best_step"]
    assert weights_hash(weights.state_dict()) == GOLDEN_CUT["weights"]
    saved = json.loads((tmp_path / "checkpoint-0000003" / "trainer_state.json").read_text())
    assert saved["trainer_state"] == GOLDEN_CUT["trainer_state"]
