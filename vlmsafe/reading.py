"""Reading files: JSON documents with ``file:line:column`` errors, the marked blocks of generated docs, and sha256.

* :func:`read_json` / :func:`parse_json`: the one place JSON documents are parsed, with errors that say
  ``file:line:column: problem; fix``; :func:`json_text` writes them back. :func:`read_text`: the one decoder of
  users' text files (UTF-8, a byte-order mark dropped).
* :func:`marked_block` / :func:`replace_marked_block`: the one writer of generated blocks (the README's demo and
  support tables, the methods page's comparison table) between their markers.
* :func:`sha256_file`: provenance of inputs (checkpoints, vectors) in saved artefacts.

Writing goes through :mod:`vlmsafe.io` (the output policy, atomic replacement).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from vlmsafe.errors import FileFormatError
from vlmsafe.io import write_text_atomic


def json_text(obj: Any, *, indent: int | None = 2) -> str:
    """``obj`` as strict JSON, every non-finite float written as ``null`` (a bare ``NaN`` is not JSON: other
    readers reject it)."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


# --------------------------------------------------------------------------- reading
def marked_block(path: str | os.PathLike[str], start: str, end: str) -> tuple[str, str]:
    """The text of ``path`` before the ``start`` marker and after the ``end`` marker.

    Raises :class:`FileFormatError` naming the missing markers (a command that will write the block checks
    this before its work).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{p}: cannot read it ({exc}); give an existing UTF-8 document") from None
    if start not in text or end not in text.split(start, 1)[1]:
        raise FileFormatError(f"{p} has no {start} ... {end} block; add the two markers where the block goes")
    head, rest = text.split(start, 1)
    return head, rest.split(end, 1)[1]


def replace_marked_block(path: str | os.PathLike[str], start: str, end: str, block: str) -> None:
    """Replace the text from the ``start`` marker to the ``end`` marker of ``path`` by ``block`` (which carries
    both markers), atomically: the one writer of generated document blocks (the README's demo and support
    tables, the docs' comparison table), so a figure is never typed by hand. Nothing is written when the
    markers are missing (:func:`marked_block`)."""
    head, tail = marked_block(path, start, end)
    write_text_atomic(path, head + block + tail, overwrite=True)


def read_json(path: str | os.PathLike[str], *, what: str = "JSON file", fix: str | None = None) -> Any:
    """Parse the JSON document at ``path``.

    Raises :class:`FileFormatError` as ``"<path>:<line>:<col>: invalid JSON (<msg>); <fix>"`` for a
    malformed file and ``"<path>: no such <what>; <fix>"`` for a missing one.
    """
    p = Path(path)
    fix = fix or f"pass the path of a valid {what}"
    if not p.is_file():
        raise FileFormatError(f"{p}: no such {what}" + (" (it is a directory)" if p.is_dir() else "") + f"; {fix}")
    return parse_json(read_text(p, fix=fix), where=str(p), fix=fix)


def read_text(path: str | os.PathLike[str], *, fix: str) -> str:
    """The text of the UTF-8 file at ``path``, without the byte-order mark Notepad, PowerShell and Excel's "CSV
    UTF-8" put first (read as content it would be part of the first key, column name or caption).

    The one decoder of the data files users write (records, CSVs, caption lists, JSON documents); the caller
    checks the file exists. Raises :class:`FileFormatError` as ``"<path>: not UTF-8 text (<reason>); <fix>"``.
    """
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{p}: not UTF-8 text ({exc.reason}); {fix}") from None


def parse_json(text: str, *, where: str, fix: str, line: int | None = None) -> Any:
    """``json.loads`` with the location format of :func:`read_json` (``where:line:col``); ``line``: ``text`` is
    that line of the file named by ``where`` (a JSONL record), so the location is ``where:line:col``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        lineno = exc.lineno if line is None else line + exc.lineno - 1
        raise FileFormatError(f"{where}:{lineno}:{exc.colno}: invalid JSON ({exc.msg}); {fix}") from None
    except RecursionError:  # Python's parser recurses once per level: ~1000 nested lists or objects exhaust it
        raise FileFormatError(f"{where}:{line or 1}: JSON nested too deeply to read (over "
                              f"{sys.getrecursionlimit()} levels of lists or objects); {fix}") from None
    except ValueError as exc:  # not a JSONDecodeError: an integer of more digits than Python converts
        raise FileFormatError(f"{where}:{line or 1}: invalid JSON ({exc}); {fix}") from None


# --------------------------------------------------------------------------- hashing
def sha256_file(path: str | os.PathLike[str], block: int = 8 << 20) -> str:
    """Hex sha256 of a file, read in ``block``-byte chunks (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()
