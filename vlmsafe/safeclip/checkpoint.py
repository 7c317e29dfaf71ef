"""Safe-CLIP checkpoints without pickle: safetensors for tensors, JSON for everything else.

``output_dir/checkpoint-{step:07d}/`` holds ``trainable.safetensors`` (LoRA or tower weights),
``optimizer.safetensors`` + ``optimizer.json`` (AdamW moments; hyper-parameters), one
``rng_{rank}.safetensors`` per process and ``trainer_state.json`` (step, epoch, position in the
epoch, scheduler, early-stopping state, history, config). ``output_dir/best/`` holds the best
validation weights. Every folder is written atomically; resuming never unpickles anything.

The final model folder (``save_pretrained``) also holds ``safeclip_training.json`` and a model card
(``README.md``, :func:`safeclip_card`) written in the same atomic output: the base model, LoRA and
loss settings, and a sha256 of the training data, in the Hugging Face Hub's format
(:meth:`CheckpointMixin.push_to_hub` uploads it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from vlmsafe.cards import CARD_FILE, digest_lines, display_name, render_card
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.io import atomic_path, read_json
from vlmsafe.safeclip.config import SafeCLIPTrainingConfig, TrainerState

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
BEST_DIR = "best"
#: The run's summary beside the final model (config, towers, steps).
TRAINING_FILE = "safeclip_training.json"


class CheckpointMixin:
    """``save_checkpoint`` / ``load_checkpoint`` of :class:`~vlmsafe.safeclip.trainer.SafeCLIPTrainer`."""

    config: SafeCLIPTrainingConfig
    state: TrainerState
    output_dir: Path | None
    accelerator: Any
    optimizer: Any
    scheduler: Any
    backend: Any
    towers: tuple[str, ...]
    trainable_names: list[str]
    world_size: int
    train_data: Any
    val_data: Any
    _best_trainable: dict[str, torch.Tensor] | None

    # provided by the trainer class (annotations only: nothing here shadows it)
    trainable_state_dict: Callable[[], dict[str, torch.Tensor]]
    load_trainable_state_dict: Callable[[dict[str, torch.Tensor]], None]

    def save_checkpoint(self) -> Path:
        """Write ``output_dir/checkpoint-{step}`` and prune old ones (keeps ``keep_checkpoints``)."""
        from safetensors.torch import save_file

        if self.output_dir is None:
            raise InputError("SafeCLIPTrainer: no output_dir, so checkpoints cannot be saved; pass output_dir=")
        acc, st = self.accelerator, self.state
        out = self.output_dir
        dest = out / f"{CHECKPOINT_PREFIX}{st.global_step:07d}"
        # Each process stores its RNG state next to the checkpoint (written before the main one renames).
        rng_dir = out / ".rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        save_file(rng_state(), str(rng_dir / f"{st.global_step:07d}_rng_{acc.process_index}.safetensors"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            opt_tensors, opt_meta = optimizer_state(self.optimizer)
            with atomic_path(dest, overwrite=True) as tmp:
                tmp.mkdir()
                save_file(self.trainable_state_dict(), str(tmp / "trainable.safetensors"))
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                (tmp / "optimizer.json").write_text(json.dumps(opt_meta) + "\n")
                for rank in range(self.world_size):
                    src = rng_dir / f"{st.global_step:07d}_rng_{rank}.safetensors"
                    shutil.move(str(src), str(tmp / f"rng_{rank}.safetensors"))
                with contextlib.suppress(OSError):
                    rng_dir.rmdir()  # only when empty
                state = {
                    "trainer_state": jsonable(dataclasses.asdict(st)),
                    "scheduler": jsonable(self.scheduler.state_dict()),
                    "config": self.config.to_dict(),
                    "towers": list(self.towers),
                    "trainable_names": self.trainable_names,
                    "backend": self.backend.config_dict(),
                    "world_size": self.world_size,
                }
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
            ckpts = sorted(out.glob(f"{CHECKPOINT_PREFIX}*"))
            for old in ckpts[: max(0, len(ckpts) - max(1, self.config.keep_checkpoints))]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return dest

    def _write_best(self, metrics: dict[str, float]) -> None:
        """``output_dir/best``: the best validation weights so far and their metrics."""
        from safetensors.torch import save_file

        assert self.output_dir is not None and self._best_trainable is not None
        with atomic_path(self.output_dir / BEST_DIR, overwrite=True) as tmp:
            tmp.mkdir()
            save_file(self._best_trainable, str(tmp / "trainable.safetensors"))
            metrics = {"step": self.state.global_step, **metrics}
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")

    def model_files(self) -> dict[str, str]:
        """``{name: text}`` written beside the final model, inside its atomic output: the run's summary
        (:data:`TRAINING_FILE`) and the model card."""
        info = {"config": self.config.to_dict(), "towers": list(self.towers), "best_step": self.state.best_step,
                "global_step": self.state.global_step}
        return {TRAINING_FILE: json.dumps(info, indent=2) + "\n", CARD_FILE: safeclip_card(self)}

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

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore weights, optimizer, scheduler, RNG and trainer state from a checkpoint."""
        from safetensors.torch import load_file

        path = resolve_checkpoint(path, self.output_dir)
        fix = "the checkpoint is incomplete or corrupted; resume from another checkpoint"
        state = read_json(path / STATE_FILE, what="checkpoint state file", fix=fix)
        opt_meta = read_json(path / "optimizer.json", what="optimizer state file", fix=fix)
        try:
            trainable = load_file(str(path / "trainable.safetensors"))
            opt_tensors = load_file(str(path / "optimizer.safetensors"))
        except Exception as exc:  # OSError and safetensors' own error type
            raise FileFormatError(f"checkpoint {path} is incomplete or corrupted ({exc}); resume from another "
                                  "checkpoint") from exc
        if list(state.get("towers", [])) != list(self.towers):
            raise FileFormatError(
                f"checkpoint {path} trained towers {state.get('towers')} but this trainer trains {list(self.towers)}"
            )
        self.load_trainable_state_dict(trainable)
        self.optimizer.load_state_dict(optimizer_from_state(opt_tensors, opt_meta))
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainerState(**state["trainer_state"])
        rng_file = path / f"rng_{self.accelerator.process_index}.safetensors"
        if rng_file.is_file():
            set_rng_state(load_file(str(rng_file)))
        best = path.parent / BEST_DIR / "trainable.safetensors"
        if self.state.best_step is not None and best.is_file():
            self._best_trainable = load_file(str(best))


def dataset_digest(data: Any) -> dict[str, Any] | None:
    """The ``data`` block of a Safe-CLIP card: item counts and a sha256 over every item's captions and image
    file names (or, for in-memory images, their pixels), in order -- the same data gives the same hash on any
    machine, wherever its files lie. ``None`` without data."""
    if data is None:
        return None
    items = list(getattr(data, "items", []))

    def image_key(image: Any) -> str:
        if image is None:
            return ""
        if isinstance(image, (str, os.PathLike)):
            return Path(image).name
        if isinstance(image, torch.Tensor):
            return hashlib.sha256(image.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        tobytes = getattr(image, "tobytes", None)  # a PIL image
        return hashlib.sha256(tobytes()).hexdigest() if callable(tobytes) else type(image).__name__

    lines = (json.dumps([q.safe, q.unsafe, image_key(q.safe_image), image_key(q.unsafe_image)], ensure_ascii=False)
             for q in items)
    with_images = sum(q.safe_image is not None or q.unsafe_image is not None for q in items)
    return {"sha256": digest_lines(lines), "items": len(items), "items_with_images": with_images,
            "description": f"{len(items)} training quadruplets (safe caption, unsafe caption, optional safe / "
                           f"unsafe image), {with_images} with images; sha256 over every item's captions and image "
                           "file names, in order"}


def safeclip_card(trainer: Any) -> str:
    """The model card of a Safe-CLIP encoder saved by ``trainer``: base model, towers, LoRA and loss settings,
    the training data's sha256, the best validation metrics."""
    cfg, st, backend = trainer.config, trainer.state, trainer.backend
    hf = backend.kind == "hf"
    base = getattr(getattr(backend.model, "config", None), "name_or_path", None) if hf else backend.model_name
    base = base or None
    lora = ({"lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
             "lora_target_modules": list(cfg.lora_target_modules or backend.default_lora_modules)}
            if cfg.use_lora else {})
    settings = {
        "towers": list(trainer.towers),
        "use_lora": cfg.use_lora,
        **lora,
        "loss_weights": cfg.weights.as_dict(),
        "loss_scale": cfg.loss_scale,
        "logit_scale": cfg.logit_scale,
        "token_layer": cfg.token_layer,
        "learning_rate": cfg.learning_rate,
        "batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_epochs": cfg.num_epochs,
        "global_step": st.global_step,
        "best_step": st.best_step,
        "best_metric": cfg.best_metric,
        "best_loss": st.best_loss,
        "best_recall_sum": st.best_recall_sum,
        "seed": cfg.seed,
    }
    data = dataset_digest(trainer.train_data)
    val = getattr(trainer.val_data, "items", None)
    if data is not None and val is not None:
        data["validation_items"] = len(val)
    if hf:
        usage = """```python
from transformers import CLIPModel

model = CLIPModel.from_pretrained("THIS_FOLDER_OR_HUB_ID")  # LoRA merged: a standard CLIP checkpoint
```

In a diffusers pipeline, replace the text encoder: `vlmsafe safeclip generate --pipeline PIPELINE_DIR \
--text-encoder THIS_FOLDER_OR_HUB_ID ...`, or `vlmsafe.safeclip.apply_safe_text_encoder`. With vlmsafe:
`vlmsafe.safeclip.load_backend("THIS_FOLDER_OR_HUB_ID")`."""
    else:
        usage = """```python
from vlmsafe.safeclip import load_backend

backend = load_backend("THIS_FOLDER_OR_HUB_ID")  # open_clip_config.json + open_clip_model.safetensors
```"""
    mode = "LoRA (merged into the weights)" if cfg.use_lora else "full fine-tuning"
    return render_card(
        artifact="safe-clip-encoder", method="safe-clip",
        title=f"Safe-CLIP: {display_name(base) or 'a CLIP model'} fine-tuned away from NSFW concepts",
        summary=(f"A CLIP model whose {' and '.join(trainer.towers)} tower(s) were fine-tuned with the Safe-CLIP "
                 f"objective (Poppi et al., ECCV 2024) by {mode}: unsafe inputs are mapped near their safe "
                 f"counterparts while safe inputs keep the original model's embeddings."),
        base_model=base, relation="finetune", library_name="transformers" if hf else "open_clip",
        pipeline_tag="zero-shot-image-classification", tags=["safe-clip", "clip", "safety"],
        settings=settings, data=data, sections=[("Usage", usage)],
    )


def check_run_output(
    output_dir: str | os.PathLike[str], *, resume_from: Any = None, overwrite: bool = False, option: str = "output_dir"
) -> tuple[Path, bool]:
    """The output policy of a training run, checked before any work; returns ``(folder, replace)``.

    A non-empty folder is refused unless ``resume_from`` continues the run in it (the checkpoint must
    exist) or ``overwrite`` replaces it; ``replace`` says that an earlier run will be replaced (see
    :func:`run_directory`).
    """
    from vlmsafe.distributed import world_size
    from vlmsafe.io import check_output

    if resume_from is not None and overwrite:
        raise InputError("resuming (--resume) continues the run in the output folder and overwriting (--overwrite) "
                         "replaces it; pass one of them")
    out = check_output(output_dir, kind="dir", overwrite=overwrite or resume_from is not None, option=option)
    if resume_from is not None:
        resolve_checkpoint(resume_from, out)  # a missing checkpoint is reported now, not after loading the model
        return out, False
    replace = overwrite and out.exists() and (not out.is_dir() or any(out.iterdir()))
    if replace and world_size() > 1:
        raise InputError(f"{option} {out}: replacing a non-empty folder is not supported with several processes; "
                         "remove it or choose a new folder")
    return out, replace


def run_directory(out: Path, *, replace: bool) -> contextlib.AbstractContextManager[Path]:
    """Where a run writes: ``out`` itself, or (``replace``: an earlier run is to be replaced) a fresh folder
    that :func:`vlmsafe.io.atomic_path` renames onto ``out`` only when the block succeeds, so the earlier
    run stays intact if the new one fails or is interrupted. One process only (each would get its own)."""
    if not replace:
        return contextlib.nullcontext(out)

    @contextlib.contextmanager
    def fresh() -> Iterator[Path]:
        with atomic_path(out, overwrite=True) as tmp:
            tmp.mkdir()
            yield tmp

    return fresh()


def resolve_checkpoint(path: str | os.PathLike[str], output_dir: Path | None) -> Path:
    """A checkpoint folder, or the newest one in ``output_dir`` for ``"latest"``."""
    if str(path) == "latest":
        if output_dir is None:
            raise InputError("resume_from='latest' needs output_dir")
        found = sorted(Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"))
        if not found:
            raise FileFormatError(f"no {CHECKPOINT_PREFIX}* folder in {output_dir} to resume from")
        return found[-1]
    p = Path(path)
    if not (p / STATE_FILE).is_file():
        raise FileFormatError(
            f"{p} is not a Safe-CLIP checkpoint (no {STATE_FILE}); pass a {CHECKPOINT_PREFIX}* folder or 'latest'"
        )
    return p


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors as numbers/lists and tuples as lists; anything else JSON cannot hold is an error."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    raise InputError(f"cannot store {type(obj).__name__} in a JSON checkpoint")


def optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimizer's state dict split into safetensors tensors and JSON metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}.{k}"] = v.detach().to("cpu").contiguous()
            else:
                other.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": jsonable(sd["param_groups"]), "state": jsonable(other)}


def optimizer_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state`: a state dict for ``optimizer.load_state_dict``."""
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


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
