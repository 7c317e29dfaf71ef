"""File-system primitives every vlmsafe writer and reader shares.

* **Output policy** (:func:`check_output`, :func:`atomic_path`): a command never deletes or empties
  what it did not create. An existing non-empty output directory, an existing output file, or a
  file where a directory is wanted (and the reverse) is refused *before any work* unless the caller
  passes ``overwrite=True`` (the CLI's ``--overwrite``); then the new output replaces the old one in
  one atomic rename, so an interrupted run never leaves a half-written output. One run at a time
  owns an output (a lock file beside it), so a dead run's temporaries are recognised without trusting
  process ids; paths (links, loops, name lengths) are checked before the work; outputs get the umask's
  permissions; a full disk is one line (:class:`~vlmsafe.errors.OutputWriteError`).
* **Reading** (:func:`read_json`): the one place JSON documents are parsed, with errors that say
  ``file:line:column: problem; fix``.
* **Hashing** (:func:`sha256_file`): provenance of inputs (checkpoints, vectors) in saved artefacts.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from vlmsafe.errors import (
    FileFormatError,
    InputError,
    OutputBusyError,
    OutputExistsError,
    OutputWriteError,
    VlmsafeError,
)

try:
    import fcntl
except ImportError:  # not POSIX: outputs are written unlocked (and no temporary is ever swept)
    fcntl = None  # type: ignore[assignment]

OutputKind = Literal["dir", "file"]


# --------------------------------------------------------------------------- output policy
#: errno values of a write that failed for want of room or of a writable file system: reported as one line
#: (:class:`~vlmsafe.errors.OutputWriteError`), not as a traceback.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
#: The same failures as libraries that wrap the errno in their own exception word them (safetensors: Rust's
#: ``StorageFull``; "No space left on device" from anything that keeps strerror).
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28", "os error 122")
#: Temporaries and lock files are named ``.<tag>.vlmsafe-...`` after the output's name; a name longer than this
#: many bytes is shortened to its start plus a hash, so the hidden names fit where the output's own name fits.
_TAG_MAX = 200
_LOCK_SUFFIX = ".vlmsafe-lock"


def check_output(
    path: str | os.PathLike[str],
    *,
    kind: OutputKind,
    overwrite: bool = False,
    option: str = "`out`",
    inputs: Iterable[tuple[str, str | os.PathLike[str] | None]] = (),
) -> Path:
    """Validate an output destination before any work is done; return it as a :class:`Path`.

    Allowed without ``overwrite``: a path that does not exist, or (``kind="dir"``) an empty
    directory. Refused unless ``overwrite``: a non-empty directory, an existing file, a file where a
    directory is wanted and the reverse. Always refused: the current directory or one of its
    parents, the file-system root or the home directory (replacing them cannot be what anyone means),
    a destination whose parent is a file, one that is, holds or lies inside one of ``inputs``
    (``(option, path)`` pairs; ``--overwrite`` would otherwise replace the command's own input), one in
    a folder this process cannot write in, a symbolic-link loop, a dangling link, a name longer than the
    file system allows (all found now, not after the work) and an output another vlmsafe run is writing.

    A destination that is a symbolic link is written at the link's target (as ``cp`` and ``open`` do).
    ``option`` names the destination in messages: the caller's parameter in backticks (```out_dir```), which
    the command line shows as the flag that sets it (:func:`vlmsafe.cli.options.flags_for_parameters`).

    Ownership: the output's lock (``.NAME.vlmsafe-lock`` beside it, see :func:`atomic_path`) is taken now,
    so of two runs started together on one output exactly one goes on and the other stops before its work.
    Inside :func:`hold_outputs` (the CLI runs every command in one) the lock is kept until the output's
    :func:`atomic_path` finishes or the scope ends; outside one it is only tested (a library call has no
    run whose end would release it). Processes of a distributed launch other than rank 0 do not take it.

    Raises:
        OutputExistsError: naming the path, what is there, and the fix (``overwrite=True`` / another path).
        OutputBusyError: another vlmsafe run is writing this output.
        InputError: the destination overlaps an input, cannot be written, or its path is unusable.
    """
    if kind not in ("dir", "file"):
        raise InputError(f"kind must be 'dir' or 'file', got {kind!r}; pass kind='dir' for a folder output or "
                         "kind='file' for a single file")
    shown = os.fspath(path)
    dest = Path(os.path.expanduser(shown))
    if not shown or not str(dest).strip():
        raise OutputExistsError(f"{option}: empty path; pass a new {_noun(kind)} name")
    resolved = _resolve_output(dest, option=option, shown=shown)
    protected = {Path(resolved.anchor), Path.home().resolve(), *Path.cwd().resolve().parents, Path.cwd().resolve()}
    if resolved in protected:
        raise OutputExistsError(
            f"{option} {shown!r} is the current, home or root directory (or a parent of the current one); "
            f"pass a new {_noun(kind)} name such as ./out"
        )
    parent = _nearest_existing(resolved.parent)
    if not os.path.isdir(parent):
        raise OutputExistsError(f"{option} {shown!r}: {parent} is a file, not a directory; choose another path")
    _check_name_lengths(resolved, parent, option=option, shown=shown)
    check_no_overlap(dest, inputs, option=option)
    _check_writable(parent, path, option)
    claim, new = (None, False) if _launch_rank() else _claim(resolved, shown=shown, fix=f"choose another {option}")
    try:
        if claim is not None and claim.fd is not None:
            _remove_orphans(resolved)
        _refuse_existing(resolved, kind=kind, overwrite=overwrite, option=option, shown=shown, link=dest)
    except BaseException:
        if new:
            _release(claim)
        raise
    if new and not _SCOPE_DEPTH:
        _release(claim)
    return dest


def _refuse_existing(
    dest: Path, *, kind: OutputKind, overwrite: bool, option: str, shown: str, link: Path
) -> None:
    """The existing-output part of :func:`check_output` (``dest`` resolved; ``link``: the path as given)."""
    if not os.path.lexists(dest) or overwrite:
        return
    fix = f"pass `overwrite=True` to replace it, or choose another {option} path"
    where = f"{shown!r} (a link to {dest})" if os.path.islink(link) else repr(shown)
    if dest.is_dir():
        if kind == "dir" and not any(dest.iterdir()):
            return
        what = "a non-empty directory" if kind == "dir" else "a directory (a file is written here)"
    else:
        what = "an existing file" if kind == "file" else "a file (a directory is written here)"
    raise OutputExistsError(f"{option} {where} is {what}; {fix}")


def check_no_overlap(
    output: str | os.PathLike[str],
    inputs: Iterable[tuple[str, str | os.PathLike[str] | None]],
    *,
    option: str = "`out`",
) -> None:
    """Refuse an output that is, holds or lies inside one of ``inputs`` (``(option, path)``; ``None`` skipped):
    writing it would replace or mix into what the command reads."""
    out = Path(os.path.realpath(os.path.expanduser(os.fspath(output))))  # realpath: a link loop is not an error here
    for role, p in inputs:
        if p is None:
            continue
        p = Path(os.path.realpath(os.path.expanduser(os.fspath(p))))
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


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 4:]}"


def _nearest_existing(folder: Path) -> Path:
    """``folder`` or its nearest existing parent (``os.path.exists``: a name too long is just "not there")."""
    while not os.path.exists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _resolve_output(dest: Path, *, option: str, shown: str) -> Path:
    """``dest`` with every symbolic link resolved: where the output really goes.

    Found here, before the work, rather than by the final rename: a link loop and a dangling link (the
    output itself or one of its folders; ``cp`` refuses to write through one too)."""
    try:
        os.stat(dest)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise InputError(
                f"{option} {shown!r}: a symbolic link loop (a link that leads back to itself); remove or fix the "
                "link, or choose another path"
            ) from None
        if exc.errno == errno.ENOENT:
            full = Path(os.path.abspath(dest))
            for entry in (full, *full.parents):
                if os.path.islink(entry) and not os.path.exists(entry):
                    raise InputError(
                        f"{option} {shown!r}: {entry} is a symbolic link to {os.readlink(entry)}, which does not "
                        "exist (a dangling link); create its target, remove the link, or choose another path"
                    ) from None
                if os.path.exists(entry):
                    break
        # ENOTDIR (a folder on the way is a file), ENAMETOOLONG, EACCES: reported by the checks that follow
    return Path(os.path.realpath(dest))


def _check_name_lengths(dest: Path, existing: Path, *, option: str, shown: str) -> None:
    """Refuse a name (the output's, or a folder still to be created) longer than the file system allows, and a
    path longer than the system's limit: the rename at the end of the work would fail on them."""
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    try:
        path_max = os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError):
        path_max = 4096
    part = dest
    while part != existing and part != part.parent:
        size = len(os.fsencode(part.name))
        if size > name_max:
            raise InputError(
                f"{option} {_short(shown)!r}: the name {_short(part.name)!r} is {size} bytes, longer than the "
                f"{name_max} this file system allows; choose a shorter name"
            )
        part = part.parent
    if len(os.fsencode(str(dest))) + 32 >= path_max:  # + the temporary folder's name around the output
        raise InputError(
            f"{option} {_short(shown)!r}: the path is {len(os.fsencode(str(dest)))} bytes, too long for this system "
            f"(limit {path_max}, with room for a temporary name); choose a shorter path"
        )


def _tag(name: str) -> str:
    """The part of the hidden names (temporaries, lock) that says which output they belong to: ``name``, or for
    a long one its start plus a hash of all of it, so that ``.<tag>.vlmsafe-XXXXXXXX.tmp`` fits in 255 bytes."""
    raw = os.fsencode(name)
    if len(raw) <= _TAG_MAX:
        return name
    short = name
    while len(os.fsencode(short)) > 64:
        short = short[:-1]
    return f"{short}~{hashlib.sha256(raw).hexdigest()[:16]}"


# ----- ownership: one lock file per output, flock'ed for the life of the run that writes it
@dataclasses.dataclass
class _Claim:
    dest: Path
    lock: Path
    fd: int | None  # None: this file system has no flock; the run goes on unlocked and sweeps nothing
    pid: int
    made: list[Path]  # folders created to hold the lock (and later the output): removed again if left empty


_HELD: dict[Path, _Claim] = {}
_SCOPE_DEPTH = 0


def _launch_rank() -> int:
    """This process's rank in a distributed launch (torchrun / accelerate set ``RANK``); 0 when not launched."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = []
    while not os.path.isdir(folder) and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made: list[Path] = []
    for entry in reversed(missing):
        try:
            os.mkdir(entry)
        except FileExistsError:
            continue
        except OSError as exc:
            _remove_empty(made)
            raise InputError(f"cannot create the folder {entry} ({exc.strerror or exc}); choose a writable location") \
                from None
        made.append(entry)
    return made


def _remove_empty(folders: list[Path]) -> None:
    for entry in reversed(folders):
        try:
            os.rmdir(entry)
        except OSError:
            break


def _owner(fd: int) -> str:
    """Who holds a lock, from what its holder wrote in it (``pid host``)."""
    try:
        words = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
    except OSError:
        words = []
    if not words:
        return "process id not yet recorded"
    pid, host = words[0], " ".join(words[1:])
    return f"pid {pid}" if not host or host == socket.gethostname() else f"pid {pid} on {host}"


def _claim(dest: Path, *, shown: str, fix: str) -> tuple[_Claim, bool]:
    """Take the lock of output ``dest`` (resolved) for this process; ``(claim, True)`` if taken now, ``(claim,
    False)`` if this process already held it.

    The lock is ``flock`` on ``.NAME.vlmsafe-lock`` beside the output: the kernel drops it when its holder
    dies however it dies (SIGKILL included) and it holds across PID namespaces on a shared volume, which a
    PID written in a file does not. The file is removed on release; as a run may have opened it just before,
    a lock is only good if the file it locked is still the one at that path (else the lock is taken again).

    Raises:
        OutputBusyError: another process holds the lock.
    """
    held = _HELD.get(dest)
    if held is not None and held.pid == os.getpid():
        return held, False
    made = _make_folders(dest.parent)
    lock = dest.parent / f".{_tag(dest.name)}{_LOCK_SUFFIX}"
    for _ in range(1000):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
        except FileNotFoundError:  # a run that made the folder removed it again meanwhile
            made += _make_folders(dest.parent)
            continue
        except OSError as exc:
            _remove_empty(made)
            raise InputError(f"{shown}: cannot create the lock file {lock} ({exc.strerror or exc}); "
                             "choose a writable location") from None
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(fd)
            os.close(fd)
            _remove_empty(made)
            raise OutputBusyError(f"another vlmsafe run is writing {shown} ({owner}); wait for it or {fix}") from None
        except OSError:  # no flock on this file system: go on unlocked (and so never sweep)
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(lock)
            claim = _Claim(dest, lock, None, os.getpid(), made)
            _HELD[dest] = claim
            return claim, True
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False))
        except OSError:
            same = False
        if not same:  # its holder removed it between our open and our lock: lock the new one
            os.close(fd)
            continue
        with contextlib.suppress(OSError):  # only informative: a full disk must not stop here
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        claim = _Claim(dest, lock, fd, os.getpid(), made)
        _HELD[dest] = claim
        return claim, True
    raise OutputBusyError(f"{shown}: its lock file {lock} keeps being replaced; {fix}")


def _release(claim: _Claim | None) -> None:
    """Remove the lock file and drop the lock (in that order: see :func:`_claim`); remove folders made for it
    that stayed empty. Not in a forked child: the lock is its parent's."""
    if claim is None or claim.pid != os.getpid():
        return
    if _HELD.get(claim.dest) is claim:
        del _HELD[claim.dest]
    if claim.fd is not None:
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(claim.fd), os.stat(claim.lock, follow_symlinks=False)):
                os.unlink(claim.lock)
        with contextlib.suppress(OSError):
            os.close(claim.fd)
        claim.fd = None
    _remove_empty(claim.made)
    claim.made = []


def release_outputs() -> None:
    """Release every output lock this process holds (end of a run; also at interpreter exit). Newest first: a
    folder made for an earlier output's lock may hold a later one's (``out/a.json`` and ``out/a.png``)."""
    for claim in reversed(list(_HELD.values())):
        _release(claim)


atexit.register(release_outputs)


@contextlib.contextmanager
def hold_outputs() -> Iterator[None]:
    """A run: outputs checked by :func:`check_output` inside it stay locked until their :func:`atomic_path`
    finishes or the run ends, so a second run on the same output stops before its work, not after it."""
    global _SCOPE_DEPTH
    _SCOPE_DEPTH += 1
    try:
        yield
    finally:
        _SCOPE_DEPTH -= 1
        if not _SCOPE_DEPTH:
            release_outputs()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    Works for files and directories: write into the yielded path (``mkdir`` it for a directory).
    On success it replaces the destination in one rename; on error (an interrupt or SIGTERM under the CLI
    included) the temporary is removed and the destination is left untouched. An existing destination is
    replaced only when it is an empty directory or ``overwrite=True`` (checked before the block runs, so
    nothing is computed for nothing); otherwise :class:`~vlmsafe.errors.OutputExistsError` is raised.
    Without ``overwrite`` the final rename never replaces something another program created meanwhile.

    A link is written at its target. The output's lock (see :func:`check_output`) is held for the block, so
    every temporary of this output found beside it (``.NAME.vlmsafe-XXXXXXXX.tmp|.old``) is a dead run's and
    is removed. The output gets the permissions ``mkdir``/``open`` give under the umask (some writers, e.g.
    safetensors, create 0600 files). A full disk or quota is :class:`~vlmsafe.errors.OutputWriteError`.
    """
    shown = os.fspath(path)
    dest = _resolve_output(Path(os.path.expanduser(shown)), option="output", shown=shown)
    _check_name_lengths(dest, _nearest_existing(dest.parent), option="output", shown=shown)
    claim, _ = _claim(dest, shown=shown, fix="choose another path")
    try:
        if claim.fd is not None:
            _remove_orphans(dest)  # first: it may put back the output a killed run was replacing
        if os.path.lexists(dest) and not overwrite and not (dest.is_dir() and not any(dest.iterdir())):
            kind = "a non-empty directory" if dest.is_dir() else "an existing file"
            raise OutputExistsError(
                f"{shown} is {kind}; pass `overwrite=True` to replace it, or choose another path"
            )
        tmp = Path(tempfile.mkdtemp(prefix=f".{_tag(dest.name)}.vlmsafe-", suffix=".tmp", dir=dest.parent))
        try:
            target = tmp / dest.name
            yield target
            if not os.path.lexists(target):
                raise FileNotFoundError(
                    f"nothing was written to the temporary {target}; write the output inside the block"
                )
            _apply_umask(target)
            _commit(target, dest, overwrite=overwrite, shown=shown)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as exc:
        error = _write_error(exc, dest)
        if error is None:
            raise
        raise error from None
    finally:
        _release(claim)


def _commit(target: Path, dest: Path, *, overwrite: bool, shown: str) -> None:
    """Put the finished ``target`` at ``dest``: replace what is there only with ``overwrite``; without it,
    refuse anything that appeared since the check (only an empty folder may be there)."""
    appeared = OutputExistsError(
        f"{shown} was created by another program while this run was writing it; it is left as it is and this "
        "run's output was not kept; choose another path (or pass `overwrite=True`)"
    )
    if os.path.lexists(dest):
        if not overwrite:
            try:
                os.rmdir(dest)  # the empty folder allowed by the check; anything else in it now stops here
            except OSError:
                raise appeared from None
        elif dest.is_dir() or target.is_dir():
            old = Path(tempfile.mkdtemp(prefix=f".{_tag(dest.name)}.vlmsafe-", suffix=".old", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(target, dest)
            shutil.rmtree(old, ignore_errors=True)
            return
        else:
            os.replace(target, dest)
            return
    if target.is_dir() and not target.is_symlink():
        try:
            os.rename(target, dest)  # onto a non-empty folder or a file: fails; onto an empty folder: allowed
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise appeared from None
            raise
        return
    try:
        os.link(target, dest, follow_symlinks=False)  # unlike rename, never replaces: fails if dest appeared
    except FileExistsError:
        raise appeared from None
    except OSError:  # no hard links here (some network, FUSE or FAT file systems): test, then rename
        if os.path.lexists(dest):
            raise appeared from None
        os.rename(target, dest)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` sets it to read it)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)  # os-level: tests may count builtin opens
        try:
            text = os.read(fd, 1 << 16).decode("ascii", "replace")
        finally:
            os.close(fd)
        for line in text.splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(target: Path) -> None:
    """Give ``target`` (and, for a folder, everything in it) the mode a plain ``mkdir``/``open`` gives under
    the umask: 0777 (folders, executable files) or 0666 less the umask. The temporary folder is 0700 and some
    writers (safetensors) create 0600 files; an output must not end more private, or more open, than the
    user's setting says."""
    mask = _umask()

    def fix(entry: str, base: int) -> None:
        st = os.lstat(entry)
        if stat.S_ISLNK(st.st_mode):
            return
        want = (0o777 if st.st_mode & 0o111 else base) & ~mask
        if stat.S_IMODE(st.st_mode) != want:
            with contextlib.suppress(OSError):
                os.chmod(entry, want)

    if target.is_dir() and not target.is_symlink():
        for root, _, files in os.walk(target):
            fix(root, 0o777)
            for name in files:
                fix(os.path.join(root, name), 0o666)
    else:
        fix(str(target), 0o666)


def _write_error(exc: BaseException, dest: Path) -> OutputWriteError | None:
    """``exc`` as one line if it is a write that failed for room, quota or a read-only file system; else None."""
    if isinstance(exc, VlmsafeError):
        return None
    code = exc.errno if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS else None
    if code is None:
        text = str(exc)
        if not any(t in text for t in _FULL_TEXT):
            return None
        code = errno.EDQUOT if ("quota" in text.lower() or "os error 122" in text) else errno.ENOSPC
    fixes = {
        errno.ENOSPC: "free space there, or choose an output location on a disk with room",
        errno.EDQUOT: "free space within your quota, or choose an output location outside it",
        errno.EFBIG: "choose an output location on a file system that allows larger files",
        errno.EROFS: "choose a writable output location",
    }
    return OutputWriteError(f"cannot write {dest}: {os.strerror(code)} ({errno.errorcode[code]}); {fixes[code]}")


def _remove_orphans(dest: Path) -> None:
    """Delete the temporaries of dead writers of ``dest`` (``.NAME.vlmsafe-XXXXXXXX.tmp|.old``).

    Called only while this process holds ``dest``'s lock: every vlmsafe writer of ``dest`` holds it for its
    whole life, so any such temporary is provably a dead run's, whatever PID namespace it ran in (a PID
    says nothing about a run in another container on the same volume). A run killed half-way through
    replacing ``dest`` left the previous output in an ``.old`` folder and nothing at ``dest``: it is put
    back. Temporaries of the earlier naming (``.NAME.<pid>-XXXX.tmp``, no lock) are left alone: their
    writer may be an older vlmsafe that is still running.
    """
    pattern = re.compile(rf"^\.{re.escape(_tag(dest.name))}\.vlmsafe-[a-z0-9_]{{8}}\.(tmp|old)$")
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or not entry.is_dir(follow_symlinks=False):
            continue
        previous = Path(entry.path) / dest.name
        if match.group(1) == "old" and not os.path.lexists(dest) and os.path.lexists(previous):
            with contextlib.suppress(OSError):
                os.rename(previous, dest)
        shutil.rmtree(entry.path, ignore_errors=True)


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
