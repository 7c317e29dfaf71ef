"""Safe-CLIP fine-tuning: LoRA or full fine-tuning of CLIP towers against a truly frozen reference.

What this trainer fixes or adds relative to the reference code (aimagelab/safe-clip):

* **Frozen reference.** The reference applied ``get_peft_model`` to the "frozen" copy too, so
  ``T0``/``I0`` moved with training. Here the reference is a deep copy taken *before* LoRA is
  injected, with ``requires_grad=False``, in eval mode and outside the optimizer
  (``reference="copy"``, the default); or, to save memory with LoRA, the same weights run under
  ``peft``'s ``disable_adapter()`` (``reference="disable_adapter"``).
* **Gradient accumulation** that keeps every micro-batch's gradient (``accelerate``'s
  ``accumulate``: the loss is divided by the number of micro-batches and the optimizer steps
  once). InfoNCE terms use each micro-batch's negatives, as in any CLIP training.
* **Multi-process** via ``accelerate`` (``accelerate launch``); the global batch is split across
  processes (``split_batches=True``) and embeddings are all-gathered before the loss, so N
  processes compute the same loss and gradient as one process on the same global batch.
* **Checkpoints without pickle**: trainable weights, AdamW state and RNG state as safetensors,
  everything else (step, epoch, scheduler, early-stopping state, history, config) as JSON.
  Resuming restores all of it and skips the batches already seen in the current epoch.
* Validation with early stopping on the validation loss *and* a recall sum; the best weights
  are kept and saved with LoRA merged as a standard checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.io import atomic_path, write_json_atomic
from vlmsafe.safeclip.backends import CLIPBackend
from vlmsafe.safeclip.data import QuadrupletCollator, QuadrupletDataset
from vlmsafe.safeclip.losses import LOSS_NAMES, SafeCLIPEmbeddings, SafeCLIPLossWeights, safeclip_losses

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class SafeCLIPTrainingConfig:
    """Everything that shapes a Safe-CLIP run. Defaults follow the reference where it has one.

    ``batch_size`` is the global batch of one forward pass (split across processes); the
    optimizer sees ``batch_size * gradient_accumulation_steps`` items per step.
    """

    train_text: bool = True
    train_vision: Optional[bool] = None  # None: train the vision tower iff the training data has images
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: float = 1.0
    lora_dropout: float = 0.1
    lora_target_modules: Optional[list[str]] = None  # leaf names; None: backend default
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
    max_steps: Optional[int] = None  # optimizer steps; stops before num_epochs if reached
    max_grad_norm: Optional[float] = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate)
    cpu: bool = False  # force the CPU even when a GPU is present
    eval_every: Optional[int] = None  # optimizer steps; None: at the end of every epoch
    eval_batch_size: int = 64
    early_stopping_patience: Optional[int] = 3  # evaluations without improvement; None: never stop
    early_stopping_min_delta: float = 0.0
    best_metric: str = "recall_sum"  # "recall_sum" (higher is better) | "loss" (lower)
    save_every: Optional[int] = None  # optimizer steps; None: only at the end
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
            raise InputError("reference='disable_adapter' needs LoRA (use_lora=True); full fine-tuning needs reference='copy'")
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
    def from_dict(cls, data: dict[str, Any]) -> "SafeCLIPTrainingConfig":
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
    best_metric: Optional[float] = None  # lower is better (the negated recall sum for best_metric="recall_sum")
    best_tie: Optional[float] = None  # the other metric, breaks ties
    best_loss: Optional[float] = None
    best_recall_sum: Optional[float] = None
    best_step: Optional[int] = None
    bad_evals: int = 0
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class TrainingResult:
    global_step: int
    stopped_early: bool
    best_step: Optional[int]
    best_metrics: Optional[dict[str, float]]
    history: list[dict[str, Any]]
    model_dir: Optional[Path] = None


class _FixedOrder(Sampler[int]):
    """Yields a fixed index order (one seeded permutation per epoch: reproducible and resumable)."""

    def __init__(self, order: Sequence[int]):
        self.order = list(order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class _Indexed(torch.utils.data.Dataset):
    """Yields ``(index, item)`` so batches know which training items they hold (reference cache)."""

    def __init__(self, data: QuadrupletDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.data[i]


class _IndexedCollator:
    def __init__(self, collator: QuadrupletCollator):
        self.collator = collator

    def __call__(self, pairs: Sequence[tuple[int, Any]]) -> dict[str, Any]:
        batch = self.collator([item for _, item in pairs])
        batch["index"] = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        return batch


class _TrainableTowers(nn.Module):
    """The trainable forward pass in one module, so DDP sees every trainable parameter used."""

    def __init__(self, backend: CLIPBackend, model: nn.Module, towers: Sequence[str]):
        super().__init__()
        self.model = model
        self._backend = backend
        self.towers = tuple(towers)

    def forward(self, batch: dict[str, Any]) -> dict[str, Optional[torch.Tensor]]:
        out: dict[str, Optional[torch.Tensor]] = {"text_safe": None, "text_nsfw": None, "image_safe": None, "image_nsfw": None}
        b = self._backend
        if "text" in self.towers:
            out["text_safe"] = b.encode_text(self.model, batch["safe_text"])
            out["text_nsfw"] = b.encode_text(self.model, batch["unsafe_text"])
        if "vision" in self.towers:
            n = int(batch["size"])
            for key, name in (("safe_image", "image_safe"), ("unsafe_image", "image_nsfw")):
                if batch.get(f"{key}_pixels") is not None:
                    out[name] = _scatter_rows(b.encode_image(self.model, batch[f"{key}_pixels"]), batch[f"{key}_index"], n)
        return out


def _scatter_rows(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``x`` placed at ``index`` of an ``[n, D]`` zero tensor (differentiable)."""
    return x.new_zeros((n, x.shape[-1])).index_copy(0, index.to(x.device), x)


def _row_mask(index: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[index.to(device)] = True
    return mask


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
        config: Optional[SafeCLIPTrainingConfig] = None,
        train_data: Optional[QuadrupletDataset] = None,
        val_data: Optional[QuadrupletDataset] = None,
        *,
        output_dir: Optional[str | os.PathLike[str]] = None,
    ):
        from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
        from accelerate.utils import set_seed

        self.config = config = config or SafeCLIPTrainingConfig()
        self.backend = backend
        self.train_data = train_data
        self.val_data = val_data
        self.output_dir = Path(output_dir) if output_dir is not None else None
        # accelerate only picks its multi-CPU (gloo) mode when told to use the CPU; do that for a
        # distributed launch (torchrun / accelerate launch) on a machine without CUDA.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        use_cpu = config.cpu or (launched and not torch.cuda.is_available())
        if not launched:
            _release_accelerator_state(config.mixed_precision, use_cpu)
        self.accelerator = Accelerator(
            cpu=use_cpu,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        self.world_size = self.accelerator.num_processes
        if config.batch_size % self.world_size:
            raise InputError(f"batch_size {config.batch_size} must be divisible by the number of processes ({self.world_size})")
        set_seed(config.seed)

        has_images = bool(train_data is not None and train_data.has_images)
        train_vision = has_images if config.train_vision is None else bool(config.train_vision)
        if train_vision and train_data is not None and not has_images:
            raise InputError("train_vision=True but the training data has no images: use text-only mode (train_vision=False) or add images")
        self.towers = tuple(t for t, on in (("text", config.train_text), ("vision", train_vision)) if on)
        if not self.towers:
            raise InputError("nothing to train: set train_text and/or train_vision")

        # The frozen reference is taken BEFORE any LoRA injection (defect (a) of the reference code).
        model = backend.model
        self.reference: Optional[nn.Module] = None
        if config.reference == "copy":
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

        self.peft_model = None
        if config.use_lora:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=backend.lora_target_regex(self.towers, config.lora_target_modules),
            )
            model.requires_grad_(False)
            try:
                self.peft_model = get_peft_model(model, lora)
            except ValueError as exc:
                raise InputError(f"LoRA could not target {config.lora_target_modules or backend.default_lora_modules} in this model: {exc}. Set lora_target_modules to leaf module names that exist") from exc
            self.inner = self.peft_model.base_model.model
        else:
            model.requires_grad_(False)
            for _, p in backend.tower_parameters(model, self.towers):
                p.requires_grad_(True)
            self.inner = model
        self.trainable_names = [n for n, p in self.inner.named_parameters() if p.requires_grad]
        if not self.trainable_names:
            raise InputError("no trainable parameters: check lora_target_modules and the trained towers")

        from transformers import get_scheduler

        params = [p for p in self.inner.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas, weight_decay=config.weight_decay)
        self.steps_per_epoch = self._steps_per_epoch()
        total = config.max_steps or max(1, self.steps_per_epoch * config.num_epochs)
        self.total_steps = min(total, self.steps_per_epoch * config.num_epochs) if self.steps_per_epoch else total
        scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=max(1, self.total_steps))
        towers_module = _TrainableTowers(backend, self.inner, self.towers)
        self.module, self.optimizer, self.scheduler = self.accelerator.prepare(towers_module, optimizer, scheduler)
        if self.reference is not None:
            self.reference.to(self.accelerator.device)
        self.state = TrainerState()
        self._ref_cache: dict[str, torch.Tensor] = {}
        self._best_trainable: Optional[dict[str, torch.Tensor]] = None
        self.collator = QuadrupletCollator(backend, use_images=has_images)

    # ------------------------------------------------------------------ data

    def _steps_per_epoch(self) -> int:
        if self.train_data is None:
            return 0
        micro = len(self.train_data) // self.config.batch_size
        return math.ceil(micro / self.config.gradient_accumulation_steps)

    def _epoch_loader(self, epoch: int) -> DataLoader:
        assert self.train_data is not None
        seed = self.config.seed * 1_000_003 + epoch
        order = torch.randperm(len(self.train_data), generator=torch.Generator().manual_seed(seed)).tolist()
        # An explicit generator keeps the DataLoader from drawing its worker seed from the global
        # RNG, which would make a resumed run's dropout masks differ from an uninterrupted run's.
        loader = DataLoader(
            _Indexed(self.train_data),
            batch_size=self.config.batch_size,
            sampler=_FixedOrder(order),
            drop_last=True,
            collate_fn=_IndexedCollator(self.collator),
            num_workers=self.config.num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
        return self.accelerator.prepare_data_loader(loader)

    # ------------------------------------------------------------------ loss

    @torch.no_grad()
    def _reference_embeddings(self, batch: dict[str, Any]) -> dict[str, Optional[torch.Tensor]]:
        """T0(S) and I0(V) of a batch, from the reference-embedding cache when every row is in it.

        The reference never changes and items are not augmented, so an item's reference
        embeddings are the same every epoch: computing them once saves two of the six encoder
        passes of a Safe-CLIP step from the second epoch on.
        """
        cached = self._cached_reference(batch)
        if cached is not None:
            return cached
        b = self.backend
        n = int(batch["size"])
        ctx = self.peft_model.disable_adapter() if self.reference is None else contextlib.nullcontext()
        model = self.inner if self.reference is None else self.reference
        out: dict[str, Optional[torch.Tensor]] = {"ref_text_safe": None, "ref_image_safe": None}
        with ctx, self.accelerator.autocast():
            out["ref_text_safe"] = b.encode_text(model, batch["safe_text"])
            if batch.get("safe_image_pixels") is not None:
                out["ref_image_safe"] = _scatter_rows(b.encode_image(model, batch["safe_image_pixels"]), batch["safe_image_index"], n)
        self._store_reference(batch, out)
        return out

    def _cached_reference(self, batch: dict[str, Any]) -> Optional[dict[str, Optional[torch.Tensor]]]:
        if not (self.config.cache_reference and "index" in batch and self._ref_cache):
            return None
        idx = batch["index"].cpu()
        if not bool(self._ref_cache["filled"][idx].all()):
            return None
        device = self.accelerator.device
        has_v = _row_mask(batch["safe_image_index"].cpu(), len(idx), torch.device("cpu"))
        image = None
        if has_v.any():
            image = self._ref_cache["image"][idx].to(device) if "image" in self._ref_cache else None
        return {"ref_text_safe": self._ref_cache["text"][idx].to(device), "ref_image_safe": image}

    def _store_reference(self, batch: dict[str, Any], out: dict[str, Optional[torch.Tensor]]) -> None:
        if not (self.config.cache_reference and "index" in batch and self.train_data is not None):
            return
        idx = batch["index"].cpu()
        n_items = len(self.train_data)
        text = out["ref_text_safe"]
        assert text is not None
        if not self._ref_cache:
            self._ref_cache["filled"] = torch.zeros(n_items, dtype=torch.bool)
            self._ref_cache["text"] = torch.zeros(n_items, text.shape[-1], dtype=text.dtype)
        self._ref_cache["text"][idx] = text.detach().cpu()
        if out["ref_image_safe"] is not None:
            img = out["ref_image_safe"]
            if "image" not in self._ref_cache:
                self._ref_cache["image"] = torch.zeros(n_items, img.shape[-1], dtype=img.dtype)
            self._ref_cache["image"][idx] = img.detach().cpu()
        self._ref_cache["filled"][idx] = True

    def compute_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Forward one batch (this process's share) and return the eight terms and ``loss``.

        With several processes the embeddings of all processes are gathered first, so the
        returned losses are those of the global batch on every process.
        """
        n = int(batch["size"])
        device = self.accelerator.device
        trainable = self.module(batch)
        ref = self._reference_embeddings(batch)
        has_v = _row_mask(batch["safe_image_index"], n, device)
        has_g = _row_mask(batch["unsafe_image_index"], n, device)
        if ref["ref_image_safe"] is None:
            has_v = torch.zeros_like(has_v)
        emb = SafeCLIPEmbeddings(
            ref_text_safe=ref["ref_text_safe"],
            ref_image_safe=ref["ref_image_safe"],
            has_safe_image=has_v,
            has_unsafe_image=has_g,
            **trainable,
        )
        if self.world_size > 1:
            emb = self._gather(emb, n)
        return safeclip_losses(emb, self.config.weights, logit_scale=self.config.logit_scale)

    def _gather(self, emb: SafeCLIPEmbeddings, n: int) -> SafeCLIPEmbeddings:
        """All-gather embeddings; this process's rows keep their autograd graph.

        Each process then computes the loss of the whole global batch, but its gradient flows
        only through its own rows; the backward pass scales the loss by the number of processes
        so DDP's gradient *average* equals the single-process gradient of the global batch.
        """
        acc = self.accelerator
        rank = acc.process_index
        dim = emb.ref_text_safe.shape[-1]

        def gather(x: torch.Tensor) -> torch.Tensor:
            parts = list(acc.gather(x.detach().contiguous()).chunk(self.world_size))
            parts[rank] = x  # keep this process's rows differentiable
            return torch.cat(parts)

        optional = ("text_safe", "text_nsfw", "image_safe", "image_nsfw", "ref_image_safe")
        # A field may be missing on one process only (e.g. no images in its share of the batch):
        # every process must join every all-gather, so the missing side sends zero rows.
        present = acc.gather(torch.tensor([[getattr(emb, f) is not None for f in optional]], device=acc.device)).any(dim=0).tolist()
        fields: dict[str, Optional[torch.Tensor]] = {}
        for name, any_process in zip(optional, present):
            x = getattr(emb, name)
            fields[name] = gather(x if x is not None else emb.ref_text_safe.new_zeros((n, dim))) if any_process else None
        fields["ref_text_safe"] = gather(emb.ref_text_safe)
        fields["has_safe_image"] = acc.gather(emb.has_safe_image)
        fields["has_unsafe_image"] = acc.gather(emb.has_unsafe_image)
        return SafeCLIPEmbeddings(**fields)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ training

    def train(self, resume_from: Optional[str | os.PathLike[str]] = None) -> TrainingResult:
        """Run training (optionally resuming a checkpoint dir, or ``"latest"`` in ``output_dir``)."""
        from tqdm.auto import tqdm

        if self.train_data is None or len(self.train_data) < self.config.batch_size:
            raise InputError(f"need at least batch_size={self.config.batch_size} training items, got {0 if self.train_data is None else len(self.train_data)}")
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        cfg, acc, st = self.config, self.accelerator, self.state
        self.module.train()
        bar = tqdm(total=self.total_steps, initial=st.global_step, desc="safe-clip", disable=not (cfg.progress and acc.is_main_process), dynamic_ncols=True)
        running: dict[str, float] = {}
        micro = 0
        while st.epoch < cfg.num_epochs and not st.stopped_early and st.global_step < self.total_steps:
            loader = self._epoch_loader(st.epoch)
            if st.batch_in_epoch:
                loader = acc.skip_first_batches(loader, st.batch_in_epoch)
            finished_epoch = True
            for batch in loader:
                with acc.accumulate(self.module):
                    losses = self.compute_losses(batch)
                    acc.backward(losses["loss"] * self.world_size)
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
                entry = {"step": st.global_step, "epoch": st.epoch, "lr": float(self.scheduler.get_last_lr()[0])}
                entry.update({f"train/{k}": v / micro for k, v in running.items()})
                st.history.append(entry)
                running, micro = {}, 0
                bar.update(1)
                bar.set_postfix(loss=f"{entry['train/loss']:.4f}")
                if cfg.eval_every and st.global_step % cfg.eval_every == 0:
                    self._evaluate_and_track()
                if cfg.save_every and self.output_dir is not None and st.global_step % cfg.save_every == 0:
                    self.save_checkpoint()
                if st.stopped_early or st.global_step >= self.total_steps:
                    finished_epoch = st.batch_in_epoch >= len(self.train_data) // cfg.batch_size
                    break
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
        return TrainingResult(
            global_step=st.global_step,
            stopped_early=st.stopped_early,
            best_step=st.best_step,
            best_metrics={"loss": st.best_loss, "recall_sum": st.best_recall_sum} if st.best_step is not None else None,
            history=list(st.history),
        )

    def _evaluate_and_track(self) -> None:
        if self.val_data is None:
            return
        cfg, st = self.config, self.state
        metrics = self.evaluate(self.val_data)
        st.history.append({"step": st.global_step, "epoch": st.epoch, **{f"val/{k}": v for k, v in metrics.items()}})
        loss, rsum = metrics["loss"], metrics["recall_sum"]
        delta = cfg.early_stopping_min_delta
        improved = (st.best_loss is None or loss < st.best_loss - delta) or (st.best_recall_sum is None or rsum > st.best_recall_sum + delta)
        st.best_loss = loss if st.best_loss is None else min(st.best_loss, loss)
        st.best_recall_sum = rsum if st.best_recall_sum is None else max(st.best_recall_sum, rsum)
        key = -rsum if cfg.best_metric == "recall_sum" else loss
        tie_break = loss if cfg.best_metric == "recall_sum" else -rsum
        if st.best_metric is None or (key, tie_break) < (st.best_metric, st.best_tie if st.best_tie is not None else math.inf):
            st.best_metric, st.best_tie = key, tie_break
            st.best_step = st.global_step
            self._best_trainable = self.trainable_state_dict()
            if self.output_dir is not None and self.accelerator.is_main_process:
                self._write_best(metrics)
        st.bad_evals = 0 if improved else st.bad_evals + 1
        if cfg.early_stopping_patience is not None and st.bad_evals >= cfg.early_stopping_patience:
            st.stopped_early = True
        self.module.train()

    @torch.no_grad()
    def evaluate(self, data: QuadrupletDataset) -> dict[str, float]:
        """Validation losses (averaged over ``eval_batch_size`` chunks) and recall sum.

        The recall sum is R@1 of T(S)→I0(V) + T(U)→I0(V) + I(V)→T0(S) + I(G)→T0(S) — each trained
        tower queried against the frozen reference's other tower, as the NCE terms train them.
        Without images it is R@1 of T(S)→T0(S) + T(U)→T0(S).
        """
        from vlmsafe.safeclip.retrieval import embed_quadruplets, recall_at_k

        was_training = self.module.training
        self.module.eval()
        bs = self.config.eval_batch_size
        with self.accelerator.autocast():
            cur = embed_quadruplets(self.backend, self.inner, data, batch_size=bs, towers=self.towers, progress=False)
            if self.reference is None:
                with self.peft_model.disable_adapter():
                    ref = embed_quadruplets(self.backend, self.inner, data, batch_size=bs, towers=("text", "vision"), progress=False, texts=("safe",), images=("safe",))
            else:
                ref = embed_quadruplets(self.backend, self.reference, data, batch_size=bs, towers=("text", "vision"), progress=False, texts=("safe",), images=("safe",))
        if was_training:
            self.module.train()
        n = len(data)
        totals = {k: 0.0 for k in (*LOSS_NAMES, "loss")}
        for start in range(0, n, bs):
            sl = slice(start, start + bs)

            def take(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
                return None if x is None else x[sl]

            emb = SafeCLIPEmbeddings(
                ref_text_safe=ref["S"][sl],
                ref_image_safe=take(ref.get("V")),
                text_safe=take(cur.get("S")),
                text_nsfw=take(cur.get("U")),
                image_safe=take(cur.get("V")),
                image_nsfw=take(cur.get("G")),
                has_safe_image=ref["has_V"][sl],
                has_unsafe_image=ref["has_G"][sl],
            )
            out = safeclip_losses(emb, self.config.weights, logit_scale=self.config.logit_scale)
            m = min(bs, n - start)
            for k in totals:
                totals[k] += float(out[k]) * m
        metrics = {k: v / n for k, v in totals.items()}
        has_v, has_g = ref["has_V"], ref["has_G"]
        recalls: dict[str, float] = {}
        S = cur.get("S") if cur.get("S") is not None else ref["S"]
        U = cur.get("U")
        if has_v.any():
            V0 = ref["V"][has_v]
            S0v = ref["S"][has_v]
            recalls["S->V0"] = recall_at_k(S[has_v], V0, (1,))[1]
            if U is not None:
                recalls["U->V0"] = recall_at_k(U[has_v], V0, (1,))[1]
            if cur.get("V") is not None:
                recalls["V->S0"] = recall_at_k(cur["V"][has_v], S0v, (1,))[1]
            if cur.get("G") is not None and has_g.any():
                recalls["G->S0"] = recall_at_k(cur["G"][has_g], ref["S"][has_g], (1,))[1]
        else:
            recalls["S->S0"] = recall_at_k(S, ref["S"], (1,))[1]
            if U is not None:
                recalls["U->S0"] = recall_at_k(U, ref["S"], (1,))[1]
        metrics.update({f"R@1 {k}": v for k, v in recalls.items()})
        metrics["recall_sum"] = float(sum(recalls.values()))
        return metrics

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
                f"checkpoint weights do not match this trainer (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}); "
                "resume with the same model, towers and LoRA settings"
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
        if self.accelerator.is_main_process:
            self.backend.save_pretrained(path, self.merged_model(which), overwrite=overwrite)
            write_json_atomic(Path(path) / "safeclip_training.json", {"config": self.config.to_dict(), "towers": list(self.towers), "best_step": self.state.best_step, "global_step": self.state.global_step})
        self.accelerator.wait_for_everyone()
        return Path(path)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> Optional[Path]:
        """Write ``output_dir/checkpoint-{step}`` (safetensors + JSON) and prune old ones."""
        from safetensors.torch import save_file

        if self.output_dir is None:
            raise InputError("set output_dir to save checkpoints")
        acc = self.accelerator
        dest = self.output_dir / f"{CHECKPOINT_PREFIX}{self.state.global_step:07d}"
        rng_name = f"rng_{acc.process_index}.safetensors"
        # Each process stores its RNG state next to the checkpoint (written before the main one renames).
        rng_dir = self.output_dir / ".rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        save_file(_rng_state(), str(rng_dir / f"{self.state.global_step:07d}_{rng_name}"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            opt_tensors, opt_meta = _optimizer_state(self.optimizer)
            with atomic_path(dest, overwrite=True) as tmp:
                tmp.mkdir()
                save_file(self.trainable_state_dict(), str(tmp / "trainable.safetensors"))
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                (tmp / "optimizer.json").write_text(json.dumps(opt_meta) + "\n")
                for rank in range(self.world_size):
                    src = rng_dir / f"{self.state.global_step:07d}_rng_{rank}.safetensors"
                    shutil.move(str(src), str(tmp / f"rng_{rank}.safetensors"))
                with contextlib.suppress(OSError):
                    rng_dir.rmdir()  # only when empty
                state = {
                    "trainer_state": _state_to_json(self.state),
                    "scheduler": _jsonable(self.scheduler.state_dict()),
                    "config": self.config.to_dict(),
                    "towers": list(self.towers),
                    "trainable_names": self.trainable_names,
                    "backend": self.backend.config_dict(),
                    "world_size": self.world_size,
                }
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            ckpts = sorted(self.output_dir.glob(f"{CHECKPOINT_PREFIX}*"))
            for old in ckpts[: max(0, len(ckpts) - max(1, self.config.keep_checkpoints))]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return dest

    def _write_best(self, metrics: dict[str, float]) -> None:
        from safetensors.torch import save_file

        assert self.output_dir is not None and self._best_trainable is not None
        with atomic_path(self.output_dir / "best", overwrite=True) as tmp:
            tmp.mkdir()
            save_file(self._best_trainable, str(tmp / "trainable.safetensors"))
            (tmp / "metrics.json").write_text(json.dumps({"step": self.state.global_step, **metrics}, indent=2) + "\n")

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore weights, optimizer, scheduler, RNG and trainer state from a checkpoint."""
        from safetensors.torch import load_file

        path = self._resolve_checkpoint(path)
        try:
            state = json.loads((path / STATE_FILE).read_text())
            trainable = load_file(str(path / "trainable.safetensors"))
            opt_tensors = load_file(str(path / "optimizer.safetensors"))
            opt_meta = json.loads((path / "optimizer.json").read_text())
        except (OSError, json.JSONDecodeError, Exception) as exc:  # safetensors raises its own error type
            if isinstance(exc, FileFormatError):
                raise
            raise FileFormatError(f"checkpoint {path} is incomplete or corrupted ({exc}); resume from another checkpoint") from exc
        if list(state.get("towers", [])) != list(self.towers):
            raise FileFormatError(f"checkpoint {path} trained towers {state.get('towers')} but this trainer trains {list(self.towers)}")
        self.load_trainable_state_dict(trainable)
        self.optimizer.load_state_dict(_optimizer_from_state(opt_tensors, opt_meta))
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = _state_from_json(state["trainer_state"])
        rng_file = path / f"rng_{self.accelerator.process_index}.safetensors"
        if rng_file.is_file():
            _set_rng_state(load_file(str(rng_file)))
        best = path.parent / "best" / "trainable.safetensors"
        if self.state.best_step is not None and best.is_file():
            self._best_trainable = load_file(str(best))

    def _resolve_checkpoint(self, path: str | os.PathLike[str]) -> Path:
        if str(path) == "latest":
            if self.output_dir is None:
                raise InputError("resume_from='latest' needs output_dir")
            found = sorted(self.output_dir.glob(f"{CHECKPOINT_PREFIX}*"))
            if not found:
                raise FileFormatError(f"no {CHECKPOINT_PREFIX}* folder in {self.output_dir} to resume from")
            return found[-1]
        p = Path(path)
        if not (p / STATE_FILE).is_file():
            raise FileFormatError(f"{p} is not a Safe-CLIP checkpoint (no {STATE_FILE}); pass a {CHECKPOINT_PREFIX}* folder or 'latest'")
        return p


def _release_accelerator_state(mixed_precision: str, cpu: bool) -> None:
    """Let a single process build trainers with different precision/device settings.

    ``accelerate`` keeps one process-wide state and refuses an ``Accelerator`` whose
    ``mixed_precision`` or ``cpu`` differs from the first one. In a single, non-distributed
    process nothing depends on that state between trainers, so it is reset when it would clash.
    """
    from accelerate.state import AcceleratorState, GradientState

    shared = AcceleratorState._shared_state
    if not shared:
        return
    clash = shared.get("_mixed_precision") != mixed_precision or (cpu and getattr(shared.get("device"), "type", "cpu") != "cpu")
    if clash and int(shared.get("num_processes", 1)) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    raise InputError(f"cannot store {type(obj).__name__} in a JSON checkpoint")


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                other.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": _jsonable(sd["param_groups"]), "state": _jsonable(other)}


def _optimizer_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        pid, _, name = key.partition(".")
        state.setdefault(int(pid), {})[name] = t
    for pid, extra in meta.get("state", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state_to_json(st: TrainerState) -> dict[str, Any]:
    return _jsonable(dataclasses.asdict(st))


def _state_from_json(d: dict[str, Any]) -> TrainerState:
    return TrainerState(**d)


def train_safeclip(
    model: str | os.PathLike[str] | CLIPBackend,
    train_data: QuadrupletDataset,
    output_dir: str | os.PathLike[str],
    config: Optional[SafeCLIPTrainingConfig] = None,
    val_data: Optional[QuadrupletDataset] = None,
    *,
    resume_from: Optional[str] = None,
) -> TrainingResult:
    """Train and save ``output_dir/model`` (LoRA merged, best weights) in one call."""
    from vlmsafe.safeclip.backends import load_backend

    backend = model if isinstance(model, CLIPBackend) else load_backend(model)
    trainer = SafeCLIPTrainer(backend, config, train_data, val_data, output_dir=output_dir)
    result = trainer.train(resume_from=resume_from)
    result.model_dir = trainer.save_pretrained(Path(output_dir) / "model")
    return result
