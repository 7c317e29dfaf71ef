"""File-system primitives every vlmsafe writer and reader shares.

* **Output policy** (:func:`check_output`, :func:`atomic_path`): a command never deletes or empties
  what it did not create. An existing non-empty output directory, an existing output file, or a
  file where a directory is wanted (and the reverse) is refused *before any work* unless the caller
  passes ``overwrite=True`` (the CLI's ``--overwrite``); then the new output replaces the old one in
  one atomic rename, so an interrupted run never leaves a half-written output.
* **Reading** (:func:`read_json`): the one place JSON documents are parsed, with errors that say
  ``file:line:column: problem; fix``.
* **Hashing** (:func:`sha256_file`): provenance of inputs (checkpoints, vectors) in saved artefacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from vlmsafe.errors import FileFormatError, InputError, OutputExistsError

OutputKind = Literal["dir", "file"]


# --------------------------------------------------------------------------- output policy
def check_output(
    path: str | os.PathLike[str],
    *,
    kind: OutputKind,
    overwrite: bool = False,
    option: str = "--out",
    inputs: Iterable[tuple[str, str | os.PathLike[str] | None]] = (),
) -> Path:
    """Validate an output destination before any work is done; return it as a :class:`Path`.

    Allowed without ``overwrite``: a path that does not exist, or (``kind="dir"``) an empty
    directory. Refused unless ``overwrite``: a non-empty directory, an existing file, a file where a
    directory is wanted and the reverse. Always refused: the current directory or one of its
    parents, the file-system root or the home directory (replacing them cannot be what anyone means),
    a destination whose parent is a file, one that is, holds or lies inside one of ``inputs``
    (``(option, path)`` pairs; ``--overwrite`` would otherwise replace the command's own input), and
    one in a folder this process cannot write in (found now, not after the work).

    Raises:
        OutputExistsError: naming the path, what is there, and the fix (``--overwrite`` / another path).
        InputError: the destination overlaps an input or cannot be written.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    dest = Path(os.path.expanduser(os.fspath(path)))
    if not os.fspath(path) or not str(dest).strip():
        raise OutputExistsError(f"{option}: empty path; pass a new {_noun(kind)} name")
    resolved = dest.resolve()
    protected = {Path(resolved.anchor), Path.home().resolve(), *Path.cwd().resolve().parents, Path.cwd().resolve()}
    if resolved in protected:
        raise OutputExistsError(
            f"{option} {os.fspath(path)!r} is the current, home or root directory (or a parent of the current one); "
            f"pass a new {_noun(kind)} name such as ./out"
        )
    parent = resolved.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputExistsError(
            f"{option} {os.fspath(path)!r}: {parent} is a file, not a directory; choose another path"
        )
    check_no_overlap(dest, inputs, option=option)
    _check_writable(parent, path, option)
    if not dest.exists() and not dest.is_symlink():
        return dest
    if overwrite:
        return dest
    fix = f"pass --overwrite to replace it, or choose another {option} path"
    if dest.is_dir() and not dest.is_symlink():
        if kind == "dir" and not any(dest.iterdir()):
            return dest
        what = "a non-empty directory" if kind == "dir" else "a directory (a file is written here)"
    else:
        what = "an existing file" if kind == "file" else "a file (a directory is written here)"
    raise OutputExistsError(f"{option} {os.fspath(path)!r} is {what}; {fix}")


def check_no_overlap(
    output: str | os.PathLike[str],
    inputs: Iterable[tuple[str, str | os.PathLike[str] | None]],
    *,
    option: str = "--out",
) -> None:
    """Refuse an output that is, holds or lies inside one of ``inputs`` (``(option, path)``; ``None`` skipped):
    writing it would replace or mix into what the command reads."""
    out = Path(os.path.expanduser(os.fspath(output))).resolve()
    for role, p in inputs:
        if p is None:
            continue
        p = Path(os.path.expanduser(os.fspath(p))).resolve()
        if out == p or out in p.parents or p in out.parents:
            raise InputError(f"{option} {os.fspath(output)} overlaps the {role} input {p}; choose another output path")


def _check_writable(folder: Path, path: str | os.PathLike[str], option: str) -> None:
    """Create and remove a temporary directory in ``folder`` (the nearest existing one above the output): the
    only reliable test (``os.access`` says yes to root on a read-only or immutable folder)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".vlmsafe-write-check-", dir=folder))
    except OSError as exc:
        raise InputError(
            f"{option} {os.fspath(path)!r}: cannot write in {folder} ({exc.strerror or exc}); "
            "choose a writable location"
        ) from None


def _noun(kind: OutputKind) -> str:
    return "directory" if kind == "dir" else "file"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and directories: write into the yielded path (``mkdir`` it for a directory).
    On success it replaces the destination in one ``os.replace``; on error the temporary is removed
    and the destination is left untouched. An existing destination is replaced only when it is an
    empty directory or ``overwrite=True`` (checked before the block runs, so nothing is computed
    for nothing); otherwise :class:`~vlmsafe.errors.OutputExistsError` is raised.
    """
    dest = Path(path)
    exists = dest.exists() or dest.is_symlink()
    if exists and not overwrite and not (dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())):
        kind = "a non-empty directory" if dest.is_dir() else "an existing file"
        raise OutputExistsError(
            f"{dest} is {kind}; pass overwrite=True (--overwrite) to replace it, or choose another path"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}-", suffix=".tmp", dir=dest.parent))
    target = tmp / dest.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(
                f"nothing was written to the temporary {target}; write the output inside the block"
            )
        if (dest.is_dir() and not dest.is_symlink()) or (dest.exists() and target.is_dir() != dest.is_dir()):
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}-", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(target, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove_orphans(dest: Path) -> None:
    """Delete temporaries a killed writer of ``dest`` left behind (``.NAME.<pid>-*.tmp|.old``).

    Only entries whose writer process no longer exists are removed, so a concurrent writer's
    temporary is never touched.
    """
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)-[^/]*\.(tmp|old)$")
    for entry in dest.parent.iterdir():
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


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


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, overwrite: bool = False) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text_atomic(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- reading
def read_json(path: str | os.PathLike[str], *, what: str = "JSON file", fix: str | None = None) -> Any:
    """Parse the JSON document at ``path``.

    Raises :class:`FileFormatError` as ``"<path>:<line>:<col>: invalid JSON (<msg>); <fix>"`` for a
    malformed file and ``"<path>: no such <what>; <fix>"`` for a missing one.
    """
    p = Path(path)
    fix = fix or f"pass the path of a valid {what}"
    if not p.is_file():
        raise FileFormatError(f"{p}: no such {what}" + (" (it is a directory)" if p.is_dir() else "") + f"; {fix}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{p}: not UTF-8 text ({exc.reason}); {fix}") from None
    return parse_json(text, where=str(p), fix=fix)


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
