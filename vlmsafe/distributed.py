"""Several processes (``accelerate launch`` / ``torchrun``) for calibration, evaluation and training.

The same commands run unchanged in one process or many: :func:`accelerator_if_launched` returns an
``accelerate.Accelerator`` only when started with ``WORLD_SIZE > 1`` (gloo on CPU-only machines),
:func:`shard` gives each process a contiguous slice of the items (so gathering in process order
restores item order), :func:`gather` collects picklable results from every process in that order,
and :func:`all_reduce_sum` sums tensors (float64 calibration statistics) across processes. With
``accelerator=None`` each is the identity, so callers need no branches.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def world_size() -> int:
    """Number of processes of this launch (``WORLD_SIZE``; 1 when not launched)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def accelerator_if_launched() -> Any | None:
    """An ``accelerate.Accelerator`` when started with several processes, else ``None``."""
    if world_size() <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def is_distributed(accelerator: Any | None) -> bool:
    return accelerator is not None and int(accelerator.num_processes) > 1


def is_main_process(accelerator: Any | None) -> bool:
    return accelerator is None or bool(accelerator.is_main_process)


@contextlib.contextmanager
def shard(items: Sequence[T], accelerator: Any | None) -> Iterator[list[T]]:
    """This process's contiguous share of ``items`` (all of them without an accelerator)."""
    items = list(items)
    if not is_distributed(accelerator):
        yield items
        return
    with accelerator.split_between_processes(items) as part:
        yield list(part)


def gather(objects: list[T], accelerator: Any | None) -> list[T]:
    """Concatenate every process's ``objects`` in process order (identity without an accelerator)."""
    if not is_distributed(accelerator):
        return objects
    from accelerate.utils import gather_object

    return list(gather_object(objects))


def all_reduce_sum(tensor: torch.Tensor, accelerator: Any | None) -> torch.Tensor:
    """Sum ``tensor`` over processes (returned on the CPU, in its dtype)."""
    if not is_distributed(accelerator):
        return tensor
    return accelerator.reduce(tensor.to(accelerator.device), reduction="sum").cpu()


def wait_for_everyone(accelerator: Any | None) -> None:
    if is_distributed(accelerator):
        accelerator.wait_for_everyone()


def shutdown(*, barrier: bool = True) -> None:
    """Leave the process group of a multi-process launch, if one is up (no-op otherwise).

    With ``barrier`` every process first waits for the others (the success path; after an error in one
    process the others may never arrive, so pass ``False`` there). Exiting with the group still up lets
    the interpreter tear gloo's threads down while they run, which can abort a process ("terminate
    called without an active exception") after its work is done and written.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()
