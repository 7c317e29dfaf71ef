"""Ownership of outputs: one lock file per output, ``flock``'ed for the life of the run that writes it.

:func:`vlmsafe.io.check_output` claims an output before any work and :func:`vlmsafe.io.atomic_path` before it
writes, so a second run on the same output stops at once (:class:`~vlmsafe.errors.OutputBusyError`) instead of
both "succeeding"; inside :func:`hold_outputs` (a CLI command) claims are kept until the run ends. The kernel
drops a lock when its holder dies however it dies, so a dead run's temporaries are recognised without trusting
process ids. The hidden names of locks and temporaries come from :func:`hidden_tag`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import errno
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

from vlmsafe.errors import InputError, OutputBusyError

try:
    import fcntl
except ImportError:  # not POSIX: outputs are written unlocked (and no temporary is ever swept)
    fcntl = None  # type: ignore[assignment]

#: Temporaries and lock files are named ``.<tag>.vlmsafe-...`` after the output's name; a name longer than this
#: many bytes is shortened to its start plus a hash, so the hidden names fit where the output's own name fits.
_TAG_MAX = 200
_LOCK_SUFFIX = ".vlmsafe-lock"


def hidden_tag(name: str) -> str:
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


def launch_rank() -> int:
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


def claim_output(dest: Path, *, shown: str, fix: str) -> tuple[_Claim, bool]:
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
    lock = dest.parent / f".{hidden_tag(dest.name)}{_LOCK_SUFFIX}"
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


def live_locks(folder: Path) -> list[str]:
    """The outputs directly in ``folder`` that a run (this process or another) is writing now: the names whose
    lock file is there and locked. Replacing ``folder`` would move such a run's temporaries away under it."""
    if fcntl is None:
        return []
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(".") and n.endswith(_LOCK_SUFFIX))
    except OSError:
        return []
    held = []
    for name in names:
        if any(c.lock == folder / name and c.fd is not None for c in _HELD.values()):
            held.append(name[1:-len(_LOCK_SUFFIX)])
            continue
        try:
            fd = os.open(folder / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            held.append(name[1:-len(_LOCK_SUFFIX)])
        except OSError:
            pass
        finally:
            os.close(fd)  # drops our shared lock, if taken
    return held


def release_claim(claim: _Claim | None) -> None:
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
        release_claim(claim)


atexit.register(release_outputs)


def in_run() -> bool:
    """Whether a :func:`hold_outputs` run is open: a claim taken inside one is kept until the run ends."""
    return _SCOPE_DEPTH > 0


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
