"""Small I/O helpers: atomic writes, so an interrupted run never leaves a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and directories: write into the yielded path, and on success it replaces the
    destination in one ``os.replace`` (an existing directory destination is swapped out first).
    On error the temporary is removed and the destination is left untouched.
    """
    dest = Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{os.getpid()}-", suffix=".tmp", dir=dest.parent))
    target = tmp / dest.name
    try:
        yield target
        if dest.is_dir() and not dest.is_symlink():
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


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
