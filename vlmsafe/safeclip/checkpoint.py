"""Safe-CLIP checkpoints without pickle: safetensors for tensors, JSON for everything else.

``output_dir/checkpoint-{step:07d}/`` holds ``trainable.safetensors`` (LoRA or tower weights),
``optimizer.safetensors`` + ``optimizer.json`` (AdamW moments; hyper-parameters), one
``rng_{rank}.safetensors`` per process and ``trainer_state.json`` (step, epoch, position in the
epoch, scheduler, early-stopping state, history, config). ``output_dir/best/`` holds the best
validation weights. Every folder is written atomically; resuming never unpickles anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.io import atomic_path, read_json
from vlmsafe.safeclip.config import SafeCLIPTrainingConfig, TrainerState

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
BEST_DIR = "best"


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
