"""Turn the many shapes users hold their data in into (prompt, image) pairs."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from vlmsafe.errors import FileFormatError, InputError

Pair = tuple[str, "Image.Image | None"]


def as_pair(item: Any) -> Pair:
    """Accept ``(prompt, image)``, ``{"prompt", "image"}`` dicts or objects with ``prompt`` and
    ``load_image()`` / ``image`` (e.g. :class:`vlmsafe.eval.EvalItem`). Paths are opened with PIL."""
    if isinstance(item, (tuple, list)) and len(item) == 2:
        prompt, image = item
    elif isinstance(item, dict):
        if "prompt" not in item:
            raise InputError(f"item {item!r} has no 'prompt' key")
        prompt, image = item["prompt"], item.get("image")
    elif hasattr(item, "prompt"):
        prompt = item.prompt
        image = item.load_image() if hasattr(item, "load_image") else getattr(item, "image", None)
    else:
        raise InputError(f"cannot read a (prompt, image) pair from {type(item).__name__}; pass (prompt, image) tuples or dicts")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FileFormatError(f"image file {path} not found (referenced by item with prompt {str(prompt)[:40]!r})")
        with Image.open(path) as im:
            image = im.convert("RGB")
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    return prompt, image


def batched(items: Iterable[Any], batch_size: int) -> Iterator[list[Pair]]:
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
        return hashlib.sha256("".join(item_digests if item_digests is not None else self.item_digests).encode()).hexdigest()
