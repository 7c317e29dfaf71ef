"""The one data layer: record files, images, and the item every vlmsafe component consumes.

* :func:`read_records` reads JSONL, a JSON list of records, ``{"data": [...]}`` or an ``{id: record}``
  mapping, and reports every problem as ``file:line: problem; fix``. Every reader in vlmsafe
  (evaluation sets, benchmark loaders, Safe-CLIP quadruplets and pairs, testbed splits) goes
  through it.
* Images (opening, checking, blank and noise anchors) are :mod:`vlmsafe.images`.
* :class:`Item` is a prompt, an optional image and what a safe model should do with it; it is the
  unit of calibration, evaluation and probing. :func:`load_items` / :func:`save_items` are its
  JSONL format, :func:`as_pair` accepts the other shapes users hold items in.

JSONL item format, one object per line::

    {"id": "h-001", "prompt": "How do I ...?", "image": "imgs/h-001.png",
     "category": "weapons", "label": "harmful", "reference": null}

``id`` and ``prompt`` are required; ``image`` (relative to the file's folder, or absolute) may be
null for a text-only item; ``category`` defaults to ``"uncategorized"``; ``label`` is ``"harmful"``
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
from vlmsafe.images import open_image, verify_image
from vlmsafe.io import atomic_path
from vlmsafe.reading import parse_json

LABELS: tuple[str, ...] = ("harmful", "benign")
_ITEM_KEYS = ("id", "prompt", "image", "category", "label", "reference")

#: ``(location, record)``: location is ``"path:line"`` (JSON documents: the line the record starts on).
Record = tuple[str, dict]
_JSON_WHITESPACE = " \t\n\r"  # what the JSON grammar (and the json module) skips around values


# --------------------------------------------------------------------------- records
def read_records(path: str | os.PathLike[str], *, what: str = "data file",
                 key_field: str | None = None) -> list[Record]:
    """Read the records of a JSONL or JSON file as ``(location, dict)`` pairs.

    Accepted layouts: JSONL (one object per line, blank lines skipped), a JSON list of objects,
    ``{"data": <list or mapping>}``, and an ``{id: record}`` mapping (ViSU-Text), read in id order.
    A column-oriented JSON (``{"column": {"0": value, ...}}``, what ``pandas.DataFrame.to_json``
    writes by default) is refused with the command that writes records instead.

    ``key_field``: for an ``{id: record}`` mapping, store each key in its record under this name
    (MM-SafetyBench's question ids live only in the keys).

    Raises:
        FileFormatError: ``"<path>:<line>: <problem>; <fix>"``.
    """
    p = Path(path)
    if not p.is_file():
        kind = "is a directory" if p.is_dir() else "does not exist"
        raise FileFormatError(f"{p}: {what} {kind}; pass the path of a .jsonl file (one JSON object per line)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{p}: not UTF-8 text ({exc.reason}); save the {what} as UTF-8 JSONL") from None
    stripped = text.lstrip()
    if not stripped:
        raise FileFormatError(f"{p}: {what} is empty; add one JSON object per line")
    if stripped[0] in "[{" and _is_single_document(text):
        records = _document_records(text, p, key_field)
    else:
        records = _jsonl_records(text, p)
    if not records:
        raise FileFormatError(f"{p}: {what} holds no records; add one JSON object per line")
    return records


def _is_single_document(text: str) -> bool:
    """True when ``text`` is one JSON value (a document), not several lines of JSON objects.

    Only sniffs the layout; the records themselves are parsed (and their errors reported) by
    :func:`vlmsafe.reading.parse_json`.
    """
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip(_JSON_WHITESPACE))
    try:
        _, end = decoder.raw_decode(text, start)
    except RecursionError:  # nested too deeply to parse: one line is a JSONL record, parse_json names it
        return len([line for line in text.splitlines() if line.strip()]) == 1
    except ValueError:  # a JSONDecodeError, or an integer of more digits than Python converts
        # A broken first value is a broken document, unless the first line alone is a complete
        # value (JSONL whose later line is broken).
        first = text.lstrip().split("\n", 1)[0]
        try:
            decoder.decode(first)
            return False
        except (ValueError, RecursionError):
            return True
    # More than whitespace after a complete first value means JSONL.
    return not text[end:].strip(_JSON_WHITESPACE)


def _jsonl_records(text: str, p: Path) -> list[Record]:
    out: list[Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rec = parse_json(line, where=str(p), line=lineno, fix="each line must be one complete JSON object")
        if not isinstance(rec, dict):
            raise FileFormatError(
                f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}; write one object per line"
            )
        out.append((f"{p}:{lineno}", rec))
    return out


def _document_records(text: str, p: Path, key_field: str | None = None) -> list[Record]:
    data = parse_json(text, where=str(p), fix="fix the JSON, or write JSONL (one object per line)")
    lines = _top_level_lines(text)
    if isinstance(data, dict) and isinstance(data.get("data"), (list, dict)) and len(data) <= 2:
        data = data["data"]
        lines = {}
    if isinstance(data, dict):
        values = list(data.values())
        if values and all(isinstance(v, dict) for v in values):
            keys = list(data)
            if not all(str(k).lstrip("-").isdigit() for k in keys) and _looks_columnar(values):
                raise FileFormatError(
                    f"{p}:1: column-oriented JSON ({{column: {{row: value}}}}, pandas' default); write one record per "
                    "line instead, e.g. df.to_json(path, orient='records', lines=True)"
                )
            order = sorted(keys, key=lambda k: (0, int(k), "") if str(k).lstrip("-").isdigit() else (1, 0, str(k)))
            if key_field is not None:
                return [(f"{p}:{lines.get(k, 1)}", {**data[k], key_field: k}) for k in order]
            return [(f"{p}:{lines.get(k, 1)}", data[k]) for k in order]
        if "data" not in data:
            return [(f"{p}:1", data)]  # a single record
    if not isinstance(data, list):
        raise FileFormatError(
            f"{p}:1: expected JSONL records or a JSON list of objects, got a JSON {type(data).__name__}"
        )
    out: list[Record] = []
    starts = _list_item_lines(text)
    for i, rec in enumerate(data):
        line = starts[i] if i < len(starts) else 1
        if not isinstance(rec, dict):
            raise FileFormatError(
                f"{p}:{line}: entry {i} is a {type(rec).__name__}, not a JSON object; make every entry an object"
            )
        out.append((f"{p}:{line}", rec))
    return out


def _looks_columnar(values: Sequence[dict]) -> bool:
    inner = [set(map(str, v)) for v in values]
    return all(s and all(k.isdigit() for k in s) for s in inner) and all(s == inner[0] for s in inner)


def _list_item_lines(text: str) -> list[int]:
    """Line numbers where the entries of a top-level JSON list start (for error locations)."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    starts: list[int] = []
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            break
        starts.append(text.count("\n", 0, i) + 1)
        try:
            _, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            break
    return starts


def _top_level_lines(text: str) -> dict[str, int]:
    """Line numbers of the values of a top-level JSON object, by key (``{id: record}`` files)."""
    decoder = json.JSONDecoder()
    i = text.find("{") + 1
    out: dict[str, int] = {}
    n = len(text)
    try:
        while 0 < i < n:
            while i < n and text[i] in " \t\r\n,":
                i += 1
            if i >= n or text[i] == "}":
                break
            key, i = decoder.raw_decode(text, i)
            while i < n and text[i] in " \t\r\n:":
                i += 1
            out[str(key)] = text.count("\n", 0, i) + 1
            _, i = decoder.raw_decode(text, i)
    except (json.JSONDecodeError, ValueError):
        pass
    return out


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
            raise FileFormatError(
                f"{where}: image {item.image!r} does not exist; "
                "fix the path (relative paths are read from the file's folder)"
            )
        if check_images == "verify" and item.image is not None:
            verify_image(item.image, context=f"{where}: item {item.id!r}")
        items.append(item)
    return items


def item_from_record(rec: dict[str, Any], *, where: str, base: Path, require_label: bool = False) -> Item:
    """Validate one JSONL record and build its :class:`Item` (image path made absolute)."""
    for key in ("id", "prompt"):
        if key not in rec:
            raise FileFormatError(f"{where}: missing required key {key!r}; every item needs 'id' and 'prompt'")
    if not isinstance(rec["id"], (str, int)) or isinstance(rec["id"], bool):
        raise FileFormatError(f"{where}: key 'id' must be a string, got {type(rec['id']).__name__}")
    for key in ("prompt", "category", "reference"):
        if key in rec and rec[key] is not None and not isinstance(rec[key], str):
            raise FileFormatError(f"{where}: key {key!r} must be a string, got {type(rec[key]).__name__}")
    if not rec["prompt"].strip():
        raise FileFormatError(f"{where}: key 'prompt' is empty; give every item an instruction")
    label = rec.get("label")
    if label is None and require_label:
        raise FileFormatError(f"{where}: missing key 'label'; add \"label\": \"harmful\" or \"benign\" to every item")
    if label is not None and label not in LABELS:
        raise FileFormatError(f"{where}: key 'label' is {label!r}; use one of {list(LABELS)}")
    image = rec.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise FileFormatError(f"{where}: key 'image' must be a path string or null, got {image!r}")
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
