"""The Safe-CLIP training loop: epochs, gradient accumulation, logging, validation and early stopping.

:class:`TrainingLoop` is given every collaborator it uses (as ``open_clip_train``'s ``train_one_epoch`` is):
the prepared trainable towers and their loss step, the optimizer and scheduler, a factory of each epoch's
data loader, the trainable weights (for best-weights snapshots), the checkpointer and the evaluator. It
changes only the :class:`~vlmsafe.safeclip.state.TrainState` passed to :meth:`TrainingLoop.run`; early
stopping is :meth:`TrainState.track <vlmsafe.safeclip.state.TrainState.track>`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vlmsafe.errors import InternalError
from vlmsafe.safeclip.checkpoint import Checkpointer
from vlmsafe.safeclip.config import SafeCLIPTrainingConfig
from vlmsafe.safeclip.data import QuadrupletDataset
from vlmsafe.safeclip.evaluation import Evaluator
from vlmsafe.safeclip.state import TrainState
from vlmsafe.safeclip.weights import TrainableWeights

#: ``(batch, scale) -> losses``: one micro-batch's losses, with the gradient of ``scale * loss`` accumulated
Step = Callable[[dict[str, Any], float], dict[str, torch.Tensor]]


@dataclass(eq=False)
class TrainingLoop:
    """Trains until ``total_steps`` optimizer steps, the last epoch, or early stopping.

    ``loaders(epoch)`` gives this process's loader of an epoch in its seeded order; ``micro_batches_per_epoch``
    is its length. ``evaluator`` validates on ``val_data`` (no validation when either is ``None``);
    ``checkpointer`` saves checkpoints and the best weights (nothing without its output folder).
    """

    config: SafeCLIPTrainingConfig
    accelerator: Any
    module: nn.Module
    optimizer: Any
    scheduler: Any
    step: Step
    loaders: Callable[[int], DataLoader]
    weights: TrainableWeights
    checkpointer: Checkpointer
    evaluator: Evaluator | None
    val_data: QuadrupletDataset | None
    total_steps: int
    micro_batches_per_epoch: int

    def run(self, state: TrainState, bar: Any) -> TrainState:
        """Train from ``state`` (updated in place and returned), advancing the progress ``bar`` once per step;
        validate at the end if the last step was not validated, and save a final checkpoint."""
        cfg, st = self.config, state
        self.module.train()
        while st.epoch < cfg.num_epochs and not st.stopped_early and st.global_step < self.total_steps:
            finished_epoch = self._run_epoch(st, bar)
            if finished_epoch:
                st.epoch += 1
                st.batch_in_epoch = 0
                if not cfg.eval_every and not st.stopped_early:
                    self._evaluate_and_track(st)
        bar.close()
        if self.val_data is not None and not st.evaluated_last and not st.stopped_early and st.global_step:
            self._evaluate_and_track(st)  # a max_steps cut mid-epoch still gets a final validation
        if self.checkpointer.output_dir is not None:
            self.checkpointer.save(st)
        return st

    def _run_epoch(self, st: TrainState, bar: Any) -> bool:
        """Train the rest of the current epoch; False when stopped before its end (max_steps, early stop)."""
        cfg, acc = self.config, self.accelerator
        loader = self.loaders(st.epoch)
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
                losses = self.step(batch, scale)
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
            self._log_step(st, running, micro, bar)
            running, micro = {}, 0
            if cfg.eval_every and st.global_step % cfg.eval_every == 0:
                self._evaluate_and_track(st)
            if cfg.save_every and self.checkpointer.output_dir is not None and st.global_step % cfg.save_every == 0:
                self.checkpointer.save(st)
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
        return self.accelerator.num_processes * n / size, i + 1 == start + size

    def _log_step(self, st: TrainState, running: dict[str, float], micro: int, bar: Any) -> None:
        """Append one optimizer step's mean losses (over its micro-batches) and learning rate to the history."""
        entry = {"lr": float(self.scheduler.get_last_lr()[0]), **{f"train/{k}": v / micro for k, v in running.items()}}
        st.log(entry)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['train/loss']:.4f}")

    def _evaluate_and_track(self, st: TrainState) -> None:
        """Validate, keep the best weights, and count evaluations without improvement (early stopping)."""
        if self.val_data is None or self.evaluator is None:
            return
        metrics = self.evaluator.evaluate(self.val_data)
        st.log({f"val/{k}": v for k, v in metrics.items()})
        if st.track(metrics, self.config):
            st.best_weights = self.weights.state_dict()
            self.checkpointer.save_best(st, metrics)
        self.module.train()
