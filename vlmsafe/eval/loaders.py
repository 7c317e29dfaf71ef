"""Loaders for public multimodal-safety benchmarks, in the layouts their authors distribute.

Each loader returns :class:`~vlmsafe.eval.data.EvalItem` lists (all labelled ``"harmful"``: these
benchmarks contain only requests a safe model should decline) and raises
:class:`~vlmsafe.errors.FileFormatError` naming the file, the line/entry/key and the problem when a
file does not have the expected layout. Nothing is downloaded: point them at your local copy.

* MM-SafetyBench (Liu et al., ECCV 2024)::

      <root>/processed_questions/01-Illegal_Activitiy.json   {"0": {"Question": ..., "Rephrased Question": ...,
                                                             "Rephrased Question(SD)": ..., "Key Phrase": ...}, ...}
      <root>/imgs/01-Illegal_Activitiy/{SD,SD_TYPO,TYPO}/0.jpg

  Each image type is paired with the text its authors use: ``SD`` with
  ``"Rephrased Question(SD)"``, ``SD_TYPO`` and ``TYPO`` with ``"Rephrased Question"``; the extra
  type ``TEXT`` gives the original ``"Question"`` without an image (the text-only baseline).
* FigStep / SafeBench (Gong et al., 2023): ``question/safebench.csv`` with columns
  ``dataset,category_id,task_id,category_name,question,instruction`` and images
  ``images/SafeBench/query_<dataset>_<category_id>_<task_id>_6.png``. Missing images (the public
  repository ships only SafeBench-Tiny's) can be rendered with :func:`render_typographic`.
* VLSafe (Chen et al., 2023, "DRESS"): JSONL (or a JSON list) of ``{"image_id": <COCO file>,
  "query": ...}``; images are read from a COCO folder.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from vlmsafe.errors import FileFormatError
from vlmsafe.data import Item as EvalItem
from vlmsafe.data import resolve_path
from vlmsafe.eval.figstep import FIGSTEP_PROMPT, render_typographic

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
) -> list[EvalItem]:
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
            raise FileFormatError(
                f"{str(root_p)!r} has no 'processed_questions' folder; pass the MM-SafetyBench data folder "
                "(the one containing processed_questions/ and imgs/)."
            )
    bad = [t for t in image_types if t not in MMSB_QUESTION_FIELDS]
    if bad or not image_types:
        raise ValueError(f"image_types must be a non-empty subset of {list(MMSB_QUESTION_FIELDS)}, got {list(image_types)}")
    img_root = Path(image_root) if image_root is not None else root_p / "imgs"
    files = sorted(qdir.glob("*.json"))
    if not files:
        raise FileFormatError(f"{str(qdir)!r} contains no .json files; it should hold one <scenario>.json per scenario.")
    if scenarios is not None:
        wanted = {_scenario_key(s): s for s in scenarios}
        available = {_scenario_key(f.stem): f for f in files}
        missing = [s for k, s in wanted.items() if k not in available]
        if missing:
            raise FileFormatError(f"scenario(s) {missing} not found in {str(qdir)!r}; available: {[f.stem for f in files]}.")
        files = [available[k] for k in wanted]

    items: list[EvalItem] = []
    for path in files:
        scenario = path.stem
        entries = _read_json(path)
        if not isinstance(entries, dict):
            raise FileFormatError(f"{path}: expected a JSON object mapping question ids to entries, got {type(entries).__name__}.")
        for qid in sorted(entries, key=_numeric_key):
            entry = entries[qid]
            if not isinstance(entry, dict):
                raise FileFormatError(f"{path}: entry {qid!r}: expected an object, got {type(entry).__name__}.")
            for itype in image_types:
                field = MMSB_QUESTION_FIELDS[itype]
                text = entry.get(field)
                if not isinstance(text, str) or not text.strip():
                    raise FileFormatError(
                        f"{path}: entry {qid!r}: key {field!r} (needed for image type {itype}) is "
                        f"{'missing' if field not in entry else 'empty or not a string'}; keys present: {sorted(entry)}."
                    )
                image = None
                if itype != "TEXT":
                    image = str((img_root / scenario / itype / f"{qid}.jpg").resolve())
                    if check_images and not Path(image).is_file():
                        raise FileFormatError(
                            f"{path}: entry {qid!r}: image {image!r} does not exist; download the MM-SafetyBench images "
                            "into <root>/imgs (or pass image_root=...), or choose other image_types."
                        )
                items.append(
                    EvalItem(
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
                    )
                )
    return items


def _scenario_key(name: str) -> str:
    return re.sub(r"^\d+[-_]", "", name).lower()


def _numeric_key(qid: str) -> tuple[int, int | str]:
    return (0, int(qid)) if qid.isdigit() else (1, qid)


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileFormatError(f"{str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}).") from exc
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{path}: not UTF-8 text ({exc.reason}); is this the right file?") from exc


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
) -> list[EvalItem]:
    """Load FigStep's SafeBench CSV with its typographic images.

    Args:
        csv_path: ``safebench.csv`` or ``SafeBench-Tiny.csv``.
        image_dir: folder with ``query_<dataset>_<category_id>_<task_id>_6.png``.
        render_missing: render images that are absent into ``image_dir`` with
            :func:`render_typographic` instead of failing (the public repo ships only part of them).
        size: canvas size used when rendering.
        prompt: the text prompt paired with every image (FigStep's by default).
        categories: keep only these ``category_name`` values.

    Items are ``id="<dataset>_<category_id>_<task_id>"``, ``category=<category_name>``; the
    plain ``question`` (the text-only baseline) and ``instruction`` are in ``meta``.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise FileFormatError(f"FigStep CSV {str(path)!r} does not exist; pass data/question/safebench.csv of the FigStep repository.")
    img_dir = Path(image_dir)
    keep = set(categories) if categories is not None else None
    items: list[EvalItem] = []
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in FIGSTEP_COLUMNS if c not in header]
        if missing:
            raise FileFormatError(f"{path}, line 1: missing column(s) {missing}; a SafeBench CSV has columns {list(FIGSTEP_COLUMNS)} (found {header}).")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if None in row or any(row.get(c) is None for c in FIGSTEP_COLUMNS):
                raise FileFormatError(f"{where}: expected {len(header)} fields, got a row of a different length (unquoted comma?).")
            for col in FIGSTEP_COLUMNS:
                if not row[col].strip():
                    raise FileFormatError(f"{where}: column {col!r} is empty.")
            if keep is not None and row["category_name"] not in keep:
                continue
            ds, cid, tid = row["dataset"].strip(), row["category_id"].strip(), row["task_id"].strip()
            image = img_dir / figstep_image_name(ds, cid, tid)
            if not image.is_file():
                if not render_missing:
                    raise FileFormatError(
                        f"{where}: image {str(image)!r} does not exist; point image_dir at FigStep's images, or pass "
                        "render_missing=True (--render-missing) to render it."
                    )
                img_dir.mkdir(parents=True, exist_ok=True)
                render_typographic(row["instruction"], size).save(image)
            items.append(
                EvalItem(
                    id=f"{ds}_{cid}_{tid}",
                    prompt=prompt,
                    image=str(image.resolve()),
                    category=row["category_name"].strip(),
                    label="harmful",
                    meta={"benchmark": "figstep", "question": row["question"], "instruction": row["instruction"]},
                )
            )
    if not items:
        raise FileFormatError(f"{path}: no rows{' in the requested categories' if keep is not None else ''}.")
    return items


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
) -> list[EvalItem]:
    """Load VLSafe (e.g. ``harmlessness_examine.jsonl``) with its COCO images.

    Accepts JSONL or a JSON list. Each record needs an image (``image_id``, ``image`` or
    ``image_path``: a file name under ``image_dir``) and a prompt (``query``, ``question``,
    ``instruction`` or ``prompt``, or the first user turn of ``conversations``/``interaction``).
    Items are ``id=<record id or "vlsafe-<n>">``, ``category="vlsafe"``.
    """
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"VLSafe file {str(p)!r} does not exist.")
    text = p.read_text(encoding="utf-8")
    records: list[tuple[str, Any]] = []
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{p}, line {exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}).") from exc
        records = [(f"{p}, entry {i}", rec) for i, rec in enumerate(data)]
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{p}, line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise FileFormatError(f"{p}, line {lineno}: invalid JSON ({exc.msg} at column {exc.colno}).") from exc
    img_dir = Path(image_dir)
    items: list[EvalItem] = []
    for n, (where, rec) in enumerate(records):
        if limit is not None and len(items) >= limit:
            break
        if not isinstance(rec, dict):
            raise FileFormatError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
        image_key = next((k for k in _VLSAFE_IMAGE_KEYS if k in rec), None)
        if image_key is None or not isinstance(rec[image_key], str) or not rec[image_key]:
            raise FileFormatError(f"{where}: no image key; expected one of {list(_VLSAFE_IMAGE_KEYS)} (keys present: {sorted(rec)}).")
        prompt = _vlsafe_prompt(rec)
        if prompt is None:
            raise FileFormatError(
                f"{where}: no prompt; expected one of {list(_VLSAFE_PROMPT_KEYS)} or a 'conversations' list (keys present: {sorted(rec)})."
            )
        image = resolve_path(rec[image_key], img_dir)
        if check_images and not Path(image).is_file():
            raise FileFormatError(f"{where}: key {image_key!r}: image {image!r} does not exist; pass the COCO image folder as image_dir.")
        items.append(
            EvalItem(
                id=str(rec.get("id", f"vlsafe-{n}")),
                prompt=prompt,
                image=image,
                category=str(rec.get("category", "vlsafe")),
                label="harmful",
                meta={"benchmark": "vlsafe"},
            )
        )
    if not items:
        raise FileFormatError(f"{p}: no records.")
    return items


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
