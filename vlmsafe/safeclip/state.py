"""Where a Safe-CLIP run is, as one object: :class:`TrainState`, saved and restored whole by the checkpointer.

It holds what the loop changes and a resumed run needs: the step, the epoch and the position in it, the
early-stopping record (best metrics, evaluations without improvement) and the logged history, plus the best
weights so far (in memory; on disk they are ``output_dir/best``, not part of the JSON).

Early stopping follows the reference code (:meth:`TrainState.track`): an evaluation *improves* when the
validation loss falls or the recall sum rises (by more than ``early_stopping_min_delta``); after
``early_stopping_patience`` evaluations without improvement training stops. The weights kept as "best" are
those of the best ``best_metric`` (the other metric breaks ties).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from vlmsafe.safeclip.config import SafeCLIPTrainingConfig, TrainingResult


@dataclass
class TrainState:
    """What a run has done so far; its JSON fields are the ``trainer_state`` block of a checkpoint."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of the current epoch already consumed
    best_metric: float | None = None  # lower is better (the negated recall sum for best_metric="recall_sum")
    best_tie: float | None = None  # the other metric, breaks ties
    best_loss: float | None = None
    best_recall_sum: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    #: CPU copies of the trainable weights at ``best_step`` (stored as ``output_dir/best``, not in the JSON)
    best_weights: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The JSON fields (everything but :attr:`best_weights`), in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "best_weights"}

    @classmethod
    def from_dict(cls, data: dict[str, Any], best_weights: dict[str, torch.Tensor] | None = None) -> TrainState:
        """Inverse of :meth:`to_dict` (``best_weights`` read separately)."""
        return cls(**data, best_weights=best_weights)

    def log(self, entry: dict[str, Any]) -> None:
        """Append one history entry (``step`` and ``epoch`` first)."""
        self.history.append({"step": self.global_step, "epoch": self.epoch, **entry})

    def track(self, metrics: dict[str, float], config: SafeCLIPTrainingConfig) -> bool:
        """Record one validation's ``metrics`` (early-stopping counters, best values); True for a new best."""
        loss, rsum = metrics["loss"], metrics["recall_sum"]
        delta = config.early_stopping_min_delta
        improved = (self.best_loss is None or loss < self.best_loss - delta) or (
            self.best_recall_sum is None or rsum > self.best_recall_sum + delta
        )
        self.best_loss = loss if self.best_loss is None else min(self.best_loss, loss)
        self.best_recall_sum = rsum if self.best_recall_sum is None else max(self.best_recall_sum, rsum)
        key = -rsum if config.best_metric == "recall_sum" else loss
        tie_break = loss if config.best_metric == "recall_sum" else -rsum
        best_so_far = (self.best_metric, self.best_tie if self.best_tie is not None else math.inf)
        new_best = self.best_metric is None or (key, tie_break) < best_so_far
        if new_best:
            self.best_metric, self.best_tie = key, tie_break
            self.best_step = self.global_step
        self.bad_evals = 0 if improved else self.bad_evals + 1
        if config.early_stopping_patience is not None and self.bad_evals >= config.early_stopping_patience:
            self.stopped_early = True
        return new_best

    @property
    def evaluated_last(self) -> bool:
        """Whether the last history entry is a validation."""
        return bool(self.history) and "val/loss" in self.history[-1]

    def result(self) -> TrainingResult:
        """What :meth:`~vlmsafe.safeclip.trainer.SafeCLIPTrainer.train` returns."""
        best = {"loss": self.best_loss, "recall_sum": self.best_recall_sum} if self.best_step is not None else None
        return TrainingResult(self.global_step, self.stopped_early, self.best_step, best, list(self.history))
