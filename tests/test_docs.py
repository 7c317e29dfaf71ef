"""The documentation site (docs/, mkdocs.yml): every page's examples run as written, and the CLI reference
is each command's ``--help``.

A page's ```python blocks and the ``vlmsafe ...`` lines of its ```bash blocks run in document order as one
script (a bash line becomes a ``vlmsafe`` subprocess at its place, so a Python block can read what a command
wrote and the other way round), offline, in a temporary folder holding an ``assets`` link to the checkout's
bundled assets and a ``tests`` link for the benchmark fixtures. Shell lines that are not ``vlmsafe``
commands (``pip``, ``make``) are installation steps and are not run here.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
FENCE = re.compile(r"^```(python|bash)\n(.*?)^```", re.S | re.M)
PAGES = sorted(p.name for p in DOCS.glob("*.md") if FENCE.search(p.read_text(encoding="utf-8")))

PRELUDE = '''\
import subprocess as _subprocess
import sys as _sys


def _vlmsafe(args, line):
    run = _subprocess.run([_sys.executable, "-m", "vlmsafe.cli", *args], capture_output=True, text=True)
    print(run.stdout, end="", flush=True)
    if run.returncode != 0:
        raise SystemExit(f"`{line}` exited with {run.returncode}:\\n{run.stderr[-3000:]}")
'''


def shell_commands(block: str) -> list[str]:
    """The ``vlmsafe`` command lines of a bash block (``\\`` continuations joined, comments dropped)."""
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("vlmsafe ")]


def page_script(page: str) -> str:
    parts = [PRELUDE]
    for i, (lang, block) in enumerate(FENCE.findall((DOCS / page).read_text(encoding="utf-8"))):
        parts.append(f"# --- {page} block {i} ({lang})")
        if lang == "python":
            parts.append(block)
        else:
            for line in shell_commands(block):
                parts.append(f"_vlmsafe({shlex.split(line, comments=True)[1:]!r}, {line!r})")
    return "\n".join(parts) + "\n"


def run_page(page: str, tmp_path: Path) -> subprocess.CompletedProcess:
    (tmp_path / "page.py").write_text(page_script(page), encoding="utf-8")
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    (tmp_path / "tests").symlink_to(ROOT / "tests")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "page.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)


def test_every_task_page_has_examples():
    assert {"steering.md", "calibrate.md", "evaluate.md", "safeclip.md", "merge.md", "probes.md"} <= set(PAGES)
    for page in PAGES:
        blocks = FENCE.findall((DOCS / page).read_text(encoding="utf-8"))
        assert any(lang == "python" for lang, _ in blocks), f"{page} has no Python example"


def test_bash_lines_become_vlmsafe_calls():
    script = page_script("steering.md")
    assert "_vlmsafe(['calibrate', '--model', 'assets/testbed'" in script
    assert shell_commands("pip install x\nvlmsafe merge a.yaml \\\n  --overwrite  # note\n") == [
        "vlmsafe merge a.yaml    --overwrite  # note"]


@pytest.mark.slow  # 20 s to 2 min a page on a 2-core CPU (they load models, train, merge): `make test-slow`
@pytest.mark.parametrize("page", PAGES)
def test_page_examples_run(page, tmp_path):
    result = run_page(page, tmp_path)
    assert result.returncode == 0, f"{page}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"


# --------------------------------------------------------------------------- CLI reference
_spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")  # docs/ is not a package
gen_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_cli)


def _help_in_process(argv: list[str]) -> str:
    """What ``vlmsafe ARGV --help`` prints, at the reference's width."""
    from vlmsafe.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def test_cli_reference_is_every_commands_help(monkeypatch):
    monkeypatch.setenv("COLUMNS", str(gen_cli.WIDTH))
    sections = gen_cli.help_texts()
    names = [command for command, _ in sections]
    # every command and subcommand, once each
    for expected in ("vlmsafe", "vlmsafe calibrate", "vlmsafe safeclip pairs train", "vlmsafe probe weights"):
        assert expected in names
    assert len(names) == len(set(names))
    page = gen_cli.cli_reference()
    for command, text in sections:
        assert _help_in_process(command.split()[1:]) == text, command
        assert f"## `{command}`" in page and text.rstrip("\n") in page, command


def test_cli_reference_matches_the_console_command():
    """One real ``vlmsafe ... --help`` process (the console entry point, not the in-process parser)."""
    env = {**os.environ, "COLUMNS": str(gen_cli.WIDTH), "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "vlmsafe.cli", "probe", "weights", "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert dict(gen_cli.help_texts())["vlmsafe probe weights"] == run.stdout


def test_the_site_build_generates_the_cli_reference():
    """mkdocs.yml runs the hook that adds cli.md; no hand-written cli.md can shadow it."""
    assert "docs/hooks.py" in (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert not (DOCS / "cli.md").exists()


@pytest.mark.slow
def test_site_builds_without_warnings_and_carries_the_cli_reference(tmp_path):
    """`make docs` in small: `mkdocs build --strict` passes, and the built CLI page is every command's --help."""
    pytest.importorskip("mkdocs", reason="the docs extra (pip install -e '.[docs]') is not installed")
    import html

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "WARNING" not in run.stderr, run.stderr[-3000:]
    built = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    page = html.unescape(re.sub(r"<[^>]+>", "", built))
    for command, text in gen_cli.help_texts():
        assert text.rstrip("\n") in page, command
    for module in ("steering", "adapters", "activations", "merge", "safeclip", "eval", "data", "io", "probes"):
        assert (tmp_path / "site" / "reference" / module / "index.html").is_file(), module
