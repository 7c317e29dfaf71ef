"""Writing outputs: the output policy every vlmsafe writer shares.

* **Output policy** (:func:`check_output`, :func:`atomic_path`): a command never deletes or empties
  what it did not create. An existing non-empty output directory, an existing output file, an empty
  directory where a file is wanted or a file where a directory is wanted is refused *before any work* unless the caller
  passes ``overwrite=True`` (the CLI's ``--overwrite``); then the new output replaces the old one in
  one atomic rename, so an interrupted run never leaves a half-written output. One run at a time
  owns an output (a lock file beside it, :mod:`vlmsafe.output_locks`), so a dead run's temporaries are
  recognised without trusting process ids; paths (links, loops, name lengths, mount points, pipes and devices,
  the current and home directories) are checked before the work;
  outputs get the umask's permissions; a full disk is one line (:class:`~vlmsafe.errors.OutputWriteError`).

Reading (JSON documents, generated-doc blocks, sha256) is :mod:`vlmsafe.reading`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from vlmsafe.errors import (
    InputError,
    OutputBusyError,
    OutputExistsError,
    OutputWriteError,
    VlmsafeError,
)
from vlmsafe.output_locks import claim_output, hidden_tag, in_run, launch_rank, live_locks, release_claim

OutputKind = Literal["dir", "file"]


# --------------------------------------------------------------------------- output policy
#: errno values of a write that failed for want of room or of a writable file system: reported as one line
#: (:class:`~vlmsafe.errors.OutputWriteError`), not as a traceback.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
#: The same failures as libraries that wrap the errno in their own exception word them (safetensors: Rust's
#: ``StorageFull``; "No space left on device" from anything that keeps strerror).
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28", "os error 122")


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
    directory is wanted and the reverse. Always refused: the current or home directory or one of their
    parents, the file-system root (replacing them cannot be what anyone means), a named pipe, device or
    socket, a mount point (the final rename cannot replace it), a non-empty directory where a file is wanted,
    a destination whose parent is a file, one that is, holds or lies inside one of ``inputs``
    (``(option, path)`` pairs; ``--overwrite`` would otherwise replace the command's own input), one in
    a folder this process cannot write in, a symbolic-link loop, a dangling link, a name longer than the
    file system allows (all found now, not after the work) and an output another vlmsafe run is writing.

    A destination that is a symbolic link is written at the link's target (as ``cp`` and ``open`` do).
    ``option`` names the destination in messages: the caller's parameter in backticks (```out_dir```), which
    the command line shows as the flag that sets it (:func:`vlmsafe.cli.parsing.flags_for_parameters`).

    Ownership: the output's lock (``.NAME.vlmsafe-lock`` beside it, see :func:`atomic_path`) is taken now,
    so of two runs started together on one output exactly one goes on and the other stops before its work.
    Inside :func:`~vlmsafe.output_locks.hold_outputs` (the CLI runs every command in one) the lock is kept until
    the output's :func:`atomic_path` finishes or the scope ends; outside one it is only tested (a library call has no
    run whose end would release it). Processes of a distributed launch other than rank 0 do not take it.

    Raises:
        OutputExistsError: naming the path, what is there, and the fix (``overwrite=True`` / another path).
        OutputBusyError: another vlmsafe run is writing this output.
        InputError: the destination overlaps an input, cannot be written, or its path is unusable.
    """
    if kind not in ("dir", "file"):
        raise InputError(f"kind must be 'dir' or 'file', got {kind!r}; pass kind='dir' for a folder output or "
                         "kind='file' for a single file")
    if not isinstance(overwrite, bool):  # overwrite="no" would read as true and replace the output
        raise InputError(f"`overwrite` must be True or False, got {overwrite!r}")
    shown = os.fspath(path)
    dest = Path(os.path.expanduser(shown))
    if not shown or not str(dest).strip():
        raise OutputExistsError(f"{option}: empty path; pass a new {_noun(kind)} name")
    resolved = _resolve_output(dest, option=option, shown=shown)
    _refuse_unreplaceable(resolved, option=option, shown=shown, noun=_noun(kind))
    parent = _nearest_existing(resolved.parent)
    if not os.path.isdir(parent):
        raise OutputExistsError(f"{option} {shown!r}: {parent} is a file, not a directory; choose another path")
    _check_name_lengths(resolved, parent, option=option, shown=shown)
    check_no_overlap(dest, inputs, option=option)
    _check_writable(parent, path, option)
    fix = f"choose another {option}"
    claim, new = (None, False) if launch_rank() else claim_output(resolved, shown=shown, fix=fix)
    try:
        if claim is not None and claim.fd is not None:
            _remove_orphans(resolved)
        _refuse_existing(resolved, kind=kind, overwrite=overwrite, option=option, shown=shown, link=dest)
    except BaseException:
        if new:
            release_claim(claim)
        raise
    if new and not in_run():
        release_claim(claim)
    return dest


def _refuse_unreplaceable(dest: Path, *, option: str, shown: str, noun: str) -> None:
    """Refuse, with or without ``overwrite``, a destination (resolved) that no run may replace: the current, home
    or root directory or a parent of the current or home one (replacing them cannot be what anyone means), a
    named pipe, device or socket (``--json /dev/null --overwrite`` would put a file in place of the device), and a
    mount point (the finished output is renamed into place, which a mount point refuses: found after the work)."""
    home, cwd = Path.home().resolve(), Path.cwd().resolve()
    if dest in {Path(dest.anchor), home, *home.parents, cwd, *cwd.parents}:
        raise OutputExistsError(
            f"{option} {shown!r} is the current, home or root directory (or a parent of the current or home one); "
            f"pass a new {noun} name such as ./out"
        )
    try:
        mode = os.stat(dest).st_mode
    except OSError:
        return
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        what = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        raise OutputExistsError(f"{option} {shown!r} is {what}, which an output never replaces; pass the path of a "
                                f"regular {noun}")
    if stat.S_ISDIR(mode) and os.path.ismount(dest):
        raise OutputExistsError(
            f"{option} {shown!r} is a mount point, which a finished output cannot be renamed onto; pass a {noun} "
            f"inside it, such as {os.path.join(shown, 'out')!r}"
        )


def _refuse_live_writers(dest: Path, *, shown: str, fix: str) -> None:
    """Refuse to replace a folder that another run is writing an output into (``--out R --overwrite`` while a
    run writes ``R/m``): the replacement would delete that run's temporary under it."""
    if dest.is_dir() and (busy := live_locks(dest)):
        raise OutputBusyError(f"{shown} holds {os.path.join(shown, busy[0])}, which a vlmsafe run is writing now; "
                              f"wait for it or {fix}")


#: The hidden names an output's writer keeps beside it: its lock and its temporaries (:func:`atomic_path`).
_LEFTOVER = re.compile(r"^\..+\.vlmsafe-(lock|[a-z0-9_]{8}\.(tmp|old))$")


def _refuse_existing(
    dest: Path, *, kind: OutputKind, overwrite: bool, option: str, shown: str, link: Path
) -> None:
    """The existing-output part of :func:`check_output` (``dest`` resolved; ``link``: the path as given)."""
    if not os.path.lexists(dest):
        return
    where = f"{shown!r} (a link to {dest})" if os.path.islink(link) else repr(shown)
    if overwrite:
        if kind == "file" and dest.is_dir() and any(dest.iterdir()):  # one file never replaces a folder of them
            raise OutputExistsError(
                f"{option} {where} is a non-empty directory and a file is written here; `overwrite=True` replaces "
                f"an earlier file, never a folder's contents; pass a file path (inside it, or elsewhere)"
            )
        _refuse_live_writers(dest, shown=shown, fix=f"choose another {option}")
        return
    fix = f"pass `overwrite=True` to replace it, or choose another {option} path"
    if dest.is_dir():
        names = sorted(os.listdir(dest))
        if kind == "dir" and not names:
            return
        what = "a non-empty directory" if kind == "dir" else "a directory (a file is written here)"
        if all(_LEFTOVER.match(n) for n in names):  # `ls` shows nothing: say what is there
            what += (f" (it holds only hidden files that vlmsafe runs writing into it keep: {', '.join(names[:3])}"
                     f"{', ...' if len(names) > 3 else ''}; once no run writes there, delete them)")
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
    _refuse_unreplaceable(dest, option="output", shown=shown, noun="path")
    _check_name_lengths(dest, _nearest_existing(dest.parent), option="output", shown=shown)
    claim, _ = claim_output(dest, shown=shown, fix="choose another path")
    try:
        if claim.fd is not None:
            _remove_orphans(dest)  # first: it may put back the output a killed run was replacing
        if os.path.lexists(dest) and not overwrite and not (dest.is_dir() and not any(dest.iterdir())):
            kind = "a non-empty directory" if dest.is_dir() else "an existing file"
            raise OutputExistsError(
                f"{shown} is {kind}; pass `overwrite=True` to replace it, or choose another path"
            )
        if overwrite:
            _refuse_live_writers(dest, shown=shown, fix="choose another path")
        tmp = Path(tempfile.mkdtemp(prefix=f".{hidden_tag(dest.name)}.vlmsafe-", suffix=".tmp", dir=dest.parent))
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
        release_claim(claim)


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
            if not target.is_dir() and any(dest.iterdir()):  # a library caller that skipped check_output
                raise OutputExistsError(f"{shown} is a non-empty directory; a file never replaces a folder's "
                                        "contents; choose a file path")
            _refuse_live_writers(dest, shown=shown, fix="choose another path")  # one that began since the check
            old = Path(tempfile.mkdtemp(prefix=f".{hidden_tag(dest.name)}.vlmsafe-", suffix=".old", dir=dest.parent))
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
    pattern = re.compile(rf"^\.{re.escape(hidden_tag(dest.name))}\.vlmsafe-[a-z0-9_]{{8}}\.(tmp|old)$")
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


def write_json_atomic(path: str | os.PathLike[str], data: Any, *, overwrite: bool = False) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def write_text_atomic(path: str | os.PathLike[str], text: str, *, overwrite: bool = False) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
