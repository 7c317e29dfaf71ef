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
    """Order-sensitive sha256 over prompts and image pixels: identifies a calibration set."""

    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def update(self, prompt: str, image: Image.Image | None) -> None:
        self._digest.update(prompt.encode("utf-8") + b"\0")
        if image is not None:
            self._digest.update(f"{image.size}{image.mode}".encode())
            self._digest.update(image.tobytes())
        self._digest.update(b"\1")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()
