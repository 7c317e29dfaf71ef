"""Outputs a stranger points vlmsafe's writers at (the paths audit of the fifth session): a parent of the home
directory, a pipe or device, a mount point, a folder where one file is written, a folder holding only a killed
run's hidden files, a maintainer script's signals and output lock, and a testbed builder given a folder it did not
write. Each case runs the real command line (or the script's ``main``) and checks the exit code, the one stderr
line and that the user's files are byte for byte what they were.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_checks import one_line_error

import vlmsafe
from vlmsafe.cli import main
from vlmsafe.errors import OutputBusyError, OutputExistsError
from vlmsafe.io import atomic_path, check_output

REPO = Path(vlmsafe.__file__).resolve().parents[1]
TESTBED = REPO / "assets" / "testbed"


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _mask(out: Path, *extra: str) -> list[str]:
    return ["merge-mask", "--vlm", str(TESTBED), "--aligned", str(TESTBED / "aligned_lm"), "--no-progress", "--out",
            str(out), *extra]


def _merge(out: Path, *extra: str) -> list[str]:
    return ["merge", "--vlm", str(TESTBED), "--aligned", str(TESTBED / "aligned_lm"), "--method", "linear",
            "--weight", "0.4", "--no-progress", "--out", str(out), *extra]


# --------------------------------------------------------------------------- trees no run replaces
def test_a_parent_of_the_home_directory_is_never_replaced(tmp_path, capsys, monkeypatch):
    """--out /home --overwrite (run from elsewhere) replaced every user's home: refused like the home itself."""
    home = tmp_path / "users" / "me"
    home.mkdir(parents=True)
    (home / "thesis.tex").write_text("years of work")
    (tmp_path / "work").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "work")
    one_line_error(main(_merge(tmp_path / "users", "--overwrite")), capsys.readouterr().err,
                   f"--out {str(tmp_path / 'users')!r} is the current, home or root directory (or a parent of the "
                   "current or home one)")
    assert (home / "thesis.tex").read_text() == "years of work" and _names(tmp_path) == ["users", "work"]


def test_atomic_path_itself_refuses_the_current_directory(tmp_path, monkeypatch):
    """A library writer that calls atomic_path without check_output (the Safe-CLIP testbed builder did) must not
    move the current directory aside and delete it."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path / "cwd")
    ran = []
    with pytest.raises(OutputExistsError, match="is the current, home or root directory"), \
            atomic_path(".", overwrite=True):
        ran.append(1)
    assert not ran and (tmp_path / "cwd" / "notes.txt").read_text() == "mine" and _names(tmp_path) == ["cwd"]


def test_the_safeclip_testbed_builder_refuses_a_folder_it_did_not_write(tmp_path, capsys, monkeypatch):
    """``python -m vlmsafe.cli.build_safeclip_testbed DIR`` replaced any DIR (``.`` included) after its work, without
    being asked: now it is refused before the work unless --overwrite, like every other output."""
    from vlmsafe.cli.build_safeclip_testbed import main as build_main

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert build_main([str(mine), "--pretrain-steps", "1", "--train-renders", "1"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m vlmsafe.cli.build_safeclip_testbed: error: OUT_DIR {str(mine)!r} is a non-empty directory; "
        "pass --overwrite to replace it, or choose another OUT_DIR path")
    monkeypatch.chdir(mine)
    assert build_main([".", "--overwrite"]) == 2
    assert "OUT_DIR '.' is the current, home or root directory" in capsys.readouterr().err
    assert _names(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"
    assert _names(tmp_path) == ["mine"]


# --------------------------------------------------------------------------- what is at the path
def test_a_file_output_never_replaces_a_folder_of_files(tmp_path, capsys):
    """merge-mask --out results --overwrite (results/ a folder of the user's) deleted the folder to put one mask
    file in its place; safeclip eval --json did the same. Refused before the work; an empty folder still goes."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "paper.pdf").write_bytes(b"%PDF")
    one_line_error(main(_mask(results, "--overwrite")), capsys.readouterr().err,
                   f"--out {str(results)!r} is a non-empty directory and a file is written here; --overwrite "
                   "replaces an earlier file, never a folder's contents")
    one_line_error(main(["safeclip", "eval", "--json", str(results), "--overwrite", "--no-progress"]),
                   capsys.readouterr().err, f"--json {str(results)!r} is a non-empty directory")
    assert _names(tmp_path) == ["results"] and (results / "paper.pdf").read_bytes() == b"%PDF"
    with pytest.raises(OutputExistsError, match="a file never replaces a folder's contents"), \
            atomic_path(results, overwrite=True) as tmp:  # a library caller that skipped check_output
        tmp.write_text("mask")
    assert _names(tmp_path) == ["results"] and _names(results) == ["paper.pdf"]


def test_a_pipe_is_never_replaced_by_a_file(tmp_path, capsys):
    """--out PIPE --overwrite (or /dev/null, /dev/stdout: a device) put a regular file in place of the pipe."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    one_line_error(main(_mask(pipe, "--overwrite")), capsys.readouterr().err,
                   f"--out {str(pipe)!r} is a named pipe, which an output never replaces; pass the path of a "
                   "regular file")
    with pytest.raises(OutputExistsError, match="is a device"):
        check_output("/dev/null", kind="file", overwrite=True)
    assert pipe.is_fifo() and _names(tmp_path) == ["pipe"]


def test_a_mount_point_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """``docker run -v ./out:/out ... --out /out``: the finished output cannot be renamed onto a mount point, so the
    run failed after all its work ("created by another program" or a traceback). Now refused first, naming a
    folder inside it. (The real mount is checked by the audit script; here ismount is faked.)"""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == mnt or real_ismount(p))
    one_line_error(main(_merge(mnt)), capsys.readouterr().err,
                   f"--out {str(mnt)!r} is a mount point, which a finished output cannot be renamed onto; pass a "
                   f"directory inside it, such as {str(mnt / 'out')!r}")
    assert _names(tmp_path) == ["mnt"] and _names(mnt) == []
    check_output(mnt / "run", kind="dir")  # inside it: fine


def test_a_folder_holding_only_a_killed_runs_hidden_files_says_what_they_are(tmp_path):
    """A run killed with SIGKILL leaves ``.m.vlmsafe-lock`` and a temporary in results/; ``--out results`` then
    said "a non-empty directory" of a folder ``ls`` shows empty. The message names the files."""
    results = tmp_path / "results"
    (results / ".m.vlmsafe-ab12cd34.tmp" / "m").mkdir(parents=True)
    (results / ".m.vlmsafe-lock").write_text("4242 host\n")
    with pytest.raises(OutputExistsError) as info:
        check_output(results, kind="dir")
    assert str(info.value) == (
        f"`out` {str(results)!r} is a non-empty directory (it holds only hidden files that vlmsafe runs writing into "
        "it keep: .m.vlmsafe-ab12cd34.tmp, .m.vlmsafe-lock; once no run writes there, delete them); pass "
        "`overwrite=True` to replace it, or choose another `out` path")
    assert _names(results) == [".m.vlmsafe-ab12cd34.tmp", ".m.vlmsafe-lock"]


# --------------------------------------------------------------------------- the python -m vlmsafe.cli.X scripts
FAKE_SCRIPT = textwrap.dedent("""
    import sys, time
    from vlmsafe.cli.parsing import run_script, script_parser
    from vlmsafe.io import atomic_path, check_output

    def work(args):
        out = check_output(args.out, kind="dir", overwrite=args.overwrite, option="`out`")
        print("checked", flush=True)
        time.sleep(args.work)
        with atomic_path(out, overwrite=args.overwrite) as tmp:
            tmp.mkdir()
            (tmp / "part1.txt").write_text("half")
            print("writing", flush=True)
            time.sleep(args.write)
            (tmp / "part2.txt").write_text("done")

    p = script_parser("vlmsafe.cli.fake", None)
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--work", type=float, default=0.0)
    p.add_argument("--write", type=float, default=0.0)
    sys.exit(run_script(p, sys.argv[1:], work))
""")


def _script(out: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", FAKE_SCRIPT, "--out", str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, word: str) -> None:
    line = proc.stdout.readline()
    assert line.strip() == word, (line, proc.stderr.read() if proc.poll() is not None else "")


@pytest.mark.parametrize("sig, code, line", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_script_stopped_while_writing_leaves_nothing(tmp_path, sig, code, line):
    """The scripts (build_unseen, the testbed builders, compare) ran outside the command's guard: SIGTERM killed
    them with their temporary and lock left, Ctrl-C printed a traceback."""
    writer = _script(tmp_path / "u", "--write", "60")
    _wait_for(writer, "checked")
    _wait_for(writer, "writing")
    writer.send_signal(sig)
    _, err = writer.communicate(timeout=60)
    assert writer.returncode == code and err.strip() == line, err
    assert _names(tmp_path) == []


def test_a_script_holds_its_output_from_the_check(tmp_path):
    """Two runs of a script on one output: the second stops before its work, not after it (the lock is held from
    the check, as in the vlmsafe command)."""
    first = _script(tmp_path / "u", "--work", "60")
    try:
        _wait_for(first, "checked")
        second = _script(tmp_path / "u")
        out, err = second.communicate(timeout=60)
        assert second.returncode == 2 and "checked" not in out
        assert err.strip() == (f"python -m vlmsafe.cli.fake: error: another vlmsafe run is writing {tmp_path / 'u'} "
                               f"(pid {first.pid}); wait for it or choose another --out")
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    assert first.returncode == 143 and _names(tmp_path) == []


HOLDER = ("import sys, time\nfrom vlmsafe.output_locks import hold_outputs\nfrom vlmsafe.io import check_output\n"
          "with hold_outputs():\n    check_output(sys.argv[1], kind='dir')\n    print('held', flush=True)\n"
          "    time.sleep(120)\n")


def test_a_folder_another_run_writes_into_is_not_replaced(tmp_path, capsys):
    """Run A writes R/m (its lock and temporary live in R); run B: --out R --overwrite moved R aside with A's
    temporary and deleted it, and A then failed with a traceback. B is refused before its work."""
    (tmp_path / "R").mkdir()
    (tmp_path / "R" / "old.txt").write_text("old")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "R" / "m")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        one_line_error(main(_merge(tmp_path / "R", "--overwrite")), capsys.readouterr().err,
                       f"{tmp_path / 'R'} holds {tmp_path / 'R' / 'm'}, which a vlmsafe run is writing now; wait "
                       "for it or choose another --out")
        ran = []
        with pytest.raises(OutputBusyError), atomic_path(tmp_path / "R", overwrite=True):
            ran.append(1)
        assert not ran
        assert _names(tmp_path / "R") == [".m.vlmsafe-lock", "old.txt"] and _names(tmp_path) == ["R"]
    finally:
        holder.kill()
        holder.communicate(timeout=60)
    assert main(_merge(tmp_path / "R", "--overwrite")) == 0  # a dead run's lock does not stop it
    assert "model.safetensors" in _names(tmp_path / "R")


def test_a_quoted_tilde_is_expanded_by_every_part_of_a_probe(tmp_path, capsys, monkeypatch):
    """``probe weights --out '~/reports'`` (or a tilde from a config): the report went to $HOME/reports, but a
    folder literally named ``~`` was made in the current directory (the next ``rm -rf ~`` deletes the home)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(["probe", "weights", "--before", str(TESTBED / "aligned_lm"), "--after", str(TESTBED),
                 "--no-progress", "--out", "~/reports"]) == 0, capsys.readouterr().err
    assert _names(work) == [] and sorted(_names(home / "reports")) == ["weights.json", "weights.png"]
