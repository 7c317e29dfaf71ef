"""Safe-CLIP fine-tuning: LoRA or full fine-tuning of CLIP towers against a truly frozen reference.

What this trainer fixes or adds relative to the reference code (aimagelab/safe-clip):

* **Frozen reference** (:mod:`~vlmsafe.safeclip.reference`): a deep copy taken *before* LoRA is
  injected (``reference="copy"``, the default), or the same weights under ``peft``'s
  ``disable_adapter()`` (``reference="disable_adapter"``); its outputs are cached per item.
* **Gradient accumulation** that keeps every micro-batch's gradient (``accelerate``'s
  ``accumulate``: the loss is divided by the number of micro-batches and the optimizer steps
  once). InfoNCE terms use each micro-batch's negatives, as in any CLIP training.
* **Multi-process** via ``accelerate`` (:mod:`~vlmsafe.safeclip.distributed`): the global batch is
  split across processes and embeddings are all-gathered before the loss, so N processes compute
  the same loss and gradient as one process on the same global batch.
* **Checkpoints without pickle** (:mod:`~vlmsafe.safeclip.checkpoint`); resuming restores
  weights, optimizer, scheduler, RNG and the position in the epoch.
* An optional ninth loss term, ``text_safe_tokens`` (weight 0 by default, so the paper's recipe is the
  default), that keeps safe captions' per-token text states at the reference, for text encoders that
  will condition a diffusion UNet (:mod:`~vlmsafe.safeclip.losses` says why).
* Validation (:mod:`~vlmsafe.safeclip.evaluation`) with early stopping on the validation loss
  *and* a recall sum (:mod:`~vlmsafe.safeclip.state`); the best weights are kept and saved with
  LoRA merged as a standard checkpoint.

:class:`SafeCLIPTrainer` is a facade that composes the pieces, each given what it uses (the layout of
``open_clip_train``): :class:`~vlmsafe.safeclip.state.TrainState` (where the run is, saved and restored
whole), :class:`~vlmsafe.safeclip.weights.TrainableWeights` (LoRA or tower weights),
:class:`~vlmsafe.safeclip.step.LossStep` (the loss of one batch), :class:`~vlmsafe.safeclip.evaluation.Evaluator`,
:class:`~vlmsafe.safeclip.checkpoint.Checkpointer` and :class:`~vlmsafe.safeclip.loop.TrainingLoop`;
:mod:`~vlmsafe.safeclip.batches` collates batches in each epoch's order and
:mod:`~vlmsafe.safeclip.card` writes the files beside the final model. This module: set-up and the public API.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vlmsafe.errors import InputError, OutputExistsError
from vlmsafe.safeclip.backends import CLIPBackend
from vlmsafe.safeclip.batches import QuadrupletCollator, TrainableTowers, epoch_loader
from vlmsafe.safeclip.card import RunSummary, model_files
from vlmsafe.safeclip.checkpoint import Checkpointer, check_run_output, run_directory
from vlmsafe.safeclip.config import SafeCLIPTrainingConfig, TrainingResult
from vlmsafe.safeclip.data import QuadrupletDataset
from vlmsafe.safeclip.distributed import build_accelerator
from vlmsafe.safeclip.evaluation import Evaluator
from vlmsafe.safeclip.loop import TrainingLoop
from vlmsafe.safeclip.losses import TOKEN_TERM
from vlmsafe.safeclip.reference import FrozenReference, frozen_copy
from vlmsafe.safeclip.state import TrainState
from vlmsafe.safeclip.step import LossStep
from vlmsafe.safeclip.weights import make_trainable

__all__ = ["SafeCLIPTrainer", "SafeCLIPTrainingConfig", "TrainState", "TrainingResult", "train_safeclip"]


class SafeCLIPTrainer:
    """Fine-tune a CLIP backend with the Safe-CLIP objective.

    Example::

        backend = HFCLIPBackend.from_pretrained("openai/clip-vit-large-patch14")
        data = QuadrupletDataset.from_visu("visu_train.json", coco_dir="coco")
        trainer = SafeCLIPTrainer(backend, SafeCLIPTrainingConfig(num_epochs=2), data, val_data, output_dir="run")
        trainer.train()
        trainer.save_pretrained("run/model")  # LoRA merged; loads with CLIPModel.from_pretrained

    ``backend.model`` is modified in place (LoRA layers are injected into it); the frozen
    reference is a separate copy. Multi-process: run your script with ``accelerate launch``.
    """

    def __init__(
        self,
        backend: CLIPBackend,
        config: SafeCLIPTrainingConfig | None = None,
        train_data: QuadrupletDataset | None = None,
        val_data: QuadrupletDataset | None = None,
        *,
        output_dir: str | os.PathLike[str] | None = None,
    ):
        from accelerate.utils import set_seed

        if not isinstance(backend, CLIPBackend):  # a model path would fail as an AttributeError deep in setup
            raise InputError(f"`backend` must be a CLIPBackend (vlmsafe.safeclip.backends.load_backend(PATH), or "
                             f"train_safeclip(PATH, ...) with a model folder), got {type(backend).__name__}")
        _check_parts(config, train_data, val_data)
        self.config = config = config or SafeCLIPTrainingConfig()
        self.backend = backend
        self.train_data = train_data
        self.val_data = val_data
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.accelerator = build_accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            cpu=config.cpu,
        )
        self.world_size = self.accelerator.num_processes
        if config.batch_size % self.world_size:
            raise InputError(
                f"batch_size {config.batch_size} must be divisible by the number of processes ({self.world_size})"
            )
        set_seed(config.seed)
        has_images = bool(train_data is not None and train_data.has_images)
        self.towers = select_towers(config, None) if train_data is None else check_training_data(config, train_data)
        #: the layer whose token states the text_safe_tokens term keeps (None: the term is off)
        keeps_tokens = config.weights.keeps_token_states and "text" in self.towers
        self.token_layer = config.token_layer if keeps_tokens else None
        # The frozen reference is taken BEFORE any LoRA injection (defect (a) of the reference code).
        self.reference: nn.Module | None = frozen_copy(backend.model) if config.reference == "copy" else None
        self.weights = make_trainable(backend, backend.model, self.towers, config)
        self.peft_model, self.inner = self.weights.peft_model, self.weights.inner
        self.trainable_names = self.weights.names
        self._setup_optimization()
        if self.reference is not None:
            self.reference.to(self.accelerator.device)
        cache_items = len(train_data) if (config.cache_reference and train_data is not None) else None
        self.frozen = FrozenReference(backend, self.reference, peft_model=self.peft_model, inner=self.inner,
                                      autocast=self.accelerator.autocast, cache_items=cache_items,
                                      token_layer=self.token_layer)
        self.state = TrainState()
        self.collator = QuadrupletCollator(backend, use_images=has_images,
                                           padded_safe_text=self.token_layer is not None)
        self.loss_step = LossStep(self.module, self.frozen, self.accelerator, config)
        self.evaluator = Evaluator(backend, self.inner, self.frozen, config, towers=self.towers,
                                   token_layer=self.token_layer, accelerator=self.accelerator, module=self.module)
        run_info = {"config": config.to_dict(), "towers": list(self.towers), "trainable_names": self.trainable_names,
                    "backend": backend.config_dict(), "world_size": self.world_size}
        self.checkpointer = Checkpointer(self.output_dir, self.accelerator, weights=self.weights,
                                         optimizer=self.optimizer, scheduler=self.scheduler, run_info=run_info,
                                         keep=config.keep_checkpoints)

    # ------------------------------------------------------------------ set-up

    def _setup_optimization(self) -> None:
        """AdamW over the trainable parameters, the scheduler, and ``accelerate.prepare``."""
        from transformers import get_scheduler

        cfg = self.config
        params = [p for p in self.inner.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=cfg.adam_betas,
                                      weight_decay=cfg.weight_decay)
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / cfg.gradient_accumulation_steps)
        total = cfg.max_steps or max(1, self.steps_per_epoch * cfg.num_epochs)
        self.total_steps = min(total, self.steps_per_epoch * cfg.num_epochs) if self.steps_per_epoch else total
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=max(1, self.total_steps))
        towers_module = TrainableTowers(self.backend, self.inner, self.towers, self.token_layer)
        self.module, self.optimizer, self.scheduler = self.accelerator.prepare(towers_module, optimizer, scheduler)

    @property
    def micro_batches_per_epoch(self) -> int:
        """Full batches of one epoch (an incomplete final batch is dropped)."""
        return 0 if self.train_data is None else len(self.train_data) // self.config.batch_size

    @property
    def global_step(self) -> int:
        """Optimizer steps taken so far (:attr:`state`)."""
        return self.state.global_step

    def epoch_loader(self, epoch: int) -> DataLoader:
        """This process's data loader for ``epoch`` (a seeded order: reproducible and resumable)."""
        assert self.train_data is not None
        cfg = self.config
        loader = epoch_loader(self.train_data, self.collator, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                              num_workers=cfg.num_workers)
        return self.accelerator.prepare_data_loader(loader)

    # ------------------------------------------------------------------ training

    def train(self, resume_from: str | os.PathLike[str] | None = None) -> TrainingResult:
        """Run training (optionally resuming a checkpoint dir, or ``"latest"`` in ``output_dir``)."""
        from tqdm.auto import tqdm

        cfg, acc = self.config, self.accelerator
        n_train = 0 if self.train_data is None else len(self.train_data)
        if n_train < cfg.batch_size:
            raise InputError(f"need at least batch_size={cfg.batch_size} training items, got {n_train}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif earlier := self.checkpointer.earlier_checkpoints():
            # Pruning keeps the newest names: a fresh run here would delete its own checkpoints, not the old ones.
            raise OutputExistsError(
                f"{self.output_dir} holds checkpoints of an earlier run ({earlier[-1].name}); pass "
                "resume_from='latest' to continue it, or use a new output folder"
            )
        show = cfg.progress and acc.is_main_process
        if self.state.global_step < self.total_steps:  # the frozen reference's outputs, once, before the first step
            self.frozen.fill_cache(self.train_data, self.collator, batch_size=cfg.eval_batch_size, device=acc.device,
                                   accelerator=acc if self.world_size > 1 else None, progress=show)
        bar = tqdm(total=self.total_steps, initial=self.state.global_step, desc="safe-clip", disable=not show,
                   dynamic_ncols=True)
        loop = TrainingLoop(config=cfg, accelerator=acc, module=self.module, optimizer=self.optimizer,
                            scheduler=self.scheduler, step=self.forward_backward, loaders=self.epoch_loader,
                            weights=self.weights, checkpointer=self.checkpointer, evaluator=self.evaluator,
                            val_data=self.val_data, total_steps=self.total_steps,
                            micro_batches_per_epoch=self.micro_batches_per_epoch)
        return loop.run(self.state, bar).result()

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward one batch (this process's share) and return the terms and ``loss``
        (:meth:`LossStep.compute_losses <vlmsafe.safeclip.step.LossStep.compute_losses>`)."""
        return self.loss_step.compute_losses(batch)

    def forward_backward(self, batch: dict[str, Any], scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The losses of one batch (detached), with the gradient of ``scale * loss`` added to ``.grad``
        (:meth:`LossStep.forward_backward <vlmsafe.safeclip.step.LossStep.forward_backward>`)."""
        return self.loss_step.forward_backward(batch, scale)

    def evaluate(self, data: QuadrupletDataset) -> dict[str, float]:
        """Validation losses (averaged over ``eval_batch_size`` chunks), R@1 per direction and ``recall_sum``."""
        return self.evaluator.evaluate(data)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-{step}`` and prune old ones (keeps ``keep_checkpoints``)."""
        return self.checkpointer.save(self.state)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore weights, optimizer, scheduler, RNG and trainer state from a checkpoint."""
        self.state = self.checkpointer.load(path)

    # ------------------------------------------------------------------ weights

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable parameters (LoRA weights, or the fine-tuned towers)."""
        return self.weights.state_dict()

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.weights.load_state_dict(state)

    def merged_model(self, which: str = "best") -> nn.Module:
        """A standalone copy of the model with LoRA merged in (``which``: "best" or "last")."""
        if which not in ("best", "last"):
            raise InputError("which must be 'best' or 'last'")
        return self.weights.merged(self.state.best_weights if which == "best" else None)

    def model_files(self) -> dict[str, str]:
        """``{name: text}`` written beside the final model: the run's summary and the model card."""
        return model_files(RunSummary(self.config, self.state, self.backend, self.towers, self.train_data,
                                      self.val_data))

    def save_pretrained(self, path: str | os.PathLike[str], which: str = "best", *, overwrite: bool = False) -> Path:
        """Save the fine-tuned model as a standard checkpoint with LoRA merged (main process only)."""
        if self.accelerator.is_main_process:  # the run's summary and the model card: in the same atomic output
            self.backend.save_pretrained(path, self.merged_model(which), overwrite=overwrite,
                                         extra_files=self.model_files())
        self.accelerator.wait_for_everyone()
        return Path(path)

    def push_to_hub(self, repo_id: str, which: str = "best", **kwargs: Any) -> str:
        """Save the fine-tuned model (LoRA merged, with its card) and upload it to the Hub repository ``repo_id``;
        returns the commit URL. ``kwargs``: ``private``, ``token``, ``revision``, ``commit_message``,
        ``create_pr`` (:func:`vlmsafe.cards.push_to_hub`). Main process only; the others return ``""``."""
        from vlmsafe.cards import CHECKPOINT_PATTERNS, push_saved

        url = ""
        if self.accelerator.is_main_process:
            url = push_saved(lambda folder: self.backend.save_pretrained(folder, self.merged_model(which),
                                                                         extra_files=self.model_files()),
                             repo_id, patterns=CHECKPOINT_PATTERNS, **kwargs)
        self.accelerator.wait_for_everyone()
        return url


def _check_parts(config: Any, train_data: Any, val_data: Any) -> None:
    """The run's parts by type, before any work: a dict of options fails as an AttributeError deep in setup, and
    a JSONL path read as a data set is its characters (10 "items"). Each refusal names the call that builds it."""
    if config is not None and not isinstance(config, SafeCLIPTrainingConfig):
        raise InputError(f"`config` must be a SafeCLIPTrainingConfig (SafeCLIPTrainingConfig.from_dict(...) for "
                         f"a dict), got {type(config).__name__}")
    for name, data in (("train_data", train_data), ("val_data", val_data)):
        if data is not None and not isinstance(data, QuadrupletDataset):
            raise InputError(f"`{name}` must be a QuadrupletDataset (vlmsafe.safeclip.data.QuadrupletDataset.from_"
                             f"jsonl(PATH) for a file), got {type(data).__name__}")


def select_towers(config: SafeCLIPTrainingConfig, data: QuadrupletDataset | None) -> tuple[str, ...]:
    """The towers a run trains: text unless ``train_text=False``; vision iff asked, or (default) iff the data has
    images."""
    has_images = bool(data is not None and data.has_images)
    train_vision = has_images if config.train_vision is None else bool(config.train_vision)
    if train_vision and data is not None and not has_images:
        raise InputError(
            "train_vision=True but the training data has no images: use text-only mode (train_vision=False) "
            "or add images"
        )
    towers = tuple(t for t, on in (("text", config.train_text), ("vision", train_vision)) if on)
    if not towers:
        raise InputError("nothing to train: set train_text and/or train_vision")
    return towers


def trainable_terms(towers: tuple[str, ...], data: QuadrupletDataset) -> tuple[str, ...]:
    """The loss terms that reach a trained tower on ``data`` (the others are constants or absent)."""
    has_v = any(q.safe_image is not None for q in data.items)
    has_g = any(q.unsafe_image is not None for q in data.items)
    has_vg = any(q.safe_image is not None and q.unsafe_image is not None for q in data.items)
    terms: list[str] = []
    if "text" in towers:
        terms += ["text_safe", "text_nsfw", TOKEN_TERM] + (["S_Vref", "U_Vref"] if has_v else [])
    if "vision" in towers:
        terms += (["vision_safe", "V_Sref"] if has_v else []) + (["vision_nsfw"] if has_vg else [])
        terms += ["G_Sref"] if has_g else []
    return tuple(terms)


def check_training_data(config: SafeCLIPTrainingConfig, data: QuadrupletDataset) -> tuple[str, ...]:
    """Check, before any model is loaded, that ``config`` can train on ``data``; returns the trained towers.

    Raises :class:`InputError` for fewer items than one batch, a tower that cannot be trained, and loss
    weights that are 0 for every term reaching a trained tower (no gradient at all).
    """
    if len(data) < config.batch_size:
        raise InputError(f"need at least batch_size={config.batch_size} training items, got {len(data)}; lower "
                         "batch_size or add data")
    towers = select_towers(config, data)
    terms = trainable_terms(towers, data)
    weights = config.weights.as_dict()
    if not any(weights[t] > 0 for t in terms):
        raise InputError(
            f"every loss term that trains the {' and '.join(towers)} tower(s) on this data ({', '.join(terms)}) has "
            f"weight 0, so nothing would be learned; give one of them a weight > 0, e.g. weights {terms[0]}=0.1"
        )
    return towers


def train_safeclip(
    model: str | os.PathLike[str] | CLIPBackend,
    train_data: QuadrupletDataset,
    output_dir: str | os.PathLike[str],
    config: SafeCLIPTrainingConfig | None = None,
    val_data: QuadrupletDataset | None = None,
    *,
    resume_from: str | None = None,
    overwrite: bool = False,
) -> TrainingResult:
    """Train and save ``output_dir/model`` (LoRA merged, best weights) in one call.

    A non-empty ``output_dir`` is refused before any work unless ``resume_from`` continues the run in
    it or ``overwrite=True`` replaces it (atomically, when the new run has finished).
    """
    from vlmsafe.safeclip.backends import load_backend

    _check_parts(config, train_data, val_data)  # before the model loads: a JSONL path is not 10 items
    out, replace = check_run_output(output_dir, resume_from=resume_from, overwrite=overwrite)
    config = config or SafeCLIPTrainingConfig()
    check_training_data(config, train_data)
    backend = model if isinstance(model, CLIPBackend) else load_backend(model)
    with run_directory(out, replace=replace) as run_dir:
        trainer = SafeCLIPTrainer(backend, config, train_data, val_data, output_dir=run_dir)
        result = trainer.train(resume_from=resume_from)
        trainer.save_pretrained(run_dir / "model", overwrite=resume_from is not None)
    result.model_dir = out / "model"
    return result
