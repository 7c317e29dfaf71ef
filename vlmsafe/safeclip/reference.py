"""The frozen reference ``T0`` / ``I0`` of Safe-CLIP and the cache of its outputs.

The reference code applied ``get_peft_model`` to the "frozen" copy too, so ``T0``/``I0`` moved with
training (defect (a) in the method notes). Here the reference is either a deep copy taken *before*
LoRA is injected, with ``requires_grad=False``, in eval mode and outside the optimizer
(``reference="copy"``), or the LoRA model's own base weights run under ``peft``'s
``disable_adapter()`` (``reference="disable_adapter"``, saves the memory of a second model).

The reference never changes and training items are not augmented, so an item's reference outputs
``T0(S)`` and ``I0(V)`` are the same every epoch. Where the data allows it (``cache_reference=True``,
the default: items are fixed, as every :class:`~vlmsafe.safeclip.data.QuadrupletDataset` is; turn it
off for a dataset that augments on the fly), :meth:`FrozenReference.fill_cache` computes them for all
training items once, before the first epoch, in large no-grad batches (split across processes), and
every training step, from the first one on, reads them from :class:`ReferenceCache`: a step runs the
trainable towers only. The reference always runs in eval mode (no dropout), so it is deterministic.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from vlmsafe.distributed import gather, shard
from vlmsafe.safeclip.backends import CLIPBackend
from vlmsafe.safeclip.batches import scatter_rows
from vlmsafe.safeclip.data import QuadrupletCollator, QuadrupletDataset

RefOutputs = dict[str, torch.Tensor | None]  # "ref_text_safe" [B, D], "ref_image_safe" [B, D] or None


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen."""
    return copy.deepcopy(model).eval().requires_grad_(False)


class ReferenceCache:
    """``T0(S)`` and ``I0(V)`` of every training item (CPU tensors), filled as items are first seen.

    ``text`` / ``image`` are ``[N, D]`` (``image`` rows of items without a safe image stay zero);
    ``filled`` says which items are stored.
    """

    def __init__(self, n_items: int):
        self.filled = torch.zeros(n_items, dtype=torch.bool)
        self.text: torch.Tensor | None = None
        self.image: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.filled.sum())

    def lookup(self, batch: dict[str, Any], device: torch.device) -> RefOutputs | None:
        """The batch's reference outputs if every row is stored, else ``None``."""
        idx = batch["index"].cpu()
        if self.text is None or not bool(self.filled[idx].all()):
            return None
        has_v = batch["safe_image_index"].numel() > 0
        image = self.image[idx].to(device) if (has_v and self.image is not None) else None
        return {"ref_text_safe": self.text[idx].to(device), "ref_image_safe": image}

    def store(self, index: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None) -> None:
        """Keep rows ``text`` / ``image`` (``[len(index), D]``; image rows without a safe image are zero)."""
        idx = index.cpu()
        if self.text is None:
            self.text = torch.zeros(len(self.filled), text.shape[-1], dtype=text.dtype)
        self.text[idx] = text.detach().cpu()
        if image is not None:
            if self.image is None:
                self.image = torch.zeros(len(self.filled), image.shape[-1], dtype=image.dtype)
            self.image[idx] = image.detach().cpu()
        self.filled[idx] = True


class FrozenReference:
    """Computes ``T0(S)`` and ``I0(V)`` of training batches, through the cache when it has them.

    ``model`` is the frozen copy; without one, ``peft_model.disable_adapter()`` turns the LoRA model
    (``inner``, its wrapped module) back into the original. ``autocast`` is the trainer's mixed
    precision context.
    """

    def __init__(
        self,
        backend: CLIPBackend,
        model: nn.Module | None,
        *,
        peft_model: Any = None,
        inner: nn.Module | None = None,
        autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
        cache_items: int | None = None,
    ):
        if model is None and (peft_model is None or inner is None):
            raise ValueError("a reference needs a frozen copy or a peft model to disable the adapter of")
        self.backend = backend
        self.model = model
        self.peft_model = peft_model
        self.inner = inner
        self.autocast = autocast
        self.cache = ReferenceCache(cache_items) if cache_items else None

    @contextlib.contextmanager
    def active(self) -> Iterator[nn.Module]:
        """The module that computes the reference, in eval mode (the copy, or the LoRA model with its adapter off)."""
        if self.model is not None:
            yield self.model
            return
        was_training = self.inner.training
        self.inner.eval()
        try:
            with self.peft_model.disable_adapter():
                yield self.inner
        finally:
            self.inner.train(was_training)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], device: torch.device) -> RefOutputs:
        """The batch's reference outputs (from the cache when every row is in it)."""
        use_cache = self.cache is not None and "index" in batch
        if use_cache:
            cached = self.cache.lookup(batch, device)
            if cached is not None:
                return cached
        out = self._compute(batch)
        if use_cache:
            self.cache.store(batch["index"], out["ref_text_safe"], out["ref_image_safe"])
        return out

    def _compute(self, batch: dict[str, Any]) -> RefOutputs:
        n = int(batch["size"])
        out: RefOutputs = {"ref_text_safe": None, "ref_image_safe": None}
        with self.active() as model, self.autocast():
            out["ref_text_safe"] = self.backend.encode_text(model, batch["safe_text"])
            if batch.get("safe_image_pixels") is not None:
                emb = self.backend.encode_image(model, batch["safe_image_pixels"])
                out["ref_image_safe"] = scatter_rows(emb, batch["safe_image_index"], n)
        return out

    @torch.no_grad()
    def fill_cache(
        self,
        data: QuadrupletDataset,
        collator: QuadrupletCollator,
        *,
        batch_size: int,
        device: torch.device,
        accelerator: Any = None,
        progress: bool = False,
    ) -> int:
        """Compute the reference outputs of every training item not cached yet; returns how many were computed.

        The items are shared out between processes (:func:`vlmsafe.distributed.shard`) and the results
        gathered, so every process ends with the whole cache.
        """
        from accelerate.utils import send_to_device
        from tqdm.auto import tqdm

        if self.cache is None:
            return 0
        todo = (~self.cache.filled).nonzero().flatten().tolist()
        parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        with shard(todo, accelerator) as mine:
            starts = range(0, len(mine), batch_size)
            for start in tqdm(starts, desc="frozen reference", disable=not progress, leave=False):
                index = torch.tensor(mine[start : start + batch_size], dtype=torch.long)
                batch = collator([data[i] for i in index.tolist()])
                out = self._compute(send_to_device(batch, device))
                image = out["ref_image_safe"]
                parts.append((index, out["ref_text_safe"].cpu(), None if image is None else image.cpu()))
        for index, text, image in gather(parts, accelerator):
            self.cache.store(index, text, image)
        return len(todo)

