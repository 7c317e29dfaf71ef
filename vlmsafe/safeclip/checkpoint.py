"""Safe-CLIP checkpoints without pickle: safetensors for tensors, JSON for everything else.

``output_dir/checkpoint-{step:07d}/`` holds ``trainable.safetensors`` (LoRA or tower weights),
``optimizer.safetensors`` + ``optimizer.json`` (AdamW moments; hyper-parameters), one
``rng_{rank}.safetensors`` per process and ``trainer_state.json`` (step, epoch, position in the
epoch, scheduler, early-stopping state, history, config). ``output_dir/best/`` holds the best
validation weights. Every folder is written atomically; resuming never unpickles anything.
:class:`Checkpointer` writes and reads them.

The output policy of a run (:func:`check_run_output`, :func:`run_directory`) is checked before any work.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.io import atomic_path
from vlmsafe.reading import read_json
from vlmsafe.safeclip.state import TrainState
from vlmsafe.safeclip.weights import TrainableWeights

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
BEST_DIR = "best"


class Checkpointer:
    """Writes and reads the checkpoints of a run in ``output_dir`` (``None``: a run that saves nothing).

    It saves and restores, as one checkpoint, what it is given: the trainable ``weights``
    (:class:`~vlmsafe.safeclip.weights.TrainableWeights`), the ``optimizer`` and ``scheduler``, this process's
    RNG, and the :class:`~vlmsafe.safeclip.state.TrainState` passed to :meth:`save` (returned by :meth:`load`).
    ``run_info`` (config, towers, trainable names, backend, number of processes) is written beside the state;
    its ``towers`` must match a checkpoint's to resume it. ``keep``: checkpoints kept (older ones are pruned).
    """

    def __init__(
        self,
        output_dir: Path | None,
        accelerator: Any,
        *,
        weights: TrainableWeights,
        optimizer: Any,
        scheduler: Any,
        run_info: dict[str, Any],
        keep: int,
    ):
        self.output_dir = output_dir
        self.accelerator = accelerator
        self.weights, self.optimizer, self.scheduler = weights, optimizer, scheduler
        self.run_info = run_info
        self.keep = keep

    def earlier_checkpoints(self) -> list[Path]:
        """The checkpoint folders already in ``output_dir``, oldest first."""
        return [] if self.output_dir is None else sorted(self.output_dir.glob(f"{CHECKPOINT_PREFIX}*"))

    def save(self, state: TrainState) -> Path:
        """Write ``output_dir/checkpoint-{step}`` and prune old ones (keeps ``keep``)."""
        from safetensors.torch import save_file

        if self.output_dir is None:
            raise InputError("SafeCLIPTrainer: no output_dir, so checkpoints cannot be saved; pass output_dir=")
        acc, out = self.accelerator, self.output_dir
        dest = out / f"{CHECKPOINT_PREFIX}{state.global_step:07d}"
        # Each process stores its RNG state next to the checkpoint (written before the main one renames).
        rng_dir = out / ".rng"
        rng_dir.mkdir(parents=True, exist_ok=True)
        save_file(rng_state(), str(rng_dir / f"{state.global_step:07d}_rng_{acc.process_index}.safetensors"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            opt_tensors, opt_meta = optimizer_state(self.optimizer)
            with atomic_path(dest, overwrite=True) as tmp:
                tmp.mkdir()
                save_file(self.weights.state_dict(), str(tmp / "trainable.safetensors"))
                save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
                (tmp / "optimizer.json").write_text(json.dumps(opt_meta) + "\n")
                for rank in range(acc.num_processes):
                    src = rng_dir / f"{state.global_step:07d}_rng_{rank}.safetensors"
                    shutil.move(str(src), str(tmp / f"rng_{rank}.safetensors"))
                with contextlib.suppress(OSError):
                    rng_dir.rmdir()  # only when empty
                scheduler = jsonable(self.scheduler.state_dict())
                saved = {"trainer_state": jsonable(state.to_dict()), "scheduler": scheduler, **self.run_info}
                (tmp / STATE_FILE).write_text(json.dumps(saved, indent=2) + "\n")
            ckpts = self.earlier_checkpoints()
            for old in ckpts[: max(0, len(ckpts) - max(1, self.keep))]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return dest

    def save_best(self, state: TrainState, metrics: dict[str, float]) -> None:
        """``output_dir/best``: ``state.best_weights`` and their ``metrics`` (main process; nothing without a
        folder)."""
        from safetensors.torch import save_file

        if self.output_dir is None or not self.accelerator.is_main_process:
            return
        assert state.best_weights is not None
        with atomic_path(self.output_dir / BEST_DIR, overwrite=True) as tmp:
            tmp.mkdir()
            save_file(state.best_weights, str(tmp / "trainable.safetensors"))
            (tmp / "metrics.json").write_text(json.dumps({"step": state.global_step, **metrics}, indent=2) + "\n")

    def load(self, path: str | os.PathLike[str]) -> TrainState:
        """Restore weights, optimizer, scheduler and RNG from a checkpoint (or ``"latest"``); returns its state."""
        from safetensors.torch import load_file

        path = resolve_checkpoint(path, self.output_dir)
        fix = "the checkpoint is incomplete or corrupted; resume from another checkpoint"
        saved = read_json(path / STATE_FILE, what="checkpoint state file", fix=fix)
        opt_meta = read_json(path / "optimizer.json", what="optimizer state file", fix=fix)
        try:
            trainable = load_file(str(path / "trainable.safetensors"))
            opt_tensors = load_file(str(path / "optimizer.safetensors"))
        except Exception as exc:  # OSError and safetensors' own error type
            raise FileFormatError(f"checkpoint {path} is incomplete or corrupted ({exc}); resume from another "
                                  "checkpoint") from exc
        towers = list(self.run_info["towers"])
        if list(saved.get("towers", [])) != towers:
            raise FileFormatError(f"checkpoint {path} trained towers {saved.get('towers')} but this trainer trains "
                                  f"{towers}")
        self.weights.load_state_dict(trainable)
        self.optimizer.load_state_dict(optimizer_from_state(opt_tensors, opt_meta))
        self.scheduler.load_state_dict(saved["scheduler"])
        state = TrainState.from_dict(saved["trainer_state"])
        rng_file = path / f"rng_{self.accelerator.process_index}.safetensors"
        if rng_file.is_file():
            set_rng_state(load_file(str(rng_file)))
        best = path.parent / BEST_DIR / "trainable.safetensors"
        if state.best_step is not None and best.is_file():
            state.best_weights = load_file(str(best))
        return state


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
        raise InputError("resuming (`resume_from`) continues the run in the output folder and overwriting "
                         "(`overwrite`) replaces it; pass one of them")
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
