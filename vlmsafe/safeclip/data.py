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
(skips the image processor: the bundled testbed uses this to train fast).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch.utils.data import Dataset

from vlmsafe.errors import FileFormatError, InputError

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", torch.Tensor]  # noqa: F821

COCO_SPLITS = ("train2017", "val2017", "test2017")


@dataclass
class Quadruplet:
    """One training/evaluation item. ``safe``/``unsafe`` are captions; images are optional."""

    safe: str
    unsafe: str
    safe_image: Optional[ImageLike] = None
    unsafe_image: Optional[ImageLike] = None


class QuadrupletDataset(Dataset):
    """A list of :class:`Quadruplet` with loaders for the supported file layouts."""

    def __init__(self, items: Iterable[Quadruplet]):
        self.items = list(items)
        for i, q in enumerate(self.items):
            if not isinstance(q.safe, str) or not isinstance(q.unsafe, str) or not q.safe or not q.unsafe:
                raise InputError(f"item {i}: 'safe' and 'unsafe' must be non-empty strings, got {q.safe!r} / {q.unsafe!r}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Quadruplet:
        return self.items[index]

    @property
    def has_images(self) -> bool:
        """True if any item has a safe or unsafe image (otherwise: text-only mode)."""
        return any(q.safe_image is not None or q.unsafe_image is not None for q in self.items)

    def split(self, fraction: float, seed: int = 0) -> tuple["QuadrupletDataset", "QuadrupletDataset"]:
        """Random (train, held-out) split with ``fraction`` of the items held out."""
        if not 0.0 < fraction < 1.0:
            raise InputError(f"split fraction must be in (0, 1), got {fraction}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_out = max(1, int(round(fraction * len(self))))
        return QuadrupletDataset([self.items[i] for i in perm[n_out:]]), QuadrupletDataset([self.items[i] for i in perm[:n_out]])

    @classmethod
    def from_jsonl(cls, path: str | os.PathLike[str], image_root: Optional[str | os.PathLike[str]] = None) -> "QuadrupletDataset":
        """Read ``safe``/``unsafe`` (+ optional ``safe_image``/``unsafe_image``) records, one per line."""
        root = Path(image_root) if image_root is not None else Path(path).parent
        items = []
        for lineno, rec in _read_records(path):
            if "safe" not in rec or "unsafe" not in rec:
                raise FileFormatError(f"{path}:{lineno}: each record needs 'safe' and 'unsafe' fields, got keys {sorted(rec)}")
            items.append(
                Quadruplet(
                    rec["safe"],
                    rec["unsafe"],
                    _resolve(rec.get("safe_image"), root),
                    _resolve(rec.get("unsafe_image"), root),
                )
            )
        return cls(items)

    @classmethod
    def from_visu(
        cls,
        path: str | os.PathLike[str],
        coco_dir: Optional[str | os.PathLike[str]] = None,
        *,
        tags: Optional[Sequence[str]] = None,
        missing_images: str = "error",
    ) -> "QuadrupletDataset":
        """Read the ViSU-Text layout; attach COCO images when ``coco_dir`` is given.

        ``tags`` keeps only records with these ``tag`` values. ``missing_images``: ``"error"``
        (default) or ``"skip"`` (train that record's text terms only) when a COCO image is absent.
        """
        if missing_images not in ("error", "skip"):
            raise InputError("missing_images must be 'error' or 'skip'")
        items = []
        coco = Path(coco_dir) if coco_dir is not None else None
        if coco is not None and not coco.is_dir():
            raise FileFormatError(f"COCO folder {coco} does not exist; pass the folder that contains train2017/ and val2017/")
        for lineno, rec in _read_records(path):
            if "safe" not in rec or "nsfw" not in rec:
                raise FileFormatError(f"{path}:{lineno}: ViSU records need 'safe' and 'nsfw' fields, got keys {sorted(rec)}")
            if tags is not None and rec.get("tag") not in tags:
                continue
            safe_image = None
            if coco is not None and rec.get("coco_id") is not None:
                safe_image = coco_image_path(coco, int(rec["coco_id"]))
                if safe_image is None and missing_images == "error":
                    raise FileFormatError(
                        f"COCO image {int(rec['coco_id']):012d}.jpg not found under {coco}/{{{','.join(COCO_SPLITS)}}}; "
                        "fix the folder or pass missing_images='skip'"
                    )
            unsafe_image = _resolve(rec.get("nsfw_im_path"), Path(path).parent)
            items.append(Quadruplet(rec["safe"], rec["nsfw"], safe_image, unsafe_image))
        return cls(items)


def coco_image_path(coco_dir: Path, coco_id: int) -> Optional[Path]:
    """The path of COCO image ``coco_id`` in any of the standard split folders, or None."""
    name = f"{coco_id:012d}.jpg"
    for split in COCO_SPLITS:
        p = coco_dir / split / name
        if p.is_file():
            return p
    p = coco_dir / name
    return p if p.is_file() else None


def load_dataset(path: str | os.PathLike[str], *, image_root: Optional[str] = None, coco_dir: Optional[str] = None) -> QuadrupletDataset:
    """Pick the reader from the records: ``nsfw`` fields → ViSU, ``unsafe`` fields → JSONL layout."""
    first = next(iter(_read_records(path)), None)
    if first is None:
        raise FileFormatError(f"{path} holds no records")
    rec = first[1]
    if "nsfw" in rec:
        return QuadrupletDataset.from_visu(path, coco_dir, missing_images="skip" if coco_dir is None else "error")
    return QuadrupletDataset.from_jsonl(path, image_root)


def _resolve(value: Any, root: Path) -> Any:
    if value is None or not isinstance(value, (str, os.PathLike)):
        return value
    p = Path(value)
    return p if p.is_absolute() else root / p


def _read_records(path: str | os.PathLike[str]) -> Iterable[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None  # not one JSON document: read as JSONL below
    if data is not None:
        if isinstance(data, dict) and isinstance(data.get("data"), (dict, list)):
            data = data["data"]
        if isinstance(data, dict):
            if data and all(isinstance(v, dict) for v in data.values()):  # {id: record}
                data = [data[k] for k in sorted(data, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))]
            else:  # a single record
                data = [data]
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise FileFormatError(f"{path}: expected JSONL records, a JSON list of records or an {{id: record}} mapping")
        return list(enumerate(data, start=1))
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{path}:{lineno}: not valid JSON ({exc}); the file must be JSONL (one object per line) or one JSON document") from exc
        if not isinstance(rec, dict):
            raise FileFormatError(f"{path}:{lineno}: expected a JSON object")
        out.append((lineno, rec))
    return out


def load_image(image: ImageLike) -> Any:
    """Open a path as an RGB PIL image; pass PIL images and tensors through."""
    if isinstance(image, torch.Tensor):
        return image
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as exc:
        raise FileFormatError(f"cannot read image {image}: {exc}") from exc


def pixel_batch(backend: Any, images: Sequence[ImageLike]) -> torch.Tensor:
    """Preprocessed ``[N, 3, H, W]`` pixels; preprocessed tensors are stacked as they are."""
    loaded = [load_image(im) for im in images]
    if all(isinstance(im, torch.Tensor) for im in loaded):
        return torch.stack(loaded).float()
    if any(isinstance(im, torch.Tensor) for im in loaded):
        raise InputError("a dataset must not mix preprocessed tensors with paths/PIL images")
    return backend.preprocess(loaded)


class QuadrupletCollator:
    """Turn a list of :class:`Quadruplet` into a batch dict for the trainer.

    Image tensors hold only the items that have that image; ``safe_image_index`` /
    ``unsafe_image_index`` say which rows they belong to, so embeddings can be scattered back.
    """

    def __init__(self, backend: Any, use_images: bool = True):
        self.backend = backend
        self.use_images = use_images

    def __call__(self, items: Sequence[Quadruplet]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "size": torch.tensor(len(items)),
            "safe_text": self.backend.tokenize([q.safe for q in items]),
            "unsafe_text": self.backend.tokenize([q.unsafe for q in items]),
        }
        for key in ("safe_image", "unsafe_image"):
            idx = [i for i, q in enumerate(items) if getattr(q, key) is not None] if self.use_images else []
            batch[f"{key}_index"] = torch.tensor(idx, dtype=torch.long)
            batch[f"{key}_pixels"] = pixel_batch(self.backend, [getattr(items[i], key) for i in idx]) if idx else None
        return batch
