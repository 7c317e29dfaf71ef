"""The Safe-CLIP training loop: epochs, gradient accumulation, logging, validation and early stopping.

Early stopping follows the reference code: an evaluation *improves* when the validation loss falls
or the recall sum rises (by more than ``early_stopping_min_delta``); after
``early_stopping_patience`` evaluations without improvement training stops. The weights kept as
"best" are those of the best ``best_metric`` (the other metric breaks ties).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vlmsafe.errors import InputError, InternalError, OutputExistsError
from vlmsafe.safeclip.checkpoint import CHECKPOINT_PREFIX
from vlmsafe.safeclip.config import SafeCLIPTrainingConfig, TrainerState, TrainingResult
from vlmsafe.safeclip.data import QuadrupletCollator, QuadrupletDataset
from vlmsafe.safeclip.reference import FrozenReference


class TrainingLoopMixin:
    """``train`` of :class:`~vlmsafe.safeclip.trainer.SafeCLIPTrainer`."""

    config: SafeCLIPTrainingConfig
    state: TrainerState
    accelerator: Any
    module: nn.Module
    optimizer: Any
    scheduler: Any
    train_data: QuadrupletDataset | None
    val_data: QuadrupletDataset | None
    output_dir: Path | None
    frozen: FrozenReference
    collator: QuadrupletCollator
    world_size: int
    total_steps: int
    micro_batches_per_epoch: int

    # provided by the trainer class and the other mixins (annotations only: nothing here shadows them)
    epoch_loader: Callable[[int], DataLoader]
    forward_backward: Callable[[dict[str, Any], float], dict[str, torch.Tensor]]
    evaluate: Callable[[QuadrupletDataset], dict[str, float]]
    load_checkpoint: Callable[[str | os.PathLike[str]], None]
    save_checkpoint: Callable[[], Path]
    _keep_best: Callable[[dict[str, float]], None]

    def train(self, resume_from: str | os.PathLike[str] | None = None) -> TrainingResult:
        """Run training (optionally resuming a checkpoint dir, or ``"latest"`` in ``output_dir``)."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        n_train = 0 if self.train_data is None else len(self.train_data)
        if n_train < cfg.batch_size:
            raise InputError(f"need at least batch_size={cfg.batch_size} training items, got {n_train}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif self.output_dir is not None and (earlier := sorted(self.output_dir.glob(f"{CHECKPOINT_PREFIX}*"))):
            # Pruning keeps the newest names: a fresh run here would delete its own checkpoints, not the old ones.
            raise OutputExistsError(
                f"{self.output_dir} holds checkpoints of an earlier run ({earlier[-1].name}); pass "
                "resume_from='latest' (--resume latest) to continue it, or use a new output folder"
            )
        st = self.state
        show = cfg.progress and acc.is_main_process
        if st.global_step < self.total_steps:  # the frozen reference's outputs, once, before the first step
            self.frozen.fill_cache(self.train_data, self.collator, batch_size=cfg.eval_batch_size, device=acc.device,
                                   accelerator=acc if self.world_size > 1 else None, progress=show)
        self.module.train()
        bar = tqdm(total=self.total_steps, initial=st.global_step, desc="safe-clip", disable=not show,
                   dynamic_ncols=True)
        while st.epoch < cfg.num_epochs and not st.stopped_early and st.global_step < self.total_steps:
            finished_epoch = self._run_epoch(bar)
            if finished_epoch:
                st.epoch += 1
                st.batch_in_epoch = 0
                if not cfg.eval_every and not st.stopped_early:
                    self._evaluate_and_track()
        bar.close()
        evaluated_last = bool(st.history) and "val/loss" in st.history[-1]
        if self.val_data is not None and not evaluated_last and not st.stopped_early and st.global_step:
            self._evaluate_and_track()  # a max_steps cut mid-epoch still gets a final validation
        if self.output_dir is not None:
            self.save_checkpoint()
        best = {"loss": st.best_loss, "recall_sum": st.best_recall_sum} if st.best_step is not None else None
        return TrainingResult(st.global_step, st.stopped_early, st.best_step, best, list(st.history))

    def _run_epoch(self, bar: Any) -> bool:
        """Train the rest of the current epoch; False when stopped before its end (max_steps, early stop)."""
        cfg, acc, st = self.config, self.accelerator, self.state
        loader = self.epoch_loader(st.epoch)
        if st.batch_in_epoch:
            loader = acc.skip_first_batches(loader, st.batch_in_epoch)
        running: dict[str, float] = {}
        micro = 0
        for batch in loader:
            scale, last_of_group = self._accumulation_scale(st.batch_in_epoch)
            with acc.accumulate(self.module):
                if acc.sync_gradients != last_of_group:  # accelerate and this loop must agree on the groups
                    raise InternalError(f"gradient accumulation out of step at micro-batch {st.batch_in_epoch} of "
                                       f"epoch {st.epoch} (accelerate syncs: {acc.sync_gradients})")
                losses = self.forward_backward(batch, scale)
                if acc.sync_gradients and cfg.max_grad_norm:
                    acc.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            st.batch_in_epoch += 1
            micro += 1
            for k, v in losses.items():
                running[k] = running.get(k, 0.0) + float(v.detach())
            if not acc.sync_gradients:
                continue
            st.global_step += 1
            self._log_step(running, micro, bar)
            running, micro = {}, 0
            if cfg.eval_every and st.global_step % cfg.eval_every == 0:
                self._evaluate_and_track()
            if cfg.save_every and self.output_dir is not None and st.global_step % cfg.save_every == 0:
                self.save_checkpoint()
            if st.stopped_early or st.global_step >= self.total_steps:
                return st.batch_in_epoch >= self.micro_batches_per_epoch
        return True

    def _accumulation_scale(self, i: int) -> tuple[float, bool]:
        """Loss multiplier of micro-batch ``i`` of an epoch, and whether it ends its accumulation group.

        The optimizer steps on the *mean* gradient of a group of micro-batches. ``accelerate``
        divides every micro-batch loss by ``gradient_accumulation_steps`` (N), which is right for a
        full group but gives the last, shorter group of an epoch (k < N micro-batches) only k/N of its
        gradient; the multiplier N/k makes it the mean over its k micro-batches. The number of
        processes is multiplied in because each process's gradient flows only through its own rows
        of the gathered batch and DDP averages over processes (see :mod:`vlmsafe.safeclip.distributed`).
        """
        n = self.config.gradient_accumulation_steps
        start = i - i % n
        size = min(n, self.micro_batches_per_epoch - start)
        return self.world_size * n / size, i + 1 == start + size

    def _log_step(self, running: dict[str, float], micro: int, bar: Any) -> None:
        """Append one optimizer step's mean losses (over its micro-batches) and learning rate to the history."""
        st = self.state
        entry = {"step": st.global_step, "epoch": st.epoch, "lr": float(self.scheduler.get_last_lr()[0])}
        entry.update({f"train/{k}": v / micro for k, v in running.items()})
        st.history.append(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['train/loss']:.4f}")

    def _evaluate_and_track(self) -> None:
        """Validate, keep the best weights, and count evaluations without improvement (early stopping)."""
        if self.val_data is None:
            return
        cfg, st = self.config, self.state
        metrics = self.evaluate(self.val_data)
        st.history.append({"step": st.global_step, "epoch": st.epoch, **{f"val/{k}": v for k, v in metrics.items()}})
        loss, rsum = metrics["loss"], metrics["recall_sum"]
        delta = cfg.early_stopping_min_delta
        improved = (st.best_loss is None or loss < st.best_loss - delta) or (
            st.best_recall_sum is None or rsum > st.best_recall_sum + delta
        )
        st.best_loss = loss if st.best_loss is None else min(st.best_loss, loss)
        st.best_recall_sum = rsum if st.best_recall_sum is None else max(st.best_recall_sum, rsum)
        key = -rsum if cfg.best_metric == "recall_sum" else loss
        tie_break = loss if cfg.best_metric == "recall_sum" else -rsum
        best_so_far = (st.best_metric, st.best_tie if st.best_tie is not None else math.inf)
        if st.best_metric is None or (key, tie_break) < best_so_far:
            st.best_metric, st.best_tie = key, tie_break
            st.best_step = st.global_step
            self._keep_best(metrics)
        st.bad_evals = 0 if improved else st.bad_evals + 1
        if cfg.early_stopping_patience is not None and st.bad_evals >= cfg.early_stopping_patience:
            st.stopped_early = True
        self.module.train()
