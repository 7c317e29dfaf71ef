"""Several processes for Safe-CLIP training: the ``accelerate`` set-up and the embedding all-gather.

The global batch is split across processes (``split_batches=True``) and every process all-gathers
the embeddings before the loss, so N processes compute the loss of the whole global batch (InfoNCE
negatives included) and, after DDP averages the gradients, the same update as one process.
Launching is detected with :func:`vlmsafe.distributed.world_size` (``torchrun`` / ``accelerate launch``).
"""

from __future__ import annotations

from typing import Any

import torch

from vlmsafe.distributed import world_size
from vlmsafe.safeclip.losses import SafeCLIPEmbeddings

#: Embedding fields that may be absent (a tower that is not trained, a batch share without images, the token
#: term off). ``text_safe_token_drift`` is one number per row; the others are ``[n, D]``.
OPTIONAL_FIELDS = ("text_safe", "text_nsfw", "image_safe", "image_nsfw", "ref_image_safe", "text_safe_token_drift")


def build_accelerator(*, gradient_accumulation_steps: int, mixed_precision: str, cpu: bool) -> Any:
    """The trainer's ``accelerate.Accelerator`` (also in one process: autocast and accumulation).

    ``accelerate`` only picks its multi-CPU (gloo) mode when told to use the CPU, so a distributed
    launch on a machine without CUDA runs on the CPU.
    """
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs

    launched = world_size() > 1
    use_cpu = cpu or (launched and not torch.cuda.is_available())
    if not launched:
        release_accelerator_state(mixed_precision, use_cpu)
    return Accelerator(
        cpu=use_cpu,
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


def release_accelerator_state(mixed_precision: str, cpu: bool) -> None:
    """Let a single process build trainers with different precision/device settings.

    ``accelerate`` keeps one process-wide state and refuses an ``Accelerator`` whose
    ``mixed_precision`` or ``cpu`` differs from the first one. In a single, non-distributed
    process nothing depends on that state between trainers, so it is reset when it would clash.
    """
    from accelerate.state import AcceleratorState, GradientState

    shared = AcceleratorState._shared_state
    if not shared:
        return
    on_cpu = getattr(shared.get("device"), "type", "cpu") == "cpu"
    clash = shared.get("_mixed_precision") != mixed_precision or (cpu and not on_cpu)
    if clash and int(shared.get("num_processes", 1)) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def gather_embeddings(emb: SafeCLIPEmbeddings, accelerator: Any, n: int) -> SafeCLIPEmbeddings:
    """All-gather a batch's embeddings; this process's rows keep their autograd graph.

    Each process then computes the loss of the whole global batch, but its gradient flows only
    through its own rows; the trainer scales the loss by the number of processes so DDP's gradient
    *average* equals the single-process gradient of the global batch. ``n``: this process's rows.
    """
    acc = accelerator
    rank, size = acc.process_index, acc.num_processes
    dim = emb.ref_text_safe.shape[-1]

    def gather(x: torch.Tensor) -> torch.Tensor:
        parts = list(acc.gather(x.detach().contiguous()).chunk(size))
        parts[rank] = x  # keep this process's rows differentiable
        return torch.cat(parts)

    # A field may be missing on one process only (e.g. no images in its share of the batch):
    # every process must join every all-gather, so the missing side sends zero rows.
    flags = torch.tensor([[getattr(emb, f) is not None for f in OPTIONAL_FIELDS]], device=acc.device)
    present = acc.gather(flags).any(dim=0).tolist()
    fields: dict[str, torch.Tensor | None] = {}
    for name, any_process in zip(OPTIONAL_FIELDS, present):
        x = getattr(emb, name)
        if x is None and any_process:
            x = emb.ref_text_safe.new_zeros((n,) if name == "text_safe_token_drift" else (n, dim))
        fields[name] = gather(x) if any_process else None
    fields["ref_text_safe"] = gather(emb.ref_text_safe)
    fields["has_safe_image"] = acc.gather(emb.has_safe_image)
    fields["has_unsafe_image"] = acc.gather(emb.has_unsafe_image)
    return SafeCLIPEmbeddings(**fields)  # type: ignore[arg-type]
