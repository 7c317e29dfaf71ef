"""Reading a data file's records, whatever layout the user saved them in: the one reader of every record file.

:func:`read_records` reads JSONL, pretty-printed objects one after another, a JSON list of records,
``{"data": [...]}`` or any one-key wrapper of the list, an ``{id: record}`` mapping and CSV, and reports every
problem as ``file:line: problem; fix``. Every reader in vlmsafe (evaluation sets, benchmark loaders,
Safe-CLIP quadruplets and pairs, testbed splits) goes through it; what a record must hold is the caller's
business (:func:`vlmsafe.data.load_items` for items).
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmsafe.errors import FileFormatError
from vlmsafe.reading import parse_json, read_text

#: ``(location, record)``: location is ``"path:line"`` (JSON documents: the line the record starts on).
Record = tuple[str, dict]
_JSON_WHITESPACE = " \t\n\r"  # what the JSON grammar (and the json module) skips around values


def read_records(path: str | os.PathLike[str], *, what: str = "data file",
                 key_field: str | None = None) -> list[Record]:
    """Read the records of a JSONL, JSON or CSV file as ``(location, dict)`` pairs.

    Accepted layouts: JSONL (one object per line, blank lines skipped; a UTF-8 byte-order mark is ignored),
    pretty-printed objects one after another (``jq``'s output), a JSON list of objects,
    ``{"data": <list or mapping>}``, an object whose one key holds the list of records (``{"items": [...]}``),
    and an ``{id: record}`` mapping (ViSU-Text), read in id order; a ``.csv`` (``.tsv``) file is a table
    with a header row, a cell left empty a key left out.
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
    delimiter = _CSV_DELIMITERS.get(p.suffix.lower())
    text = read_text(p, fix=f"save the {what} as UTF-8 {'CSV' if delimiter else 'JSONL'}")
    stripped = text.lstrip()
    add = "add a header row and one row per record" if delimiter else "add one JSON object per line"
    if not stripped:
        raise FileFormatError(f"{p}: {what} is empty; {add}")
    if delimiter is not None:
        records = _csv_records(text, p, delimiter)
    elif stripped[0] in "[{" and _is_single_document(text):
        records = _document_records(text, p, key_field)
    elif stripped[0] == "{" and not _first_line_complete(stripped):
        records = _stream_records(text, p)
    else:
        records = _jsonl_records(text, p)
    if not records:
        raise FileFormatError(f"{p}: {what} holds no records; {add}")
    return records


#: Record files read as tables with a header row, by suffix: the delimiter.
_CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}


def _csv_records(text: str, p: Path, delimiter: str) -> list[Record]:
    """The rows of a table with a header row, as records located at the line each row ends on.

    A cell left empty is a key left out: CSV has no null, and a spreadsheet's empty ``image`` cell means a
    text-only item, an empty ``reference`` no reference answer -- not an image path "" or a reference "".
    """
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    out: list[Record] = []
    try:
        for row in reader:
            where = f"{p}:{reader.line_num}"
            if None in row:
                raise FileFormatError(f"{where}: {len(row) - 1 + len(row[None])} cells under "
                                      f"{len(reader.fieldnames or [])} columns; quote a cell that holds a "
                                      f"{'tab' if delimiter == chr(9) else 'comma'}, or drop the extra cells")
            out.append((where, {k: v for k, v in row.items() if v not in (None, "")}))
    except csv.Error as exc:
        raise FileFormatError(f"{p}:{reader.line_num}: not a readable table ({exc}); save it as CSV with a "
                              "header row") from None
    return out


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


def _first_line_complete(text: str) -> bool:
    """True when the first line of ``text`` is a JSON value on its own (JSONL), not the start of one."""
    try:
        json.loads(text.split("\n", 1)[0])
    except (ValueError, RecursionError):
        return False
    return True


def _stream_records(text: str, p: Path) -> list[Record]:
    """Objects written one after another, each over several lines: ``jq``'s default output, a JSONL file
    pretty-printed. Read as the records they are, each located at the line it starts on."""
    decoder = json.JSONDecoder()
    out: list[Record] = []
    i, n, line = 0, len(text), 1
    while True:
        start = i
        while i < n and text[i] in _JSON_WHITESPACE:
            i += 1
        line += text.count("\n", start, i)
        if i >= n:
            return out
        try:
            rec, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{p}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg}); write one complete "
                                  "JSON object per line (jq -c . turns pretty-printed objects into lines)") from None
        except (ValueError, RecursionError):  # too deep or too long a number: parse_json names it
            parse_json(text[i:], where=str(p), line=line, fix="write one complete JSON object per line")
            raise
        if not isinstance(rec, dict):
            raise FileFormatError(
                f"{p}:{line}: expected a JSON object, got {json_type(rec)}; write one object per line"
            )
        out.append((f"{p}:{line}", rec))
        line += text.count("\n", i, end)
        i = end


def _jsonl_records(text: str, p: Path) -> list[Record]:
    out: list[Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        rec = parse_json(line, where=str(p), line=lineno, fix="each line must be one complete JSON object")
        if not isinstance(rec, dict):
            raise FileFormatError(
                f"{p}:{lineno}: expected a JSON object, got {json_type(rec)}; write one object per line"
            )
        out.append((f"{p}:{lineno}", rec))
    return out


def _document_records(text: str, p: Path, key_field: str | None = None) -> list[Record]:
    data = parse_json(text, where=str(p), fix="fix the JSON, or write JSONL (one object per line)")
    lines = _top_level_lines(text)
    if isinstance(data, dict) and isinstance(data.get("data"), (list, dict)) and len(data) <= 2:
        data = data["data"]
        lines = {}
    elif isinstance(data, dict) and len(data) == 1 and is_record_list(next(iter(data.values()))):
        data = next(iter(data.values()))  # {"items": [...]}, {"examples": [...]}: the records under their one key
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
            f"{p}:1: expected JSONL records or a JSON list of objects, got {json_type(data)}"
        )
    out: list[Record] = []
    starts = _list_item_lines(text)
    for i, rec in enumerate(data):
        line = starts[i] if i < len(starts) else 1
        if not isinstance(rec, dict):
            raise FileFormatError(
                f"{p}:{line}: entry {i} is {json_type(rec)}, not a JSON object; make every entry an object"
            )
        out.append((f"{p}:{line}", rec))
    return out


def json_type(value: Any) -> str:
    """What a parsed value is, in the words of JSON (``null``, not ``NoneType``): messages about a user's file."""
    names = {type(None): "null", bool: "true/false", int: "a number", float: "a number", list: "a list",
             dict: "an object", str: "a string"}
    return names.get(type(value), type(value).__name__)


def is_record_list(value: Any) -> bool:
    """A non-empty list of JSON objects: what a wrapper's key holds when it holds the records."""
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


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
