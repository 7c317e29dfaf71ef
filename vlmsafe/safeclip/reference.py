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
trainable towers only. The reference always runs in eval mode (no dropout), so it is deterministic. As only
its pooled embeddings are read, its last transformer block runs on the pooled token alone
(:mod:`~vlmsafe.safeclip.pooled`; equal to the full forward up to float rounding).

With the ``text_safe_tokens`` loss term on (``token_layer`` given), the reference's text pass runs on the
safe captions padded to the full context length and also yields their token states, ``[L, W]`` per item.
Those are cached too when all items' states fit in :data:`TOKEN_CACHE_MAX_BYTES` (the bundled testbed:
6 MB); otherwise (ViSU with a ViT-L/14 text tower: 165k x 77 x 768 floats, 39 GB) they are not kept, and
each step recomputes the reference's text pass for its batch (one no-grad forward; the cached image
embeddings are still used).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import Any

import torch
from torch import nn

from vlmsafe.distributed import gather, shard
from vlmsafe.errors import InternalError
from vlmsafe.safeclip.backends import CLIPBackend
from vlmsafe.safeclip.batches import QuadrupletCollator, scatter_rows
from vlmsafe.safeclip.data import QuadrupletDataset
from vlmsafe.safeclip.pooled import pooled_image, pooled_text

#: "ref_text_safe" [B, D], "ref_image_safe" [B, D] or None, "ref_text_safe_tokens" [B, L, W] or None
RefOutputs = dict[str, torch.Tensor | None]

#: The most memory the reference's token states of all training items may take in the cache (1 GiB).
TOKEN_CACHE_MAX_BYTES = 1 << 30


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter frozen."""
    return copy.deepcopy(model).eval().requires_grad_(False)


class ReferenceCache:
    """``T0(S)`` and ``I0(V)`` of every training item (CPU tensors), filled as items are first seen.

    ``text`` / ``image`` are ``[N, D]`` (``image`` rows of items without a safe image stay zero);
    ``filled`` says which items are stored. ``tokens`` (``[N, L, W]``) holds the token states when they
    are computed and fit in ``max_token_bytes`` (default :data:`TOKEN_CACHE_MAX_BYTES`); see
    :meth:`keeps_tokens`.
    """

    def __init__(self, n_items: int, max_token_bytes: int | None = None):
        self.filled = torch.zeros(n_items, dtype=torch.bool)
        self.text: torch.Tensor | None = None
        self.image: torch.Tensor | None = None
        self.tokens: torch.Tensor | None = None
        self.max_token_bytes = TOKEN_CACHE_MAX_BYTES if max_token_bytes is None else max_token_bytes
        self._keep_tokens: bool | None = None  # decided on the first token states seen

    def keeps_tokens(self, states: torch.Tensor) -> bool:
        """Whether token states like ``states`` (``[B, L, W]``) are kept: all items' must fit the budget."""
        if self._keep_tokens is None:
            need = len(self.filled) * states[0].numel() * states.element_size()
            self._keep_tokens = need <= self.max_token_bytes
        return self._keep_tokens

    def __len__(self) -> int:
        return int(self.filled.sum())

    def lookup(self, batch: dict[str, Any], device: torch.device) -> RefOutputs | None:
        """The batch's reference outputs if every row is stored, else ``None``."""
        idx = batch["index"].cpu()
        if self.text is None or not bool(self.filled[idx].all()):
            return None
        has_v = batch["safe_image_index"].numel() > 0
        image = self.image[idx].to(device) if (has_v and self.image is not None) else None
        tokens = self.tokens[idx].to(device) if self.tokens is not None else None
        return {"ref_text_safe": self.text[idx].to(device), "ref_image_safe": image, "ref_text_safe_tokens": tokens}

    def store(
        self, index: torch.Tensor, text: torch.Tensor, image: torch.Tensor | None, tokens: torch.Tensor | None = None
    ) -> None:
        """Keep rows ``text`` / ``image`` (``[len(index), D]``; image rows without a safe image are zero) and
        ``tokens`` (``[len(index), L, W]``, only if :meth:`keeps_tokens`)."""
        idx = index.cpu()
        if self.text is None:
            self.text = torch.zeros(len(self.filled), text.shape[-1], dtype=text.dtype)
        self.text[idx] = text.detach().cpu()
        if image is not None:
            if self.image is None:
                self.image = torch.zeros(len(self.filled), image.shape[-1], dtype=image.dtype)
            self.image[idx] = image.detach().cpu()
        if tokens is not None and self.keeps_tokens(tokens):
            if self.tokens is None:
                self.tokens = torch.zeros(len(self.filled), *tokens.shape[1:], dtype=tokens.dtype)
            self.tokens[idx] = tokens.detach().cpu()
        self.filled[idx] = True


@dataclass(eq=False, repr=False)
class FrozenReference:
    """Computes ``T0(S)`` and ``I0(V)`` of training batches, through the cache when it has them.

    ``model`` is the frozen copy; without one, ``peft_model.disable_adapter()`` turns the LoRA model
    (``inner``, its wrapped module) back into the original. ``autocast`` is the trainer's mixed
    precision context. ``token_layer`` (``"last"`` / ``"penultimate"``; ``None``: the token term is off)
    makes the text pass run on ``batch["safe_text_padded"]`` and return the token states at that layer.
    ``cache_items``: how many training items the output cache holds (``None``: no cache).
    """

    backend: CLIPBackend
    model: nn.Module | None
    _: KW_ONLY
    peft_model: Any = None
    inner: nn.Module | None = None
    autocast: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    cache_items: InitVar[int | None] = None
    token_layer: str | None = None
    cache: ReferenceCache | None = field(init=False, default=None)

    def __post_init__(self, cache_items: int | None) -> None:
        if self.model is None and (self.peft_model is None or self.inner is None):
            raise InternalError("a reference needs a frozen copy or a peft model to disable the adapter of")
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
                if self.token_layer is not None and cached["ref_text_safe_tokens"] is None:
                    cached.update(self._compute(batch, images=False))  # token states too large to cache
                return cached
        out = self._compute(batch)
        if use_cache:
            self.cache.store(batch["index"], out["ref_text_safe"], out["ref_image_safe"], out["ref_text_safe_tokens"])
        return out

    def _compute(self, batch: dict[str, Any], *, images: bool = True) -> RefOutputs:
        n = int(batch["size"])
        out: RefOutputs = {"ref_text_safe": None, "ref_text_safe_tokens": None}
        with self.active() as model, self.autocast():
            if self.token_layer is None:  # only the pooled embedding is read: the last block runs on that token
                out["ref_text_safe"] = pooled_text(self.backend, model, batch["safe_text"])
            else:
                out["ref_text_safe"], out["ref_text_safe_tokens"] = self.backend.encode_text_states(
                    model, batch["safe_text_padded"], self.token_layer
                )
            if images:
                out["ref_image_safe"] = None
                if batch.get("safe_image_pixels") is not None:
                    emb = pooled_image(self.backend, model, batch["safe_image_pixels"])
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
        parts: list[tuple[torch.Tensor, ...]] = []
        with shard(todo, accelerator) as mine:
            starts = range(0, len(mine), batch_size)
            for start in tqdm(starts, desc="frozen reference", disable=not progress, leave=False):
                index = torch.tensor(mine[start : start + batch_size], dtype=torch.long)
                batch = collator([data[i] for i in index.tolist()], safe_only=True)
                out = self._compute(send_to_device(batch, device))
                image, tokens = out["ref_image_safe"], out["ref_text_safe_tokens"]
                if tokens is not None and not self.cache.keeps_tokens(tokens):
                    tokens = None  # too large for the cache: steps compute them (do not hold them all here)
                rest = (None if x is None else x.cpu() for x in (image, tokens))
                parts.append((index, out["ref_text_safe"].cpu(), *rest))
        for index, text, image, tokens in gather(parts, accelerator):
            self.cache.store(index, text, image, tokens)
        return len(todo)

