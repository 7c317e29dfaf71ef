"""What shapes a Safe-CLIP run (:class:`SafeCLIPTrainingConfig`) and what a run records about itself.

Every option's help text, range and command-line flag live in its field's metadata
(:mod:`vlmsafe.options`): :meth:`SafeCLIPTrainingConfig.__post_init__` checks the ranges
(finite numbers, ``learning_rate > 0``, ``lora_dropout`` in [0, 1) ...) and ``vlmsafe safeclip
train`` builds its flags from the same metadata, so the two cannot drift apart.

:class:`TrainingResult` is what :meth:`SafeCLIPTrainer.train` returns (where a run is:
:class:`~vlmsafe.safeclip.state.TrainState`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmsafe.errors import InputError
from vlmsafe.options import (
    LORA_ALPHA_MAX,
    LR_MAX,
    WEIGHT_DECAY_MAX,
    check_options,
    choice_option,
    float_option,
    int_option,
    other_option,
    switch_option,
)
from vlmsafe.safeclip.terms import LOSS_NAMES, LOSS_SCALES, TOKEN_STATE_LAYERS, TOKEN_TERM, SafeCLIPLossWeights
from vlmsafe.validation import SEED_MAX, check_float


def check_scheduler(name: object) -> str:
    """``name`` if it is a ``transformers.SchedulerType`` value (checked before any model is loaded)."""
    from transformers.trainer_utils import SchedulerType

    names = [s.value for s in SchedulerType]
    if name not in names:
        raise InputError(f"lr_scheduler {name!r} is not a transformers scheduler; use one of {', '.join(names)}")
    return str(name)


@dataclass
class SafeCLIPTrainingConfig:
    """Everything that shapes a Safe-CLIP run. Defaults follow the reference where it has one.

    ``batch_size`` is the global batch of one forward pass (split across processes); the
    optimizer sees ``batch_size * gradient_accumulation_steps`` items per step, and its gradient is
    the mean over the micro-batches of the step (also for the shorter last step of an epoch).

    ``loss_scale`` and ``max_grad_norm`` go together: the reference code's loss is the weighted mean
    of the terms divided by 8 and it does not clip. Adam's update hardly changes with a constant
    gradient factor, so the scale only matters through clipping: ``max_grad_norm=c`` with
    ``loss_scale="reference"`` clips like ``8c`` with ``"weighted_mean"``. To follow the reference
    code, use ``loss_scale="reference", max_grad_norm=None``.
    """

    train_text: bool = switch_option(
        True, "train the text tower", flag="--no-text", const=False,
        flag_help="do not train the text tower (vision only)")
    train_vision: bool | None = switch_option(
        None, "train the vision tower (None: iff the training data has images)", flag="--text-only", const=False,
        flag_help="ignore images and train the text tower only (text-only mode)")
    use_lora: bool = switch_option(
        True, "train LoRA adapters (False: all weights of the trained towers)", flag="--full-finetune", const=False,
        flag_help="train all tower weights instead of LoRA")
    lora_r: int = int_option(16, "LoRA rank")
    lora_alpha: float = float_option(
        1.0, "LoRA alpha (the reference's 1; update scale = alpha / r), in (0, 10000]", low=0, low_open=True,
        high=LORA_ALPHA_MAX)
    lora_dropout: float = float_option(0.1, "LoRA dropout, in [0, 1)", low=0, high=1, high_open=True)
    lora_target_modules: list[str] | None = other_option(  # noqa: RUF009 (returns a dataclasses.field)
        "comma-separated leaf module names LoRA wraps (default HF: k_proj,v_proj,out_proj,fc1,fc2,patch_embedding)",
        flag="--lora-targets", kind="csv")
    reference: str = choice_option(
        "copy", ("copy", "disable_adapter"),
        "frozen reference: a separate copy, or the LoRA model with its adapter off (less memory)")
    cache_reference: bool = switch_option(
        True, "keep the frozen reference's outputs per training item and reuse them", flag="--no-cache-reference",
        const=False, flag_help="recompute the frozen reference's outputs at every step")
    learning_rate: float = float_option(
        1e-3, "AdamW learning rate, in (0, 10]", low=0, low_open=True, high=LR_MAX, flag="--lr")
    weight_decay: float = float_option(0.0, "AdamW weight decay, in [0, 10]", low=0, high=WEIGHT_DECAY_MAX)
    adam_betas: tuple[float, float] = other_option(
        "AdamW betas, two numbers in [0, 1), e.g. 0.9,0.999", flag="--adam-betas", kind="floats2",
        default=(0.9, 0.999))
    lr_scheduler: str = other_option(
        "learning-rate schedule: a transformers scheduler name (constant_with_warmup, cosine, linear...)",
        flag="--scheduler", kind="str", default="constant_with_warmup")
    warmup_steps: int = int_option(0, "linear learning-rate warm-up steps", low=0)
    batch_size: int = int_option(32, "global batch per forward pass (split across processes)")
    gradient_accumulation_steps: int = int_option(1, "micro-batches per optimizer step", flag="--grad-accum")
    num_epochs: int = int_option(1, "passes over the training data", flag="--epochs")
    max_steps: int | None = int_option(None, "stop after this many optimizer steps (default: none, every epoch)")
    max_grad_norm: float | None = float_option(
        1.0, "gradient clipping norm (0 or None disables)", low=0, optional=True)
    mixed_precision: str = choice_option(
        "no", ("no", "fp16", "bf16"), "autocast precision (bf16 also works on CPU)")
    cpu: bool = switch_option(
        False, "train on the CPU even when a GPU is present", flag="--cpu", const=True,
        flag_help="train on the CPU even when a GPU is present")
    eval_every: int | None = int_option(None, "validate every N optimizer steps (default: every epoch)")
    eval_batch_size: int = int_option(64, "validation embedding batch (also the NCE chunk of the validation loss)")
    early_stopping_patience: int | None = int_option(
        3, "evaluations without improvement before stopping (None: never stop)", flag="--patience", optional=True)
    early_stopping_min_delta: float = float_option(
        0.0, "smallest change of loss or recall sum that counts as an improvement", low=0, flag="--min-delta")
    best_metric: str = choice_option(
        "recall_sum", ("recall_sum", "loss"), "validation metric that picks the saved weights")
    save_every: int | None = int_option(None, "checkpoint every N optimizer steps (default: at the end)")
    keep_checkpoints: int = int_option(2, "checkpoints kept in the output folder (older ones are pruned)")
    seed: int = int_option(0, "seed for LoRA init and data order", low=0, high=SEED_MAX)
    logit_scale: float = float_option(
        100.0, "fixed InfoNCE logit scale (the reference's exp(4.6052)), in (0, 100] (CLIP clamps its learned "
        "scale at 100)", low=0, low_open=True, high=100.0)
    loss_scale: str = choice_option(
        "weighted_mean", LOSS_SCALES,
        "total loss: the weighted mean of the terms, or the reference code's scale (that mean / 8, so gradients "
        "are 8x smaller and max_grad_norm clips at an 8x larger weighted-mean gradient)")
    weights: SafeCLIPLossWeights = other_option(  # noqa: RUF009 (returns a dataclasses.field)
        "loss weights, e.g. 'G_Sref=0.5,text_nsfw=0.2' (others keep their defaults). Names: the paper's eight, "
        f"{', '.join(LOSS_NAMES)}, and {TOKEN_TERM} (default 0, not in the paper): keeps safe captions' per-token "
        "text states (what a diffusion UNet cross-attends to) at the original's; give it a weight > 0 when the "
        "text encoder will condition an image generator", flag="--weights",
        kind="weights", default_factory=SafeCLIPLossWeights)
    token_layer: str = choice_option(
        "last", TOKEN_STATE_LAYERS,
        f"token states the {TOKEN_TERM} term keeps: 'last' (last_hidden_state, read by SD 1.x/2.x UNets) or "
        "'penultimate' (hidden_states[-2], read by SDXL and clip_skip=1); unused while that term's weight is 0")
    num_workers: int = int_option(0, "data-loader worker processes", low=0)
    progress: bool = switch_option(
        True, "show progress bars", flag="--no-progress", const=False, flag_help="hide progress bars")

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):
            self.weights = SafeCLIPLossWeights.from_dict(self.weights)
        if not isinstance(self.weights, SafeCLIPLossWeights):
            raise InputError(f"weights must be a mapping of loss term names to weights, got {self.weights!r}; "
                             "e.g. {\"G_Sref\": 0.5, \"text_nsfw\": 0.2}")
        if not isinstance(self.adam_betas, (tuple, list)) or len(self.adam_betas) != 2:
            raise InputError(f"adam_betas must be two numbers, got {self.adam_betas!r}; e.g. [0.9, 0.999]")
        self.adam_betas = tuple(  # type: ignore[assignment]
            check_float(b, "adam_betas", low=0, high=1, high_open=True) for b in self.adam_betas
        )
        check_options(self)
        check_scheduler(self.lr_scheduler)
        if self.reference == "disable_adapter" and not self.use_lora:
            raise InputError(
                "reference='disable_adapter' needs LoRA (use_lora=True); full fine-tuning needs reference='copy'"
            )

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
class TrainingResult:
    global_step: int
    stopped_early: bool
    best_step: int | None
    best_metrics: dict[str, float] | None
    history: list[dict[str, Any]]
    model_dir: Path | None = None
