"""Safe-CLIP training data: (safe text, unsafe text, safe image, unsafe image) quadruplets.

Sources:

* JSONL, one object per line: ``{"safe": ..., "unsafe": ..., "safe_image": ..., "unsafe_image": ...}``
  (images optional: paths relative to ``image_root`` or absolute).
* The ViSU-Text layout (``incremental_id, safe, nsfw, coco_id, tag, prompt_id``) as a JSON list,
  a ``{id: record}`` dict, ``{"info":..., "data": {...}}``, or JSONL, plus a COCO folder holding
  ``train2017/``, ``val2017/``, ``test2017/`` with ``{coco_id:012d}.jpg``. ViSU's unsafe images
  are not public; records may carry ``nsfw_im_path`` if you have your own.

Items without images train the text terms only (see :mod:`vlmsafe.safeclip.losses`); a dataset
with no images at all is the first-class *text-only* mode.

Images may be given as a path, a PIL image, or an already preprocessed ``[3, H, W]`` tensor
(:mod:`vlmsafe.safeclip.images` loads them); :class:`~vlmsafe.safeclip.batches.QuadrupletCollator`
turns a list of quadruplets into a training batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlmsafe.data import resolve_path
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.images import url_problem, verify_image
from vlmsafe.records import Record, read_records
from vlmsafe.safeclip.images import ImageLike

COCO_SPLITS = ("train2017", "val2017", "test2017")
_WHAT = "Safe-CLIP data file"


@dataclass
class Quadruplet:
    """One training/evaluation item. ``safe``/``unsafe`` are captions; images are optional."""

    safe: str
    unsafe: str
    safe_image: ImageLike | None = None
    unsafe_image: ImageLike | None = None


class QuadrupletDataset(Dataset):
    """A list of :class:`Quadruplet` with loaders for the supported file layouts."""

    def __init__(self, items: Iterable[Quadruplet]):
        self.items = list(items)
        for i, q in enumerate(self.items):
            if not isinstance(q.safe, str) or not isinstance(q.unsafe, str) or not q.safe or not q.unsafe:
                raise InputError(
                    f"item {i}: 'safe' and 'unsafe' must be non-empty strings, got {q.safe!r} / {q.unsafe!r}"
                )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Quadruplet:
        return self.items[index]

    @property
    def has_images(self) -> bool:
        """True if any item has a safe or unsafe image (otherwise: text-only mode)."""
        return any(q.safe_image is not None or q.unsafe_image is not None for q in self.items)

    def text_only(self) -> QuadrupletDataset:
        """The same captions without images."""
        return QuadrupletDataset(Quadruplet(q.safe, q.unsafe) for q in self.items)

    def verify_images(self) -> None:
        """Check that every image path is an intact image file (before a long run, not an hour into it).

        Raises:
            FileFormatError: naming the file (missing, not an image, truncated).
        """
        seen: set[str] = set()
        for i, q in enumerate(self.items):
            for key in ("safe_image", "unsafe_image"):
                image = getattr(q, key)
                if isinstance(image, (str, os.PathLike)) and os.fspath(image) not in seen:
                    seen.add(os.fspath(image))
                    verify_image(image, context=f"item {i} ({key})")

    def split(self, fraction: float, seed: int = 0) -> tuple[QuadrupletDataset, QuadrupletDataset]:
        """Random (train, held-out) split with ``fraction`` of the items held out."""
        if not 0.0 < fraction < 1.0:
            raise InputError(f"split fraction must be in (0, 1), got {fraction}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_out = max(1, round(fraction * len(self)))
        held_out = QuadrupletDataset([self.items[i] for i in perm[:n_out]])
        return QuadrupletDataset([self.items[i] for i in perm[n_out:]]), held_out

    @classmethod
    def from_jsonl(
        cls, path: str | os.PathLike[str], image_root: str | os.PathLike[str] | None = None
    ) -> QuadrupletDataset:
        """Read ``safe``/``unsafe`` (+ optional ``safe_image``/``unsafe_image``) records, one per line.

        Image paths are relative to ``image_root`` (default: the file's folder); a missing image
        file is an error here, before any model is loaded.
        """
        return cls(_jsonl_items(read_records(path, what=_WHAT), path, image_root))

    @classmethod
    def from_visu(
        cls,
        path: str | os.PathLike[str],
        coco_dir: str | os.PathLike[str] | None = None,
        *,
        tags: Sequence[str] | None = None,
        missing_images: str = "error",
    ) -> QuadrupletDataset:
        """Read the ViSU-Text layout; attach COCO images when ``coco_dir`` is given.

        ``tags`` keeps only records with these ``tag`` values. ``missing_images``: ``"error"``
        (default) or ``"skip"`` (train that record's text terms only) when a COCO image is absent.
        """
        if missing_images not in ("error", "skip"):
            raise InputError(f"missing_images must be 'error' or 'skip', got {missing_images!r}")
        return cls(_visu_items(read_records(path, what=_WHAT), path, coco_dir, tags, missing_images))


def _text_fields(rec: dict, where: str, unsafe_key: str, layout: str) -> tuple[str, str]:
    safe, unsafe = rec.get("safe"), rec.get(unsafe_key)
    if not isinstance(safe, str) or not isinstance(unsafe, str) or not safe.strip() or not unsafe.strip():
        raise FileFormatError(
            f"{where}: {layout} records need non-empty 'safe' and {unsafe_key!r} text fields, got keys {sorted(rec)}; "
            f"add both captions to every record"
        )
    return safe, unsafe


def _jsonl_items(records: list[Record], path: str | os.PathLike[str], image_root: Any) -> list[Quadruplet]:
    root = Path(image_root) if image_root is not None else Path(path).parent
    items = []
    for where, rec in records:
        safe, unsafe = _text_fields(rec, where, "unsafe", "Safe-CLIP")
        images = [_image_path(rec.get(key), root, where, key) for key in ("safe_image", "unsafe_image")]
        items.append(Quadruplet(safe, unsafe, *images))
    return items


def _visu_items(
    records: list[Record], path: str | os.PathLike[str], coco_dir: Any, tags: Sequence[str] | None, missing: str
) -> list[Quadruplet]:
    coco = Path(coco_dir) if coco_dir is not None else None
    if coco is not None and not coco.is_dir():
        raise FileFormatError(
            f"COCO folder {coco} does not exist; pass the folder that contains train2017/ and val2017/"
        )
    items = []
    for where, rec in records:
        safe, unsafe = _text_fields(rec, where, "nsfw", "ViSU")
        if tags is not None and rec.get("tag") not in tags:
            continue
        safe_image = None
        if coco is not None and rec.get("coco_id") is not None:
            coco_id = rec["coco_id"]
            if isinstance(coco_id, bool) or not str(coco_id).isdigit():
                raise FileFormatError(f"{where}: 'coco_id' must be a non-negative integer, got {coco_id!r}")
            safe_image = coco_image_path(coco, int(coco_id))
            if safe_image is None and missing == "error":
                raise FileFormatError(
                    f"{where}: COCO image {int(coco_id):012d}.jpg not found under "
                    f"{coco}/{{{','.join(COCO_SPLITS)}}}; fix the folder or pass missing_images='skip'"
                )
        unsafe_image = _image_path(rec.get("nsfw_im_path"), Path(path).parent, where, "nsfw_im_path")
        items.append(Quadruplet(safe, unsafe, safe_image, unsafe_image))
    return items


def _image_path(value: Any, root: Path, where: str, key: str) -> Path | None:
    """An image field resolved against ``root``; a path that does not exist is an error."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise FileFormatError(f"{where}: {key!r} must be an image path or null, got {value!r}")
    if (problem := url_problem(value)) is not None:
        raise FileFormatError(f"{where}: {key}: {problem}")
    p = Path(resolve_path(value, root))
    if not p.is_file():
        raise FileFormatError(f"{where}: {key} {str(p)!r} does not exist; fix the path or `image_root`")
    return p


def coco_image_path(coco_dir: Path, coco_id: int) -> Path | None:
    """The path of COCO image ``coco_id`` in any of the standard split folders, or None."""
    name = f"{coco_id:012d}.jpg"
    for split in COCO_SPLITS:
        p = coco_dir / split / name
        if p.is_file():
            return p
    p = coco_dir / name
    return p if p.is_file() else None


def load_dataset(
    path: str | os.PathLike[str], *, image_root: str | None = None, coco_dir: str | None = None
) -> QuadrupletDataset:
    """Pick the layout from the records: ``nsfw`` fields → ViSU, ``unsafe`` fields → JSONL layout."""
    records = read_records(path, what=_WHAT)
    if "nsfw" in records[0][1]:
        missing = "skip" if coco_dir is None else "error"
        return QuadrupletDataset(_visu_items(records, path, coco_dir, None, missing))
    return QuadrupletDataset(_jsonl_items(records, path, image_root))
