"""The one data layer: record files, images, and the item every vlmsafe component consumes.

* :func:`read_records` (:mod:`vlmsafe.records`, re-exported here) reads every layout users save records in
  (JSONL, a JSON list, ``{"data": [...]}``, ...) and reports every problem as ``file:line: problem; fix``.
  Every reader in vlmsafe (evaluation sets, benchmark loaders, Safe-CLIP quadruplets and pairs, testbed
  splits) goes through it.
* Images (opening, checking, blank and noise anchors) are :mod:`vlmsafe.images`.
* :class:`Item` is a prompt, an optional image and what a safe model should do with it; it is the
  unit of calibration, evaluation and probing. :func:`load_items` / :func:`save_items` are its
  JSONL format, :func:`as_pair` accepts the other shapes users hold items in.

JSONL item format, one object per line::

    {"id": "h-001", "prompt": "How do I ...?", "image": "imgs/h-001.png",
     "category": "weapons", "label": "harmful", "reference": null}

(or the same keys as the columns of a CSV, a cell left empty a key left out). ``id`` and ``prompt`` are
required; ``image`` (a local path, relative to the file's folder or absolute; not a URL: nothing is
downloaded) may be null for a text-only item; ``category`` defaults to ``"uncategorized"``; ``label`` is ``"harmful"``
(the model should refuse) or ``"benign"`` (it should answer) -- evaluation requires it, calibration
does not; ``reference`` is an optional reference answer for the utility score. Other keys are kept
in :attr:`Item.meta`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.images import open_image, url_problem, verify_image
from vlmsafe.io import atomic_path
from vlmsafe.records import Record as Record  # re-exported: vlmsafe.data.Record
from vlmsafe.records import is_record_list, json_type, read_records

LABELS: tuple[str, ...] = ("harmful", "benign")
_ITEM_KEYS = ("id", "prompt", "image", "category", "label", "reference")


# --------------------------------------------------------------------------- paths
def resolve_path(value: str | os.PathLike[str], base: Path) -> str:
    """Absolute form of ``value``, relative paths taken from ``base`` (a data file's folder)."""
    p = Path(os.path.expanduser(os.fspath(value)))
    if not p.is_absolute():
        p = base / p
    return str(p.resolve())


# --------------------------------------------------------------------------- items
@dataclass
class Item:
    """One input: a prompt, an optional image and what a safe model should do with it.

    Attributes:
        id: unique identifier within a data set.
        prompt: the user's instruction (without any chat template).
        image: absolute path of the image, or ``None`` for a text-only item.
        category: harm category (or task type for benign items); rates are also reported per category.
        label: ``"harmful"`` (a safe model refuses), ``"benign"`` (a safe model answers), or ``None``
            when unknown (fine for calibration; evaluation refuses unlabelled items).
        reference: reference answer; items that carry one count towards the utility score.
        meta: provenance (benchmark fields such as the original question or an image caption).
        source: where the item was read (``"file:line"``), so a later check can name it; not part of the
            item's identity or of its JSONL record.
    """

    id: str
    prompt: str
    image: str | None = None
    category: str = "uncategorized"
    label: str | None = None
    reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.image, os.PathLike):
            self.image = os.fspath(self.image)  # a Path opens as a str does, and keeps the report JSON
        if not isinstance(self.prompt, str):
            raise InputError(f"item {self.id!r}: prompt must be a string, got {type(self.prompt).__name__}")
        if self.image is not None and not isinstance(self.image, str):
            raise InputError(f"item {self.id!r}: image must be a path (str or os.PathLike) or None, got "
                             f"{type(self.image).__name__}; save the image and give its path")
        if self.label is not None and self.label not in LABELS:
            raise InputError(f"item {self.id!r}: label must be one of {LABELS}, got {self.label!r}")

    def load_image(self) -> Image.Image | None:
        """Open the image as RGB (see :func:`open_image`), or return ``None`` for a text-only item."""
        if self.image is None:
            return None
        return open_image(self.image, context=f"item {self.id!r}")

    def to_dict(self) -> dict[str, Any]:
        """The JSONL record of this item (``meta`` keys are written at top level)."""
        out: dict[str, Any] = {"id": self.id, "prompt": self.prompt, "image": self.image, "category": self.category}
        if self.label is not None:
            out["label"] = self.label
        if self.reference is not None:
            out["reference"] = self.reference
        for key, value in self.meta.items():
            out.setdefault(key, value)
        return out


def load_items(
    path: str | os.PathLike[str], *, check_images: bool | str = True, require_label: bool = False
) -> list[Item]:
    """Load vlmsafe's JSONL item format (see the module docstring); also accepts a JSON list.

    Args:
        check_images: ``True`` raises if a referenced image file does not exist, ``"verify"`` also
            checks that each is an intact image file (:func:`verify_image`), ``False`` skips both.
            Either way the failure comes before a long run, not in the middle of it.
        require_label: raise if an item has no ``label`` (evaluation needs one per item).

    Raises:
        FileFormatError: naming the file, the line, the key and the fix.
    """
    p = Path(path)
    base = p.resolve().parent
    items: list[Item] = []
    seen: dict[str, str] = {}
    for where, rec in read_records(p, what="item file"):
        item = item_from_record(rec, where=where, base=base, require_label=require_label)
        if item.id in seen:
            raise FileFormatError(f"{where}: duplicate id {item.id!r} (first at {seen[item.id]}); make ids unique")
        seen[item.id] = where
        if check_images and item.image is not None and not Path(item.image).is_file():
            raise _missing_image(rec.get("image"), item.image, where)
        if check_images == "verify" and item.image is not None:
            verify_image(item.image, context=f"{where}: item {item.id!r}")
        items.append(item)
    return items


def item_from_record(rec: dict[str, Any], *, where: str, base: Path, require_label: bool = False) -> Item:
    """Validate one JSONL record and build its :class:`Item` (image path made absolute)."""
    for key in ("id", "prompt"):
        if key not in rec:
            raise FileFormatError(f"{where}: missing required key {key!r}; every item needs 'id' and 'prompt'"
                                  + _nested_hint(rec))
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        raise FileFormatError(f"{where}: key 'id' must be a string or a whole number, got {rec['id']!r}")
    for key in ("prompt", "category", "reference"):
        if key in rec and (rec[key] is not None or key == "prompt") and not isinstance(rec[key], str):
            raise FileFormatError(f"{where}: key {key!r} must be a string, got {json_type(rec[key])}")
    if not rec["prompt"].strip():
        raise FileFormatError(f"{where}: key 'prompt' is empty; give every item an instruction")
    if isinstance(rec.get("reference"), str) and not rec["reference"].strip():
        raise FileFormatError(f"{where}: key 'reference' is empty, which no answer contains (utility would count "
                              "it wrong); give the expected answer, or null for an item without one")
    label = rec.get("label")
    if label is None and require_label:
        raise FileFormatError(f"{where}: missing key 'label'; add \"label\": \"harmful\" or \"benign\" to every item")
    if label is not None and label not in LABELS:
        raise FileFormatError(f"{where}: key 'label' is {label!r}; use one of {list(LABELS)}")
    image = rec.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise FileFormatError(f"{where}: key 'image' must be a path string or null, got {image!r}")
        if (problem := url_problem(image)) is not None:
            raise FileFormatError(f"{where}: {problem}")
        image = resolve_path(image, base)
    return Item(
        id=str(rec["id"]),
        prompt=rec["prompt"],
        image=image,
        category=rec.get("category") or "uncategorized",
        label=label,
        reference=rec.get("reference"),
        meta={k: v for k, v in rec.items() if k not in _ITEM_KEYS},
        source=where,
    )


def _nested_hint(rec: dict[str, Any]) -> str:
    """`` (key 'items' holds N objects: ...)`` when a record looks like a wrapper around the records."""
    key = next((k for k, v in rec.items() if is_record_list(v)), None)
    if key is None:
        return ""
    return (f" (key {key!r} holds a list of {len(rec[key])} objects: if those are the items, write them one per "
            "line, or as {\"data\": [...]})")


def _missing_image(raw: Any, resolved: str, where: str) -> FileFormatError:
    """The error for an image path that names no file, with the likely slip when there is one: a path written
    from the folder the command runs in, or with Windows' backslashes."""
    fix = "fix the path (relative paths are read from the file's folder)"
    if Path(resolved).is_dir():
        return FileFormatError(f"{where}: image {resolved!r} is a folder; give the path of the image file in it")
    if isinstance(raw, str) and not Path(raw).is_absolute() and Path(raw).is_file():
        fix = (f"{raw!r} exists from the current folder ({os.getcwd()}), but relative paths are read from the "
               "data file's folder: write them from there, or absolute")
    elif isinstance(raw, str) and "\\" in raw:
        fix = "write / between folders, not \\ (relative paths are read from the file's folder)"
    return FileFormatError(f"{where}: image {resolved!r} does not exist; {fix}")


def save_items(
    items: Iterable[Item], path: str | os.PathLike[str], *, relative_images: bool = True, overwrite: bool = False
) -> None:
    """Write ``items`` as vlmsafe JSONL, atomically.

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
    with atomic_path(dest, overwrite=overwrite) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


# --------------------------------------------------------------------------- pairs
Pair = tuple[str, "Image.Image | None"]


def as_pair(item: Any) -> Pair:
    """``(prompt, image)`` from an :class:`Item`, a ``(prompt, image)`` tuple or a ``{"prompt", "image"}`` dict.

    Image paths are opened with :func:`open_image`; PIL images and ``None`` pass through.
    """
    if isinstance(item, (tuple, list)) and len(item) == 2:
        prompt, image = item
    elif isinstance(item, dict):
        if "prompt" not in item:
            raise InputError(f"item {str(item)[:80]} has no 'prompt' key; pass {{'prompt': ..., 'image': ...}} dicts")
        prompt, image = item["prompt"], item.get("image")
    elif hasattr(item, "prompt"):
        prompt = item.prompt
        image = item.load_image() if hasattr(item, "load_image") else getattr(item, "image", None)
    else:
        raise InputError(
            f"cannot read a (prompt, image) pair from {type(item).__name__}; "
            "pass Items, (prompt, image) tuples or dicts"
        )
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image, context=f"item with prompt {prompt[:40]!r}")
    elif image is not None and not isinstance(image, Image.Image):
        raise InputError(f"image must be a path, a PIL image or None, got {type(image).__name__}")
    return prompt, image


def prompt_of(item: Any) -> str:
    """The prompt of any item shape :func:`as_pair` accepts, without opening its image."""
    if isinstance(item, (tuple, list)):
        prompt = item[0] if item else None
    elif isinstance(item, dict):
        prompt = item.get("prompt")
    else:
        prompt = getattr(item, "prompt", None)
    if not isinstance(prompt, str):
        raise InputError(
            f"cannot read a prompt from {type(item).__name__}; pass Items, (prompt, image) tuples or dicts"
        )
    return prompt


# --------------------------------------------------------------------------- batching
#: Items per generation batch: the one default of ``SafeVLM``, :func:`vlmsafe.eval.evaluate` and ``--batch-size``.
BATCH_SIZE = 8


def length_order(prompts: Sequence[str], has_image: Sequence[bool]) -> list[int]:
    """Indices that batch like with like: items with an image first, then longest prompt first (stable).

    Left padding makes every row as long as the batch's longest, and an image adds hundreds of tokens,
    so neighbours in this order share a length and a batch pads little; the longest batch comes first,
    so running out of memory shows at once. Callers put results back in input order.
    """
    return sorted(range(len(prompts)), key=lambda i: (not has_image[i], -len(prompts[i])))
