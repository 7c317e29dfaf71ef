"""What shapes a Safe-CLIP run (:class:`SafeCLIPTrainingConfig`) and what a run records about itself.

:class:`TrainerState` is the JSON part of a checkpoint (where training is, early-stopping state,
history); :class:`TrainingResult` is what :meth:`SafeCLIPTrainer.train` returns.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmsafe.errors import InputError
from vlmsafe.safeclip.losses import SafeCLIPLossWeights


@dataclass
class SafeCLIPTrainingConfig:
    """Everything that shapes a Safe-CLIP run. Defaults follow the reference where it has one.

    ``batch_size`` is the global batch of one forward pass (split across processes); the
    optimizer sees ``batch_size * gradient_accumulation_steps`` items per step.
    """

    train_text: bool = True
    train_vision: bool | None = None  # None: train the vision tower iff the training data has images
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: float = 1.0
    lora_dropout: float = 0.1
    lora_target_modules: list[str] | None = None  # leaf names; None: backend default
    reference: str = "copy"  # "copy" | "disable_adapter"
    cache_reference: bool = True  # reuse T0(S), I0(V) of each training item after its first use
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: str = "constant_with_warmup"  # any transformers.get_scheduler name
    warmup_steps: int = 0
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    num_epochs: int = 1
    max_steps: int | None = None  # optimizer steps; stops before num_epochs if reached
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate)
    cpu: bool = False  # force the CPU even when a GPU is present
    eval_every: int | None = None  # optimizer steps; None: at the end of every epoch
    eval_batch_size: int = 64
    early_stopping_patience: int | None = 3  # evaluations without improvement; None: never stop
    early_stopping_min_delta: float = 0.0
    best_metric: str = "recall_sum"  # "recall_sum" (higher is better) | "loss" (lower)
    save_every: int | None = None  # optimizer steps; None: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    logit_scale: float = 100.0
    weights: SafeCLIPLossWeights = field(default_factory=SafeCLIPLossWeights)
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):
            self.weights = SafeCLIPLossWeights.from_dict(self.weights)
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]
        if self.reference not in ("copy", "disable_adapter"):
            raise InputError(f"reference must be 'copy' or 'disable_adapter', got {self.reference!r}")
        if self.reference == "disable_adapter" and not self.use_lora:
            raise InputError(
                "reference='disable_adapter' needs LoRA (use_lora=True); full fine-tuning needs reference='copy'"
            )
        if self.best_metric not in ("recall_sum", "loss"):
            raise InputError(f"best_metric must be 'recall_sum' or 'loss', got {self.best_metric!r}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise InputError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "num_epochs", "eval_batch_size", "lora_r"):
            if int(getattr(self, name)) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["weights"] = dataclasses.asdict(self.weights)
        d["adam_betas"] = list(self.adam_betas)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SafeCLIPTrainingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown Safe-CLIP training option(s) {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**data)


@dataclass
class TrainerState:
    """The JSON part of a checkpoint: where training is and what it has seen."""

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


@dataclass
class TrainingResult:
    global_step: int
    stopped_early: bool
    best_step: int | None
    best_metrics: dict[str, float] | None
    history: list[dict[str, Any]]
    model_dir: Path | None = None
