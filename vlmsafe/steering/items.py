"""Batching and hashing of calibration items (the item shapes themselves live in :mod:`vlmsafe.data`)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

from PIL import Image

from vlmsafe.data import Pair, as_pair
from vlmsafe.errors import InputError


def batched(items: Iterable[Any], batch_size: int) -> Iterator[list[Pair]]:
    """Yield lists of ``(prompt, image)`` pairs (see :func:`vlmsafe.data.as_pair`) of ``batch_size``."""
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    batch: list[Pair] = []
    for item in items:
        batch.append(as_pair(item))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


class DatasetHasher:
    """Order-sensitive sha256 identifying a calibration set: the hash of per-item digests.

    Hashing item digests (prompt + image pixels) rather than one byte stream lets processes that
    each saw a shard gather their item digests and reproduce the single-process hash exactly.
    """

    def __init__(self) -> None:
        self.item_digests: list[str] = []

    @staticmethod
    def item_digest(prompt: str, image: Image.Image | None) -> str:
        digest = hashlib.sha256(prompt.encode("utf-8") + b"\0")
        if image is not None:
            digest.update(f"{image.size}{image.mode}".encode())
            digest.update(image.tobytes())
        return digest.hexdigest()

    def update(self, prompt: str, image: Image.Image | None) -> None:
        self.item_digests.append(self.item_digest(prompt, image))

    def hexdigest(self, item_digests: list[str] | None = None) -> str:
        digests = item_digests if item_digests is not None else self.item_digests
        return hashlib.sha256("".join(digests).encode()).hexdigest()
