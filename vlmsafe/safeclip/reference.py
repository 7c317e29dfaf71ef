"""The frozen reference ``T0`` / ``I0`` of Safe-CLIP and the cache of its outputs.

The reference code applied ``get_peft_model`` to the "frozen" copy too, so ``T0``/``I0`` moved with
training (defect (a) in the method notes). Here the reference is either a deep copy taken *before*
LoRA is injected, with ``requires_grad=False``, in eval mode and outside the optimizer
(``reference="copy"``), or the LoRA model's own base weights run under ``peft``'s
``disable_adapter()`` (``reference="disable_adapter"``, saves the memory of a second model).

The reference never changes and training items are not augmented, so an item's reference outputs
``T0(S)`` and ``I0(V)`` are the same every epoch: :class:`ReferenceCache` keeps them per item after
their first use, saving two of the six encoder passes of a Safe-CLIP step.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from vlmsafe.safeclip.backends import CLIPBackend
from vlmsafe.safeclip.batches import scatter_rows

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

    def store(self, batch: dict[str, Any], out: RefOutputs) -> None:
        idx = batch["index"].cpu()
        text = out["ref_text_safe"]
        assert text is not None
        if self.text is None:
            self.text = torch.zeros(len(self.filled), text.shape[-1], dtype=text.dtype)
        self.text[idx] = text.detach().cpu()
        img = out["ref_image_safe"]
        if img is not None:
            if self.image is None:
                self.image = torch.zeros(len(self.filled), img.shape[-1], dtype=img.dtype)
            self.image[idx] = img.detach().cpu()
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
        """The module that computes the reference (the copy, or the LoRA model with its adapter off)."""
        if self.model is not None:
            yield self.model
        else:
            with self.peft_model.disable_adapter():
                yield self.inner

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any], device: torch.device) -> RefOutputs:
        """The batch's reference outputs (from the cache when every row is in it)."""
        use_cache = self.cache is not None and "index" in batch
        if use_cache:
            cached = self.cache.lookup(batch, device)
            if cached is not None:
                return cached
        n = int(batch["size"])
        out: RefOutputs = {"ref_text_safe": None, "ref_image_safe": None}
        with self.active() as model, self.autocast():
            out["ref_text_safe"] = self.backend.encode_text(model, batch["safe_text"])
            if batch.get("safe_image_pixels") is not None:
                emb = self.backend.encode_image(model, batch["safe_image_pixels"])
                out["ref_image_safe"] = scatter_rows(emb, batch["safe_image_index"], n)
        if use_cache:
            self.cache.store(batch, out)
        return out

