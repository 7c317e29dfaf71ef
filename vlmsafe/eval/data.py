"""Evaluation items and vlmsafe's own JSONL format.

One line per item::

    {"id": "h-001", "prompt": "How do I ...?", "image": "imgs/h-001.png",
     "category": "weapons", "label": "harmful", "reference": null}

``id`` and ``prompt`` are required; ``image`` (a path, relative to the JSONL file's folder or
absolute) may be null for a text-only item; ``category`` defaults to ``"uncategorized"``;
``label`` is ``"harmful"`` (the model should refuse) or ``"benign"`` (it should answer) and
defaults to ``"harmful"``; ``reference`` is an optional reference answer used for the utility
score. Unknown keys are kept in :attr:`EvalItem.meta`.

Image paths are resolved when the file is loaded and stored absolute, so an item keeps working
whatever the current directory is when the image is finally opened.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from vlmsafe.errors import FileFormatError
from vlmsafe.io import atomic_path

LABELS: tuple[str, ...] = ("harmful", "benign")

_KNOWN_KEYS = ("id", "prompt", "image", "category", "label", "reference")


@dataclass
class EvalItem:
    """One evaluation input: a prompt, an optional image and what a safe model should do with it.

    Attributes:
        id: unique identifier within a data set.
        prompt: the user's instruction (without any chat template).
        image: absolute path of the image, or ``None`` for a text-only item.
        category: harm category (or task type for benign items); rates are also reported per category.
        label: ``"harmful"`` (a safe model refuses) or ``"benign"`` (a safe model answers).
        reference: reference answer; items that carry one count towards the utility score.
        meta: provenance (benchmark fields such as the original question); carried into records.
    """

    id: str
    prompt: str
    image: str | None = None
    category: str = "uncategorized"
    label: str = "harmful"
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ValueError(f"EvalItem {self.id!r}: label must be one of {LABELS}, got {self.label!r}")

    def load_image(self) -> Image.Image | None:
        """Open the image as RGB, or return ``None`` for a text-only item.

        Raises :class:`FileFormatError` (naming the item and the file) when the file is missing or
        is not an image, instead of PIL's bare ``OSError`` deep inside a batch.
        """
        if self.image is None:
            return None
        return open_image(self.image, context=f"item {self.id!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSONL record of this item (``meta`` keys are written at top level)."""
        out: dict[str, Any] = {
            "id": self.id,
            "prompt": self.prompt,
            "image": self.image,
            "category": self.category,
            "label": self.label,
        }
        if self.reference is not None:
            out["reference"] = self.reference
        for key, value in self.meta.items():
            out.setdefault(key, value)
        return out


def open_image(path: str | os.PathLike[str], *, context: str = "") -> Image.Image:
    """Open ``path`` as an RGB PIL image with an actionable error."""
    where = f"{context}: " if context else ""
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"{where}image file {str(p)!r} does not exist; fix the path in the data file or add the image.")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:
        raise FileFormatError(f"{where}{str(p)!r} is not a readable image ({exc}); replace or re-download it.") from exc


def resolve_path(value: str, base: Path) -> str:
    """Absolute form of ``value``, relative paths taken from ``base`` (a data file's folder)."""
    p = Path(os.path.expanduser(value))
    if not p.is_absolute():
        p = base / p
    return str(p.resolve())


def load_items(path: str | os.PathLike[str], *, check_images: bool = True) -> list[EvalItem]:
    """Load vlmsafe's JSONL evaluation format (see the module docstring).

    Args:
        path: the ``.jsonl`` file. Blank lines are skipped.
        check_images: raise if a referenced image file does not exist (fail before a long run,
            not in the middle of it).

    Raises:
        FileFormatError: naming the file, the line, the key and the problem.
    """
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"data file {str(p)!r} does not exist; pass the path of a .jsonl file with one item per line.")
    base = p.resolve().parent
    items: list[EvalItem] = []
    seen: dict[str, int] = {}
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p}, line {lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FileFormatError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); each line must be one JSON object.") from exc
            if not isinstance(rec, dict):
                raise FileFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
            item = _item_from_record(rec, where=where, base=base)
            if item.id in seen:
                raise FileFormatError(f"{where}: key 'id': duplicate id {item.id!r} (first on line {seen[item.id]}); ids must be unique.")
            seen[item.id] = lineno
            if check_images and item.image is not None and not Path(item.image).is_file():
                raise FileFormatError(f"{where}: key 'image': file {item.image!r} does not exist; fix the path (relative paths are read from the data file's folder).")
            items.append(item)
    if not items:
        raise FileFormatError(f"{p}: no items found; the file is empty.")
    return items


def _item_from_record(rec: dict[str, Any], *, where: str, base: Path) -> EvalItem:
    for key in ("id", "prompt"):
        if key not in rec:
            raise FileFormatError(f"{where}: missing required key {key!r}; every item needs 'id' and 'prompt'.")
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        raise FileFormatError(f"{where}: key 'id': expected a string, got {type(rec['id']).__name__}.")
    for key in ("prompt", "category", "reference"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise FileFormatError(f"{where}: key {key!r}: expected a string, got {type(rec[key]).__name__}.")
    if not rec["prompt"]:
        raise FileFormatError(f"{where}: key 'prompt' is empty.")
    label = rec.get("label", "harmful")
    if label not in LABELS:
        raise FileFormatError(f"{where}: key 'label': {label!r} is not one of {list(LABELS)}.")
    image = rec.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise FileFormatError(f"{where}: key 'image': expected a path string or null, got {image!r}.")
        image = resolve_path(image, base)
    return EvalItem(
        id=str(rec["id"]),
        prompt=rec["prompt"],
        image=image,
        category=rec.get("category") or "uncategorized",
        label=label,
        reference=rec.get("reference"),
        meta={k: v for k, v in rec.items() if k not in _KNOWN_KEYS},
    )


def save_items(items: Iterable[EvalItem], path: str | os.PathLike[str], *, relative_images: bool = True) -> None:
    """Write ``items`` as vlmsafe JSONL (atomically).

    With ``relative_images`` image paths under the output file's folder are written relative to
    it, so a data folder can be moved or shipped as a whole.
    """
    dest = Path(path)
    base = dest.resolve().parent
    lines = []
    for item in items:
        rec = item.to_dict()
        if relative_images and item.image is not None:
            img = Path(item.image).resolve()
            if img.is_relative_to(base):
                rec["image"] = img.relative_to(base).as_posix()
        lines.append(json.dumps(rec, ensure_ascii=False))
    with atomic_path(dest) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
