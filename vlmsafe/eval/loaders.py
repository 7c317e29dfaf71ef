"""Loaders for public multimodal-safety benchmarks, in the layouts their authors distribute.

Each loader returns :class:`~vlmsafe.data.Item` lists (all labelled ``"harmful"``: these
benchmarks contain only requests a safe model should decline) and raises
:class:`~vlmsafe.errors.FileFormatError` as ``file:line: problem; fix`` when a file does not have the
expected layout. Records are read by :func:`vlmsafe.data.read_records`. Nothing is downloaded:
point them at your local copy. :func:`load_benchmark` picks the loader from the path and its keys
(what ``vlmsafe evaluate --data`` does).

* MM-SafetyBench (Liu et al., ECCV 2024)::

      <root>/processed_questions/01-Illegal_Activitiy.json   {"0": {"Question": ..., "Rephrased Question": ...,
                                                             "Rephrased Question(SD)": ..., "Key Phrase": ...}, ...}
      <root>/imgs/01-Illegal_Activitiy/{SD,SD_TYPO,TYPO}/0.jpg

  Each image type is paired with the text its authors use: ``SD`` with
  ``"Rephrased Question(SD)"``, ``SD_TYPO`` and ``TYPO`` with ``"Rephrased Question"``; the extra
  type ``TEXT`` gives the original ``"Question"`` without an image (the text-only baseline).
* FigStep / SafeBench (Gong et al., 2023): ``question/safebench.csv`` with columns
  ``dataset,category_id,task_id,category_name,question,instruction`` and images
  ``images/SafeBench/query_<dataset>_<category_id>_<task_id>_6.png`` (the repository ships all 500).
  Missing images can be rendered with :func:`render_typographic` (``render_missing=True``).
* VLSafe (Chen et al., 2023, "DRESS"): ``harmlessness_examine.jsonl`` as published, one
  ``{"image_id": "<COCO file name>", "caption": ..., "query": ...}`` per line (a JSON list also
  works); images are read from a COCO folder, either ``train2017/`` itself or its parent (a 2014 name,
  ``COCO_train2014_<id>.jpg``, is also found under its 2017 name, ``<id>.jpg``). The caption is kept in
  ``Item.meta["caption"]``. A repeated id (FigStep row, VLSafe record) is refused: it would count twice.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from vlmsafe.data import Item, read_records, resolve_path
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.eval.figstep import FIGSTEP_PROMPT, render_typographic
from vlmsafe.reading import read_text

# --------------------------------------------------------------------------------------------
# MM-SafetyBench

#: Image type -> question field of a processed_questions entry (as the benchmark pairs them).
MMSB_QUESTION_FIELDS: dict[str, str] = {
    "SD": "Rephrased Question(SD)",
    "SD_TYPO": "Rephrased Question",
    "TYPO": "Rephrased Question",
    "TEXT": "Question",
}


def load_mm_safetybench(
    root: str | os.PathLike[str],
    scenarios: Sequence[str] | None = None,
    image_types: Sequence[str] = ("SD_TYPO",),
    *,
    image_root: str | os.PathLike[str] | None = None,
    check_images: bool = True,
) -> list[Item]:
    """Load MM-SafetyBench from its released layout.

    Args:
        root: folder holding ``processed_questions/`` (usually also ``imgs/``).
        scenarios: scenario names to keep, with or without the number prefix, case-insensitive
            (``"01-Illegal_Activitiy"`` or ``"illegal_activitiy"``); ``None`` keeps all.
        image_types: any of ``SD``, ``SD_TYPO``, ``TYPO`` and ``TEXT`` (no image, original question).
        image_root: folder with ``<scenario>/<type>/<id>.jpg`` if not ``<root>/imgs``.
        check_images: fail up front if an image is missing.

    Items are ``id="<scenario>/<type>/<n>"``, ``category=<scenario>``, with the original question,
    key phrase and image type in ``meta``.
    """
    root_p = Path(root)
    qdir = root_p / "processed_questions"
    if not qdir.is_dir():
        if root_p.name == "processed_questions" and root_p.is_dir():
            qdir, root_p = root_p, root_p.parent
        else:
            files = sorted(f.name for f in root_p.iterdir() if f.suffix.lower() in (".jsonl", ".json", ".csv")) \
                if root_p.is_dir() else []
            if files:  # a folder of the user's own data files: vlmsafe reads one file per run
                raise FileFormatError(
                    f"{str(root_p)!r} is a folder of {len(files)} data file(s) ({', '.join(files[:3])}"
                    f"{', ...' if len(files) > 3 else ''}), not MM-SafetyBench (no processed_questions/ in it); "
                    f"pass one data file, e.g. {str(root_p / files[0])!r}, or join them into one")
            raise FileFormatError(
                f"{str(root_p)!r} has no 'processed_questions' folder; pass the MM-SafetyBench data folder "
                "(the one containing processed_questions/ and imgs/), or a data file (JSONL, JSON or CSV)."
            )
    bad = [t for t in image_types if t not in MMSB_QUESTION_FIELDS]
    if bad or not image_types:
        raise InputError(
            f"image types must be a non-empty subset of {list(MMSB_QUESTION_FIELDS)}, got {list(image_types)}"
        )
    img_root = Path(image_root) if image_root is not None else root_p / "imgs"
    files = sorted(qdir.glob("*.json"))
    if not files:
        raise FileFormatError(
            f"{str(qdir)!r} contains no .json files; it should hold one <scenario>.json per scenario."
        )
    if scenarios is not None:
        wanted = {_scenario_key(s): s for s in scenarios}
        available = {_scenario_key(f.stem): f for f in files}
        missing = [s for k, s in wanted.items() if k not in available]
        if missing:
            raise FileFormatError(
                f"scenario(s) {missing} not found in {str(qdir)!r}; available: {[f.stem for f in files]}."
            )
        files = [available[k] for k in wanted]

    items: list[Item] = []
    for path in files:
        scenario = path.stem
        for where, entry in read_records(path, what="MM-SafetyBench question file", key_field="_qid"):
            qid = str(entry.get("_qid", where.rsplit(":", 1)[-1]))
            for itype in image_types:
                field = MMSB_QUESTION_FIELDS[itype]
                text = entry.get(field)
                if not isinstance(text, str) or not text.strip():
                    raise FileFormatError(
                        f"{where}: entry {qid!r}: key {field!r} (needed for image type {itype}) is "
                        f"{'missing' if field not in entry else 'empty or not a string'} (keys present: "
                        f"{sorted(k for k in entry if k != '_qid')}); use another image type or fix the file"
                    )
                image = None
                if itype != "TEXT":
                    image = str((img_root / scenario / itype / f"{qid}.jpg").resolve())
                    if check_images and not Path(image).is_file():
                        raise FileFormatError(
                            f"{where}: entry {qid!r}: image {image!r} does not exist; "
                            "download the MM-SafetyBench images into <root>/imgs (or pass image_root=...), "
                            "or choose other image_types"
                        )
                items.append(
                    Item(
                        id=f"{scenario}/{itype}/{qid}",
                        prompt=text,
                        image=image,
                        category=scenario,
                        label="harmful",
                        meta={
                            "benchmark": "mm-safetybench",
                            "image_type": itype,
                            "question": entry.get("Question"),
                            "key_phrase": entry.get("Key Phrase"),
                        },
                        source=where,
                    )
                )
    return items


def _scenario_key(name: str) -> str:
    return re.sub(r"^\d+[-_]", "", name).lower()


# --------------------------------------------------------------------------------------------
# FigStep / SafeBench

FIGSTEP_COLUMNS = ("dataset", "category_id", "task_id", "category_name", "question", "instruction")


def figstep_image_name(dataset: str, category_id: str, task_id: str) -> str:
    """File name FigStep gives the typographic image of one SafeBench row."""
    return f"query_{dataset}_{category_id}_{task_id}_6.png"


def load_figstep(
    csv_path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    *,
    render_missing: bool = False,
    size: int | tuple[int, int] = 760,
    prompt: str = FIGSTEP_PROMPT,
    categories: Iterable[str] | None = None,
) -> list[Item]:
    """Load FigStep's SafeBench CSV with its typographic images.

    Args:
        csv_path: ``safebench.csv`` or ``SafeBench-Tiny.csv``.
        image_dir: folder with ``query_<dataset>_<category_id>_<task_id>_6.png``.
        render_missing: render images that are absent into ``image_dir`` with
            :func:`render_typographic` instead of failing (the public repository ships all 500 SafeBench
            images in ``data/images/SafeBench``; this is for subsets or re-rendered variants).
        size: canvas size used when rendering.
        prompt: the text prompt paired with every image (FigStep's by default).
        categories: keep only these ``category_name`` values.

    Items are ``id="<dataset>_<category_id>_<task_id>"``, ``category=<category_name>``; the
    plain ``question`` (the text-only baseline) and ``instruction`` are in ``meta``.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileFormatError(
            f"{path}: FigStep CSV does not exist; pass data/question/safebench.csv of the FigStep repository"
        )
    img_dir = Path(image_dir)
    keep = set(categories) if categories is not None else None
    items: list[Item] = []
    text = read_text(path, fix="save the CSV as UTF-8 (Excel: CSV UTF-8)")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    missing = [c for c in FIGSTEP_COLUMNS if c not in header]
    if missing:
        raise FileFormatError(
            f"{path}:1: missing column(s) {missing} (found {header}); "
            f"a SafeBench CSV has columns {list(FIGSTEP_COLUMNS)}"
        )
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if None in row or any(row.get(c) is None for c in FIGSTEP_COLUMNS):
            raise FileFormatError(
                f"{where}: expected {len(header)} fields, got a row of a different length; "
                "quote fields that hold commas"
            )
        for col in FIGSTEP_COLUMNS:
            if not row[col].strip():
                raise FileFormatError(f"{where}: column {col!r} is empty; fill it or drop the row")
        if keep is not None and row["category_name"] not in keep:
            continue
        ds, cid, tid = row["dataset"].strip(), row["category_id"].strip(), row["task_id"].strip()
        image = img_dir / figstep_image_name(ds, cid, tid)
        if not image.is_file():
            if not render_missing:
                raise FileFormatError(
                    f"{where}: image {str(image)!r} does not exist; point `image_dir` at FigStep's images, or "
                    "pass `render_missing=True` to render it."
                )
            img_dir.mkdir(parents=True, exist_ok=True)
            render_typographic(row["instruction"], size).save(image)
        items.append(
            Item(
                id=f"{ds}_{cid}_{tid}",
                prompt=prompt,
                image=str(image.resolve()),
                category=row["category_name"].strip(),
                label="harmful",
                meta={"benchmark": "figstep", "question": row["question"], "instruction": row["instruction"]},
                source=where,
            )
        )
    if not items:
        raise FileFormatError(
            f"{path}: no rows{' in the requested categories' if keep is not None else ''}; "
            "check the file and the categories"
        )
    return _unique(items)


# --------------------------------------------------------------------------------------------
# VLSafe

_VLSAFE_IMAGE_KEYS = ("image_id", "image", "image_path")
_VLSAFE_PROMPT_KEYS = ("query", "question", "instruction", "prompt")


def load_vlsafe(
    path: str | os.PathLike[str],
    image_dir: str | os.PathLike[str],
    *,
    check_images: bool = True,
    limit: int | None = None,
) -> list[Item]:
    """Load VLSafe (``harmlessness_examine.jsonl`` as published) with its COCO images.

    Each record needs an image (``image_id``, ``image`` or ``image_path``: a file name, looked up in
    ``image_dir`` and in its ``train2017/`` and ``val2017/``, a 2014 name also by its 2017 name) and a
    prompt (``query``, ``question``, ``instruction`` or ``prompt``, or the first user turn of
    ``conversations``/``interaction``).
    Items are ``id=<record id or "vlsafe-<n>">``, ``category="vlsafe"``, with the record's
    ``caption`` (and the raw ``image_id``) in ``meta``.
    """
    img_dir = Path(image_dir)
    if not img_dir.is_dir():
        raise FileFormatError(
            f"{img_dir}: VLSafe image folder does not exist; pass the COCO folder (train2017/ or its parent)"
        )
    items: list[Item] = []
    for n, (where, rec) in enumerate(read_records(path, what="VLSafe file")):
        if limit is not None and len(items) >= limit:
            break
        image_key = next((k for k in _VLSAFE_IMAGE_KEYS if k in rec), None)
        if image_key is None or not isinstance(rec[image_key], str) or not rec[image_key]:
            raise FileFormatError(
                f"{where}: no image key (keys present: {sorted(rec)}); "
                f"each record needs one of {list(_VLSAFE_IMAGE_KEYS)}"
            )
        prompt = _vlsafe_prompt(rec)
        if prompt is None:
            raise FileFormatError(
                f"{where}: no prompt (keys present: {sorted(rec)}); "
                f"each record needs one of {list(_VLSAFE_PROMPT_KEYS)} or a 'conversations' list"
            )
        image = _coco_image(rec[image_key], img_dir)
        if check_images and not Path(image).is_file():
            raise FileFormatError(
                f"{where}: image {rec[image_key]!r} is neither in {img_dir} nor in its train2017/ or val2017/; "
                "pass the COCO folder"
            )
        meta = {"benchmark": "vlsafe", "image_id": rec[image_key]}
        if isinstance(rec.get("caption"), str):
            meta["caption"] = rec["caption"]
        rec_id, category = rec.get("id"), rec.get("category")  # null or "": absent, not the string "None"
        items.append(Item(id=f"vlsafe-{n}" if rec_id in (None, "") else str(rec_id), prompt=prompt, image=image,
                          category=str(category) if category not in (None, "") else "vlsafe", label="harmful",
                          meta=meta, source=where))
    if not items:
        raise FileFormatError(f"{path}: no VLSafe records; is this harmlessness_examine.jsonl?")
    return _unique(items)


def _unique(items: list[Item]) -> list[Item]:
    """``items``, refused when two share an id: a repeated row would count twice in every rate, and paired
    comparisons (text-only vs multimodal, steered vs plain) match items by id."""
    seen: dict[str, Item] = {}
    for it in items:
        if it.id in seen:
            raise FileFormatError(f"{it.source}: duplicate item id {it.id!r} (first at {seen[it.id].source}); drop "
                                  "the repeated record or give it its own id")
        seen[it.id] = it
    return items


_COCO_2014 = re.compile(r"COCO_(?:train|val)2014_(\d{12}\.jpg)")


def _coco_image(name: str, img_dir: Path) -> str:
    """``img_dir/name`` if it exists, else ``img_dir/train2017/name`` (COCO's own layout); a 2014 file name
    (``COCO_train2014_000000000009.jpg``) is also looked up under its 2017 name (``000000000009.jpg``): COCO
    2017 holds the same images, by the same ids."""
    direct = Path(resolve_path(name, img_dir))
    match = _COCO_2014.fullmatch(Path(name).name)
    names = [name, match.group(1)] if match else [name]
    for candidate in (Path(resolve_path(n, folder)) for n in names
                      for folder in (img_dir, img_dir / "train2017", img_dir / "val2017")):
        if candidate.is_file():
            return str(candidate)
    return str(direct)


def _vlsafe_prompt(rec: dict[str, Any]) -> str | None:
    for key in _VLSAFE_PROMPT_KEYS:
        if isinstance(rec.get(key), str) and rec[key].strip():
            return rec[key].replace("<image>", "").strip()
    turns = rec.get("conversations") or rec.get("interaction")
    if isinstance(turns, list) and turns and isinstance(turns[0], dict):
        first = turns[0]
        for key in ("value", "user", "content"):
            if isinstance(first.get(key), str) and first[key].strip():
                return first[key].replace("<image>", "").strip()
    return None


# --------------------------------------------------------------------------------------------
# Format detection

BENCHMARK_FORMATS = ("auto", "jsonl", "mm-safetybench", "figstep", "vlsafe")


def detect_format(path: str | os.PathLike[str]) -> str:
    """Guess a data set's layout: a folder is MM-SafetyBench, a ``.csv`` without a ``prompt`` column FigStep,
    records with ``image_id`` + ``query`` VLSafe, anything else vlmsafe items (JSONL, JSON or CSV)."""
    p = Path(path)
    if p.is_dir():
        return "mm-safetybench"
    if p.suffix.lower() == ".csv" and p.is_file():
        header = next(csv.reader(io.StringIO(read_text(p, fix="save the CSV as UTF-8"))), [])
        return "jsonl" if "prompt" in header else "figstep"  # your own items as a table, or SafeBench
    first = read_records(p)[0][1]
    if "id" not in first and any(k in first for k in _VLSAFE_IMAGE_KEYS[:1]) and _vlsafe_prompt(first) is not None:
        return "vlsafe"
    return "jsonl"


def load_benchmark(
    path: str | os.PathLike[str],
    *,
    format: str = "auto",
    images: str | os.PathLike[str] | None = None,
    image_types: Sequence[str] | None = None,
    render_missing: bool = False,
    require_label: bool = True,
) -> list[Item]:
    """Load any supported evaluation set; ``format="auto"`` uses :func:`detect_format`.

    ``images`` is the image folder FigStep and VLSafe need (MM-SafetyBench: the image root,
    default ``<path>/imgs``). vlmsafe JSONL items must carry a ``label`` unless ``require_label=False``.
    ``image_types`` (MM-SafetyBench only; default ``SD_TYPO``) and ``render_missing`` (FigStep only)
    are refused for other formats rather than ignored.
    """
    from vlmsafe.data import load_items

    if format not in BENCHMARK_FORMATS:
        raise InputError(f"unknown data format {format!r}; use one of {', '.join(BENCHMARK_FORMATS)}")
    fmt = detect_format(path) if format == "auto" else format
    for given, option, owner in ((image_types is not None, "`image_types`", "mm-safetybench"),
                                 (render_missing, "`render_missing`", "figstep")):
        if given and fmt != owner:
            raise InputError(f"{option} applies to {owner} data, but {path} is {fmt} data; remove {option}")
    if fmt == "jsonl":
        return load_items(path, require_label=require_label, check_images="verify")
    if fmt == "mm-safetybench":
        types = ["SD_TYPO"] if image_types is None else [t.strip().upper() for t in image_types if t.strip()]
        return load_mm_safetybench(path, image_types=types, image_root=images)
    if images is None:
        raise InputError(f"{fmt} data needs `images`, the image folder: "
                         + ("the folder of query_*_6.png images, or where to render them" if fmt == "figstep"
                            else "the COCO folder"))
    if fmt == "figstep":
        return load_figstep(path, images, render_missing=render_missing)
    return load_vlsafe(path, images)
