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
  *and* a recall sum (:mod:`~vlmsafe.safeclip.loop`); the best weights are kept and saved with
  LoRA merged as a standard checkpoint.

Module map: :mod:`~vlmsafe.safeclip.config` (options, state), :mod:`~vlmsafe.safeclip.batches`
(epoch order, trainable forward), :mod:`~vlmsafe.safeclip.loop` (``train``),
:mod:`~vlmsafe.safeclip.evaluation` (``evaluate``), :mod:`~vlmsafe.safeclip.checkpoint`
(``save_checkpoint`` / ``load_checkpoint``); this module: set-up, the loss of one batch, weights.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.safeclip.backends import CLIPBackend
from vlmsafe.safeclip.batches import TrainableTowers, epoch_loader, row_mask
from vlmsafe.safeclip.checkpoint import CheckpointMixin, check_run_output, run_directory
from vlmsafe.safeclip.config import SafeCLIPTrainingConfig, TrainerState, TrainingResult
from vlmsafe.safeclip.data import QuadrupletCollator, QuadrupletDataset
from vlmsafe.safeclip.distributed import build_accelerator, gather_embeddings
from vlmsafe.safeclip.evaluation import EvaluationMixin
from vlmsafe.safeclip.loop import TrainingLoopMixin
from vlmsafe.safeclip.losses import (
    ALL_LOSS_NAMES,
    TERMS_BY_EMBEDDING,
    TOKEN_TERM,
    SafeCLIPEmbeddings,
    safeclip_losses,
    token_drift,
)
from vlmsafe.safeclip.reference import FrozenReference, RefOutputs, frozen_copy

__all__ = ["SafeCLIPTrainer", "SafeCLIPTrainingConfig", "TrainerState", "TrainingResult", "train_safeclip"]


class SafeCLIPTrainer(TrainingLoopMixin, EvaluationMixin, CheckpointMixin):
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
        self.peft_model, self.inner = self._make_trainable(backend.model)
        self.trainable_names = [n for n, p in self.inner.named_parameters() if p.requires_grad]
        if not self.trainable_names:
            raise InputError("no trainable parameters: check lora_target_modules and the trained towers")
        self._setup_optimization()
        if self.reference is not None:
            self.reference.to(self.accelerator.device)
        cache_items = len(train_data) if (config.cache_reference and train_data is not None) else None
        self.frozen = FrozenReference(backend, self.reference, peft_model=self.peft_model, inner=self.inner,
                                      autocast=self.accelerator.autocast, cache_items=cache_items,
                                      token_layer=self.token_layer)
        self.state = TrainerState()
        self._best_trainable: dict[str, torch.Tensor] | None = None
        self._val_reference = None  # the reference's embeddings of the validation set (it is frozen)
        self.collator = QuadrupletCollator(backend, use_images=has_images,
                                           padded_safe_text=self.token_layer is not None)

    # ------------------------------------------------------------------ set-up

    def _make_trainable(self, model: nn.Module) -> tuple[Any, nn.Module]:
        """Inject LoRA into the trained towers (or unfreeze them); returns (peft model or None, inner model)."""
        cfg = self.config
        model.requires_grad_(False)
        if not cfg.use_lora:
            for _, p in self.backend.tower_parameters(model, self.towers):
                p.requires_grad_(True)
            return None, model
        from peft import LoraConfig

        from vlmsafe.loading import inject_lora

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=self.backend.lora_target_regex(self.towers, cfg.lora_target_modules),
        )
        try:
            peft_model = inject_lora(model, lora)
        except ValueError as exc:
            targets = cfg.lora_target_modules or self.backend.default_lora_modules
            raise InputError(
                f"LoRA could not target {targets} in this model: {exc}. Set lora_target_modules to leaf module "
                "names that exist"
            ) from exc
        return peft_model, peft_model.base_model.model

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

    def epoch_loader(self, epoch: int) -> DataLoader:
        """This process's data loader for ``epoch`` (a seeded order: reproducible and resumable)."""
        assert self.train_data is not None
        cfg = self.config
        loader = epoch_loader(self.train_data, self.collator, batch_size=cfg.batch_size, seed=cfg.seed, epoch=epoch,
                              num_workers=cfg.num_workers)
        return self.accelerator.prepare_data_loader(loader)

    # ------------------------------------------------------------------ loss

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward one batch (this process's share) and return the terms and ``loss``.

        With several processes the embeddings of all processes are gathered first, so the
        returned losses are those of the global batch on every process.
        """
        emb = self._embeddings(batch, self.module(batch))
        if self.world_size > 1:
            emb = gather_embeddings(emb, self.accelerator, int(batch["size"]))
        return self._losses(emb)

    def forward_backward(self, batch: dict[str, Any], scale: float = 1.0) -> dict[str, torch.Tensor]:
        """The losses of one batch (detached), with the gradient of ``scale * loss`` added to ``.grad``.

        Every term involves exactly one trainable embedding, T(S), T(U), I(V) or I(G) (its partner comes
        from the frozen reference), so the loss is a sum of one part per embedding. In one process each
        tower pass is therefore backpropagated right after its forward, and only one pass's activations
        are alive at a time: on the CPU that step took 1.99x a plain CLIP step where one backward through
        all four passes took 2.21x (``benchmarks/safeclip_step.py``, both before the passes ran their last
        block on the pooled token only). With several processes the four
        passes go through DDP as one forward and one backward (:meth:`compute_losses`).
        """
        if self.world_size > 1:
            losses = self.compute_losses(batch)
            self._backward(losses["loss"], scale)
            return {k: v.detach() for k, v in losses.items()}
        ref = self.frozen(batch, self.accelerator.device)
        out = {name: ref["ref_text_safe"].new_zeros((), dtype=torch.float32) for name in (*ALL_LOSS_NAMES, "loss")}
        for part in self.module.parts(batch):
            losses = self._losses(self._embeddings(batch, self.module(batch, parts=(part,)), ref))
            self._backward(losses["loss"], scale)
            for term in TERMS_BY_EMBEDDING[part]:
                out[term] = losses[term].detach()
            out["loss"] = out["loss"] + losses["loss"].detach()
        return out

    def _backward(self, loss: torch.Tensor, scale: float) -> None:
        if not loss.requires_grad:
            # No term reaches a trained tower (e.g. vision-only training, a batch without images): no gradient.
            # Several processes must all run backward, so there it is an error.
            if self.world_size > 1:
                raise InputError("a training batch has no loss term that reaches a trained tower; with several "
                                 "processes every batch needs one: give every item the images the trained tower uses")
            return
        self.accelerator.backward(loss * scale)

    def _embeddings(
        self, batch: dict[str, Any], trainable: dict[str, torch.Tensor | None], ref: RefOutputs | None = None
    ) -> SafeCLIPEmbeddings:
        """The loss inputs: ``trainable`` tower outputs and the frozen reference's (``ref``, computed if not given).

        Token states (``trainable["text_safe_tokens"]``) become their per-row drift from the reference's.
        """
        n, device = int(batch["size"]), self.accelerator.device
        ref = self.frozen(batch, device) if ref is None else ref
        has_v = row_mask(batch["safe_image_index"], n, device)
        if ref["ref_image_safe"] is None:
            has_v = torch.zeros_like(has_v)
        has_g = row_mask(batch["unsafe_image_index"], n, device)
        trainable = dict(trainable)
        states = trainable.pop(TOKEN_TERM, None)
        drift = None if states is None else token_drift(states, ref["ref_text_safe_tokens"])
        return SafeCLIPEmbeddings(ref_text_safe=ref["ref_text_safe"], ref_image_safe=ref["ref_image_safe"],
                                  has_safe_image=has_v, has_unsafe_image=has_g, text_safe_token_drift=drift,
                                  **trainable)

    def _losses(self, emb: SafeCLIPEmbeddings) -> dict[str, torch.Tensor]:
        cfg = self.config
        return safeclip_losses(emb, cfg.weights, logit_scale=cfg.logit_scale, loss_scale=cfg.loss_scale)

    def _keep_best(self, metrics: dict[str, float]) -> None:
        """Remember the current weights as the best so far (and write ``output_dir/best``)."""
        self._best_trainable = self.trainable_state_dict()
        if self.output_dir is not None and self.accelerator.is_main_process:
            self._write_best(metrics)

    # ------------------------------------------------------------------ weights

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """CPU copies of the trainable parameters (LoRA weights, or the fine-tuned towers)."""
        params = dict(self.inner.named_parameters())
        return {n: params[n].detach().to("cpu", copy=True).contiguous() for n in self.trainable_names}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.inner.named_parameters())
        missing = set(self.trainable_names) - set(state)
        extra = set(state) - set(self.trainable_names)
        if missing or extra:
            raise FileFormatError(
                f"checkpoint weights do not match this trainer (missing {sorted(missing)[:3]}, unexpected "
                f"{sorted(extra)[:3]}); resume with the same model, towers and LoRA settings"
            )
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t.to(params[n].device, params[n].dtype))

    def merged_model(self, which: str = "best") -> nn.Module:
        """A standalone copy of the model with LoRA merged in (``which``: "best" or "last")."""
        if which not in ("best", "last"):
            raise InputError("which must be 'best' or 'last'")
        current = self.trainable_state_dict()
        if which == "best" and self._best_trainable is not None:
            self.load_trainable_state_dict(self._best_trainable)
        try:
            if self.peft_model is not None:
                merged = copy.deepcopy(self.peft_model).merge_and_unload()
            else:
                merged = copy.deepcopy(self.inner)
        finally:
            self.load_trainable_state_dict(current)
        merged.requires_grad_(False).eval()
        return merged

    def save_pretrained(self, path: str | os.PathLike[str], which: str = "best", *, overwrite: bool = False) -> Path:
        """Save the fine-tuned model as a standard checkpoint with LoRA merged (main process only)."""
        if self.accelerator.is_main_process:  # the run's summary and the model card: in the same atomic output
            self.backend.save_pretrained(path, self.merged_model(which), overwrite=overwrite,
                                         extra_files=self.model_files())
        self.accelerator.wait_for_everyone()
        return Path(path)


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
