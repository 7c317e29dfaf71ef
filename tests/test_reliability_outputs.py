"""Output mechanics under the ways real users break things (issue 24): two runs on one output, signals,
a killed run's leftovers, links, loops, long names, a full disk, the umask.

Signal and concurrency cases run real subprocesses of ``vlmsafe.cli.main``; most use a tiny registered
command (``fake-write``: check_output, "work", atomic_path) so that a case costs a Python start-up, not a
torch import; one runs the real ``vlmsafe merge`` against a run that holds its output.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import vlmsafe
from vlmsafe.cli import main
from vlmsafe.errors import InputError, OutputBusyError, OutputExistsError, OutputWriteError
from vlmsafe.io import atomic_path, check_output, write_text_atomic
from vlmsafe.output_locks import hold_outputs

REPO = Path(vlmsafe.__file__).resolve().parents[1]
TESTBED = REPO / "assets" / "testbed"

FAKE_COMMAND = textwrap.dedent("""
    import time
    from vlmsafe.io import atomic_path, check_output

    def register(subparsers):
        p = subparsers.add_parser("fake-write")
        p.add_argument("--out", required=True)
        p.add_argument("--overwrite", action="store_true")
        p.add_argument("--work", type=float, default=0.0)
        p.add_argument("--write", type=float, default=0.0)
        p.set_defaults(func=run)

    def run(args):
        out = check_output(args.out, kind="dir", overwrite=args.overwrite)
        print("checked", flush=True)
        time.sleep(args.work)
        with atomic_path(out, overwrite=args.overwrite) as tmp:
            tmp.mkdir()
            (tmp / "part1.txt").write_text("half")
            print("writing", flush=True)
            time.sleep(args.write)
            (tmp / "part2.txt").write_text("done")
        return 0
""")
RUNNER = "import sys, vlmsafe.cli as c; c._SUBCOMMAND_MODULES = ('fake_cmd',); sys.exit(c.main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    mods = tmp_path_factory.mktemp("fake_cmd")
    (mods / "fake_cmd.py").write_text(FAKE_COMMAND)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(mods), str(REPO), os.environ.get("PYTHONPATH", "")]))
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _fake(env, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUNNER, "fake-write", "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline()
    assert line.strip() == word, (line, proc.stderr.read() if proc.poll() is not None else "")


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _merge(out: Path, *extra: str) -> list[str]:
    return ["merge", "--vlm", str(TESTBED), "--aligned", str(TESTBED / "aligned_lm"), "--method", "linear",
            "--weight", "0.4", "--no-progress", "--out", str(out), *extra]


# --------------------------------------------------------------------------- ownership
def test_a_held_output_is_refused_before_the_work_and_its_lock_file_goes_away(tmp_path, env):
    out = tmp_path / "M"
    holder = _fake(env, out, "--work", "60")
    try:
        _wait_for(holder, "checked")  # holds M's lock, has written nothing yet
        assert _names(tmp_path) == [".M.vlmsafe-lock"]
        message = f"another vlmsafe run is writing {out} (pid {holder.pid}); wait for it or choose another `out`"
        with pytest.raises(OutputBusyError) as info:
            check_output(out, kind="dir")
        assert str(info.value) == message
        ran = []
        with pytest.raises(OutputBusyError), atomic_path(out, overwrite=True):
            ran.append(1)
        assert not ran  # the block (the work) never ran
        assert _names(tmp_path) == [".M.vlmsafe-lock"]  # nothing of ours left, the holder's lock untouched
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.communicate(timeout=60)
    assert holder.returncode == 128 + signal.SIGTERM
    assert _names(tmp_path) == []  # its lock file removed with the lock
    with hold_outputs():
        check_output(out, kind="dir")  # free again


def test_two_runs_started_together_exactly_one_succeeds(tmp_path, env):
    out = tmp_path / "M"
    runs = [_fake(env, out, "--work", "2") for _ in range(2)]
    results = [(p.pid, *p.communicate(timeout=120), p.returncode) for p in runs]
    assert sorted(r[3] for r in results) == [0, 2], results
    winner = next(r for r in results if r[3] == 0)
    loser = next(r for r in results if r[3] == 2)
    line = _one_line(loser[2])
    assert "checked" not in loser[1]  # stopped before its work
    # started together they overlap (the busy message); a loser that started late finds the output made
    assert (f"another vlmsafe run is writing {out} (pid {winner[0]})" in line
            or f"--out {str(out)!r} is a non-empty directory" in line), line
    assert _names(tmp_path) == ["M"] and _names(out) == ["part1.txt", "part2.txt"]


def test_real_merge_stops_before_its_work_when_another_run_writes_its_output(tmp_path, env):
    out = tmp_path / "M"
    holder = _fake(env, out, "--work", "120")
    try:
        _wait_for(holder, "checked")
        proc = subprocess.run([sys.executable, "-m", "vlmsafe.cli", *_merge(out)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert _one_line(proc.stderr) == (f"vlmsafe merge: error: another vlmsafe run is writing {out} "
                                          f"(pid {holder.pid}); wait for it or choose another --out")
        assert _names(tmp_path) == [".M.vlmsafe-lock"]  # the merge made no temporary
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.communicate(timeout=60)
    assert _names(tmp_path) == []


def test_lock_files_and_folders_made_for_them_are_never_left(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with hold_outputs():
        check_output(out, kind="dir")
        assert (tmp_path / "a" / "b" / ".out.vlmsafe-lock").is_file()
    assert _names(tmp_path) == []  # the run ended without writing: a/b made for the lock are gone too
    check_output(out, kind="dir")  # a library call (no run): tested, not kept
    assert _names(tmp_path) == []
    with hold_outputs():
        check_output(out, kind="dir")
        with atomic_path(out) as tmp:
            tmp.mkdir()
        assert not (tmp_path / "a" / "b" / ".out.vlmsafe-lock").exists()  # released when its output is in place
    assert _names(tmp_path / "a" / "b") == ["out"]
    (tmp_path / "f.txt").write_text("mine")
    with hold_outputs(), pytest.raises(OutputExistsError):
        check_output(tmp_path / "f.txt", kind="file")
    assert _names(tmp_path) == ["a", "f.txt"]


def _race(dest: Path, kind: str) -> None:
    """Write our output in atomic_path's temporary while "another program" creates ``dest`` (a file or a
    folder): the final rename must refuse to replace it."""
    with pytest.raises(OutputExistsError, match="created by another program"), atomic_path(dest) as tmp:
        if kind == "dir":
            tmp.mkdir()
            (tmp / "ours.txt").write_text("ours")
            dest.mkdir()
            (dest / "theirs.txt").write_text("theirs")
        else:
            tmp.write_text("ours")
            dest.write_text("theirs")


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_final_rename_never_replaces_what_another_program_made_meanwhile(tmp_path, kind):
    dest = tmp_path / "out"
    _race(dest, kind)
    assert (dest / "theirs.txt" if kind == "dir" else dest).read_text() == "theirs"
    assert _names(tmp_path) == ["out"]


def test_empty_folder_destination_is_filled_not_moved_aside(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("x")
    assert _names(dest) == ["x"] and _names(tmp_path) == ["out"]


# --------------------------------------------------------------------------- signals and dead runs
def test_sigterm_removes_the_temporary_and_a_second_run_is_refused_meanwhile(tmp_path, env):
    out = tmp_path / "M"
    writer = _fake(env, out, "--write", "60")
    try:
        _wait_for(writer, "checked")
        _wait_for(writer, "writing")  # its temporary holds part1.txt
        temps = [n for n in _names(tmp_path) if n.endswith(".tmp")]
        assert len(temps) == 1 and temps[0].startswith(".M.vlmsafe-")
        second = _fake(env, out)  # e.g. in another container: it must neither write nor sweep a live temporary
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2
        assert _one_line(err) == (f"vlmsafe fake-write: error: another vlmsafe run is writing {out} "
                                  f"(pid {writer.pid}); wait for it or choose another --out")
        assert temps[0] in _names(tmp_path)
    finally:
        writer.send_signal(signal.SIGTERM)
        _, err = writer.communicate(timeout=60)
    assert writer.returncode == 143
    assert _one_line(err) == "terminated (SIGTERM)"
    assert _names(tmp_path) == []  # no temporary, no lock file, no output


def test_a_sigkilled_runs_leftovers_are_removed_by_the_next_run(tmp_path, env):
    out = tmp_path / "M"
    writer = _fake(env, out, "--write", "60")
    _wait_for(writer, "checked")
    _wait_for(writer, "writing")
    writer.kill()
    writer.communicate(timeout=60)
    left = _names(tmp_path)
    assert ".M.vlmsafe-lock" in left and any(n.startswith(".M.vlmsafe-") and n.endswith(".tmp") for n in left)
    again = _fake(env, out)
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0, err
    assert _names(tmp_path) == ["M"] and _names(out) == ["part1.txt", "part2.txt"]


def test_sigint_still_exits_130(tmp_path, env):
    writer = _fake(env, tmp_path / "M", "--write", "60")
    _wait_for(writer, "checked")
    _wait_for(writer, "writing")
    writer.send_signal(signal.SIGINT)
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == 130 and _one_line(err) == "interrupted"
    assert _names(tmp_path) == []


def test_sweep_trusts_locks_not_pids(tmp_path):
    dest = tmp_path / "model"
    legacy = tmp_path / ".model.999999999-abcd.tmp"  # older naming: its writer (another PID namespace?) unknown
    legacy.mkdir()
    dead = tmp_path / ".model.vlmsafe-abcd1234.tmp"  # new naming, nobody holds model's lock: provably dead
    dead.mkdir()
    (dead / "model").write_text("partial")
    other = tmp_path / ".other.vlmsafe-abcd1234.tmp"  # another output's: not ours to judge
    other.mkdir()
    with atomic_path(dest) as tmp:
        tmp.write_text("new")
    assert _names(tmp_path) == sorted([".model.999999999-abcd.tmp", ".other.vlmsafe-abcd1234.tmp", "model"])


def test_a_run_killed_while_replacing_gets_the_previous_output_back(tmp_path):
    dest = tmp_path / "model"
    old = tmp_path / ".model.vlmsafe-zz99zz99.old"  # killed between moving the old output aside and the rename
    (old / "model").mkdir(parents=True)
    (old / "model" / "weights").write_text("previous")
    with pytest.raises(OutputExistsError, match="non-empty directory"), atomic_path(dest):
        pass
    assert (dest / "weights").read_text() == "previous"
    assert _names(tmp_path) == ["model"]


# --------------------------------------------------------------------------- paths found before the work
def test_symlinked_out_is_written_at_its_target(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(_merge(link)) == 0, capsys.readouterr().err
    assert link.is_symlink() and (real / "model.safetensors").is_file() and (real / "vlmsafe_merge.json").is_file()
    assert _names(tmp_path) == ["link", "real"]
    rc = main(_merge(link))  # now the target is full: refused, saying where the link goes
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and f"--out {str(link)!r} (a link to {real}) is a non-empty directory" in line


@pytest.mark.parametrize("case", ["dangling", "dangling-parent", "loop", "name-over-255", "folder-over-255"])
def test_unusable_out_paths_are_refused_before_the_work(tmp_path, capsys, case):
    expected = {
        "dangling": "is a symbolic link to", "dangling-parent": "is a symbolic link to",
        "loop": "a symbolic link loop", "name-over-255": "is 300 bytes, longer than the 255",
        "folder-over-255": "is 300 bytes, longer than the 255",
    }[case]
    (tmp_path / "dangling").symlink_to(tmp_path / "missing" / "x")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    before = _names(tmp_path)
    out = {"dangling": tmp_path / "dangling", "dangling-parent": tmp_path / "dangling" / "sub",
           "loop": tmp_path / "loop1", "name-over-255": tmp_path / ("n" * 300),
           "folder-over-255": tmp_path / "a" / ("n" * 300) / "out"}[case]
    rc = main(_merge(out))
    line = _one_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith("vlmsafe merge: error: --out") and expected in line, line
    assert _names(tmp_path) == before  # nothing made, not even a folder or a lock


def test_a_legal_long_name_works(tmp_path, capsys):
    out = tmp_path / ("n" * 245)
    assert main(_merge(out)) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and _names(tmp_path) == [out.name]
    write_text_atomic(tmp_path / ("f" * 255), "x")  # the longest legal file name
    assert (tmp_path / ("f" * 255)).read_text() == "x"
    with pytest.raises(InputError, match="256 bytes"), atomic_path(tmp_path / ("g" * 256)):
        pass
    assert _names(tmp_path) == sorted([out.name, "f" * 255])


# --------------------------------------------------------------------------- disk full
def test_disk_full_inside_the_output_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import vlmsafe.merge.streaming as streaming

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(streaming, "copy_side_files", full)
    out = tmp_path / "M"
    assert main(_merge(out)) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"vlmsafe merge: error: cannot write {out}: No space left on device (ENOSPC); free space")
    assert _names(tmp_path) == []


def test_disk_full_outside_atomic_path_is_one_line(tmp_path, capsys, monkeypatch):
    import vlmsafe.merge.streaming as streaming

    def full(*args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded", "/somewhere/cache")

    monkeypatch.setattr(streaming, "plan_merge", full)
    assert main(_merge(tmp_path / "M")) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("vlmsafe merge: error: Disk quota exceeded writing /somewhere/cache; free space")
    assert _names(tmp_path) == []


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (ENOSPC)"),
    (OSError(errno.EROFS, "Read-only file system"), "Read-only file system (EROFS)"),
    (RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left '
                  'on device" })'), "No space left on device (ENOSPC)"),  # safetensors' wording
])
def test_write_failures_become_output_write_errors(tmp_path, exc, expected):
    (tmp_path / "out.bin").write_text("before")
    with pytest.raises(OutputWriteError, match=re.escape(expected)), \
            atomic_path(tmp_path / "out.bin", overwrite=True) as tmp:
        tmp.write_text("half")
        raise exc
    assert (tmp_path / "out.bin").read_text() == "before" and _names(tmp_path) == ["out.bin"]


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError, match="an input"), atomic_path(tmp_path / "o"):
        raise FileNotFoundError("an input")
    assert _names(tmp_path) == []


# --------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_get_the_umask_permissions(tmp_path, umask):
    import torch
    from safetensors.torch import save_file

    old = os.umask(umask)
    try:
        with atomic_path(tmp_path / "vectors") as tmp:
            tmp.mkdir()
            save_file({"a": torch.zeros(2)}, str(tmp / "vectors.safetensors"))  # safetensors writes 0600
            (tmp / "vectors.json").write_text("{}")
            os.mkdir(tmp / "sub", 0o700)
            fd = os.open(tmp / "sub" / "run.sh", os.O_CREAT | os.O_WRONLY, 0o700)
            os.close(fd)
        with atomic_path(tmp_path / "single.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    d = tmp_path / "vectors"
    assert mode(d) == mode(d / "sub") == 0o777 & ~umask  # not mkdtemp's 0700
    assert mode(d / "vectors.safetensors") == mode(d / "vectors.json") == 0o666 & ~umask
    assert mode(tmp_path / "single.safetensors") == 0o666 & ~umask
    assert mode(d / "sub" / "run.sh") == 0o777 & ~umask  # execute bits kept


def test_cli_puts_back_the_signal_handlers_it_replaced(tmp_path, capsys):
    before = signal.getsignal(signal.SIGTERM)
    assert main(_merge(tmp_path / "M")) == 0, capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_the_rename_itself_refuses_a_target_made_after_the_last_look(tmp_path, monkeypatch, kind):
    """The window between the last existence test and the rename: the rename (a hard link for a file, a
    rename onto a non-empty folder for a folder) must fail rather than replace."""
    dest = tmp_path / "out"
    real_lexists = os.path.lexists
    monkeypatch.setattr(os.path, "lexists", lambda p: False if Path(p) == dest else real_lexists(p))
    _race(dest, kind)
    monkeypatch.undo()
    assert (dest / "theirs.txt" if kind == "dir" else dest).read_text() == "theirs"
    assert _names(tmp_path) == ["out"]
