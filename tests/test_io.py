import json
import os
import subprocess
import sys

import pytest

from vlmsafe.errors import FileFormatError, OutputExistsError
from vlmsafe.io import atomic_path, write_json_atomic
from vlmsafe.reading import replace_marked_block


def test_atomic_file_and_dir(tmp_path):
    write_json_atomic(tmp_path / "a.json", {"x": 1})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old.txt").write_text("old")
    with pytest.raises(OutputExistsError), atomic_path(tmp_path / "d"):  # never replaced without being asked
        raise AssertionError("the block must not run")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["old.txt"]
    with atomic_path(tmp_path / "d", overwrite=True) as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_failure_leaves_destination_untouched(tmp_path):
    (tmp_path / "out.txt").write_text("before")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt", overwrite=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert (tmp_path / "out.txt").read_text() == "before"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_orphans_of_killed_writers_are_removed(tmp_path):
    dest = tmp_path / "model"
    # a writer that is SIGKILLed inside the block leaves its temporary behind ...
    code = (
        "import os, signal, sys\n"
        "from vlmsafe.io import atomic_path\n"
        f"with atomic_path({str(dest)!r}) as tmp:\n"
        "    tmp.mkdir(); (tmp / 'x').write_text('partial')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    assert not dest.exists()
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())
    # ... and a live writer's temporary (this process) must survive the clean-up
    live = tmp_path / f".model.{os.getpid()}-keep.tmp"
    live.mkdir()
    with atomic_path(dest) as tmp:
        tmp.mkdir()
    assert dest.is_dir() and live.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", live.name])


def test_replace_marked_block_rewrites_only_between_the_markers(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- X-START -->\nold figures\n<!-- X-END -->\noutro\n")
    replace_marked_block(doc, "<!-- X-START -->", "<!-- X-END -->", "<!-- X-START -->\nnew\n<!-- X-END -->")
    assert doc.read_text() == "intro\n<!-- X-START -->\nnew\n<!-- X-END -->\noutro\n"
    before = doc.read_bytes()
    with pytest.raises(FileFormatError, match=r"no <!-- Y-START --> \.\.\. <!-- Y-END --> block; add the two markers"):
        replace_marked_block(doc, "<!-- Y-START -->", "<!-- Y-END -->", "anything")
    assert doc.read_bytes() == before  # refused before anything is written
