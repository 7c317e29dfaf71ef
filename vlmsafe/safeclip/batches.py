"""Training batches: collation, a reproducible per-epoch order, item ids for the reference cache, the trainable
forward.

:class:`QuadrupletCollator` turns quadruplets into a batch (tokens, pixels, which rows have which image).
Each epoch's order is one seeded permutation (:func:`epoch_order`), so a resumed run sees the same
batches as an uninterrupted one; batches carry the dataset index of every row (``batch["index"]``)
so the frozen reference's outputs can be cached per item (:mod:`vlmsafe.safeclip.reference`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from vlmsafe.safeclip.backends import CLIPBackend
from vlmsafe.safeclip.data import Quadruplet, QuadrupletDataset
from vlmsafe.safeclip.images import pixel_batch
from vlmsafe.safeclip.pooled import pooled_image, pooled_text


def _trimmed_rows(tokens: dict[str, torch.Tensor], start: int, stop: int) -> dict[str, torch.Tensor]:
    """Rows ``start:stop`` of a tokenizer output, without the padding columns none of them needs."""
    rows = {k: v[start:stop] for k, v in tokens.items()}
    mask = rows.get("attention_mask")
    if mask is not None and mask.ndim == 2 and mask.shape[0]:
        width = int(mask.sum(dim=1).max())
        if bool((mask[:, width:] == 0).all()):  # right padding only: the columns after `width` are pure padding
            rows = {k: v[:, :width] if v.ndim == 2 else v for k, v in rows.items()}
    return rows


class QuadrupletCollator:
    """Turn a list of :class:`Quadruplet` into a batch dict for the trainer.

    The safe and unsafe captions are tokenized in one call; ``safe_text`` / ``unsafe_text`` are the
    two halves, each with only the padding it needs. Image tensors hold only the items that have
    that image; ``safe_image_index`` / ``unsafe_image_index`` say which rows they belong to, so
    embeddings can be scattered back. With ``padded_safe_text`` the batch also holds
    ``safe_text_padded``, the safe captions padded to the full context length without a mask
    (:meth:`~vlmsafe.safeclip.backends.CLIPBackend.tokenize_padded`: what a diffusion pipeline feeds
    the text encoder), for the ``text_safe_tokens`` loss term.
    """

    def __init__(self, backend: Any, use_images: bool = True, *, padded_safe_text: bool = False):
        self.backend = backend
        self.use_images = use_images
        self.padded_safe_text = padded_safe_text

    def __call__(self, items: Sequence[Quadruplet], *, safe_only: bool = False) -> dict[str, Any]:
        """The batch of ``items``; ``safe_only``: only its safe half (``safe_text``, ``safe_text_padded``, the safe
        images), all the frozen reference reads: the unsafe captions are not tokenized nor the images loaded."""
        n = len(items)
        texts = [q.safe for q in items] + ([] if safe_only else [q.unsafe for q in items])
        tokens = self.backend.tokenize(texts)
        batch: dict[str, Any] = {"size": torch.tensor(n), "safe_text": _trimmed_rows(tokens, 0, n)}
        if not safe_only:
            batch["unsafe_text"] = _trimmed_rows(tokens, n, 2 * n)
        if self.padded_safe_text:
            batch["safe_text_padded"] = self.backend.tokenize_padded([q.safe for q in items])
        for key in ("safe_image",) if safe_only else ("safe_image", "unsafe_image"):
            idx = [i for i, q in enumerate(items) if getattr(q, key) is not None] if self.use_images else []
            batch[f"{key}_index"] = torch.tensor(idx, dtype=torch.long)
            batch[f"{key}_pixels"] = pixel_batch(self.backend, [getattr(items[i], key) for i in idx]) if idx else None
        return batch


class FixedOrder(Sampler[int]):
    """Yields a fixed index order (one seeded permutation per epoch: reproducible and resumable)."""

    def __init__(self, order: Sequence[int]):
        self.order = list(order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class Indexed(Dataset):
    """Yields ``(index, item)`` so batches know which training items they hold (reference cache)."""

    def __init__(self, data: QuadrupletDataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[int, Any]:
        return i, self.data[i]


class IndexedCollator:
    """A :class:`QuadrupletCollator` batch plus ``index``, the dataset position of every row."""

    def __init__(self, collator: QuadrupletCollator):
        self.collator = collator

    def __call__(self, pairs: Sequence[tuple[int, Any]]) -> dict[str, Any]:
        batch = self.collator([item for _, item in pairs])
        batch["index"] = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        return batch


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The item order of ``epoch``: a permutation that depends only on ``seed`` and ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch))).tolist()


def epoch_loader(
    data: QuadrupletDataset, collator: QuadrupletCollator, *, batch_size: int, seed: int, epoch: int, num_workers: int
) -> DataLoader:
    """The (un-prepared) data loader of one epoch; incomplete final batches are dropped."""
    # An explicit generator keeps the DataLoader from drawing its worker seed from the global
    # RNG, which would make a resumed run's dropout masks differ from an uninterrupted run's.
    return DataLoader(
        Indexed(data),
        batch_size=batch_size,
        sampler=FixedOrder(epoch_order(len(data), seed, epoch)),
        drop_last=True,
        collate_fn=IndexedCollator(collator),
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)),
    )


def scatter_rows(x: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """Rows ``x`` placed at ``index`` of an ``[n, D]`` zero tensor (differentiable)."""
    return x.new_zeros((n, x.shape[-1])).index_copy(0, index.to(x.device), x)


def row_mask(index: torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """``[n]`` bool mask that is True at ``index``."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    mask[index.to(device)] = True
    return mask


#: The trainable embeddings of a batch (fields of :class:`~vlmsafe.safeclip.losses.SafeCLIPEmbeddings`).
EMBEDDINGS = ("text_safe", "text_nsfw", "image_safe", "image_nsfw")


class TrainableTowers(nn.Module):
    """The trainable forward pass in one module, so DDP sees every trainable parameter used.

    Safe and unsafe inputs go through a tower in two passes of B rows, not one of 2B: on the CPU a
    2B-row pass took longer than two B-row passes (measured with ``benchmarks/safeclip_step.py`` when
    the passes were split). With ``token_layer`` (the ``text_safe_tokens`` term is on) the safe captions'
    pass runs on ``batch["safe_text_padded"]`` and also returns their token states at that layer. Every
    other pass reads its pooled embedding only, so the last block of its tower runs (and backpropagates)
    the pooled token alone (:mod:`vlmsafe.safeclip.pooled`).
    """

    def __init__(
        self, backend: CLIPBackend, model: nn.Module, towers: Sequence[str], token_layer: str | None = None
    ):
        super().__init__()
        self.model = model
        self._backend = backend
        self.towers = tuple(towers)
        self.token_layer = token_layer

    def forward(self, batch: dict[str, Any], parts: Sequence[str] | None = None) -> dict[str, torch.Tensor | None]:
        """``text_safe`` T(S), ``text_nsfw`` T(U), ``image_safe`` I(V), ``image_nsfw`` I(G) (``[B, D]``; ``None``
        for a tower that is not trained or images the batch lacks), and ``text_safe_tokens`` (T(S)'s token
        states ``[B, L, W]``, with ``token_layer`` only); ``parts`` limits which are computed."""
        out: dict[str, torch.Tensor | None] = dict.fromkeys(EMBEDDINGS)
        for part in self.parts(batch) if parts is None else parts:
            if part == "text_safe" and self.token_layer is not None:
                out[part], out["text_safe_tokens"] = self._backend.encode_text_states(
                    self.model, batch["safe_text_padded"], self.token_layer
                )
            else:
                out[part] = self._encode(batch, part)
        return out

    def parts(self, batch: dict[str, Any]) -> list[str]:
        """The embeddings this batch has for the trained towers, in a fixed order."""
        out = ["text_safe", "text_nsfw"] if "text" in self.towers else []
        if "vision" in self.towers:
            out += [name for key, name in (("safe_image", "image_safe"), ("unsafe_image", "image_nsfw"))
                    if batch.get(f"{key}_pixels") is not None]
        return out

    def _encode(self, batch: dict[str, Any], part: str) -> torch.Tensor:
        # Only the pooled embedding is read: the last block runs on the pooled token (and backpropagates it)
        if part in ("text_safe", "text_nsfw"):
            return pooled_text(self._backend, self.model, batch["safe_text" if part == "text_safe" else "unsafe_text"])
        key = "safe_image" if part == "image_safe" else "unsafe_image"
        emb = pooled_image(self._backend, self.model, batch[f"{key}_pixels"])
        return scatter_rows(emb, batch[f"{key}_index"], int(batch["size"]))
