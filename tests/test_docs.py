"""The documentation site (docs/, mkdocs.yml): every page's examples run as written, and the CLI reference
is each command's ``--help``.

A page's ```python blocks and the commands of its ```bash / ```shell / ```console blocks run in document
order as one script (a command becomes a ``bash -c`` subprocess at its place, so a Python block can read
what a command wrote and the other way round), offline, in a temporary folder holding links to the
checkout's bundled ``assets``, the benchmark fixtures (``tests``) and ``benchmarks``, with this Python's
``bin`` first on ``PATH`` (``vlmsafe``, ``python``, ``torchrun``). A command that cannot run there -- it
downloads, needs a GPU or a user's own checkpoint, or is the test suite itself -- ends with a
``# not run: REASON`` comment: it is skipped, counted and listed (:func:`not_run`), and the list is kept short.
The README is run the same way (``tests/test_readme.py``). Every ``vlmsafe`` command, run or not, is also
parsed by the CLI's own parser in the fast suite (:func:`test_every_documented_vlmsafe_command_parses`).
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
SHELLS = ("bash", "shell", "sh", "console")
FENCE = re.compile(r"^```(python|bash|shell|sh|console)\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"#\s*not run:\s*(.*)$")
PAGES = sorted(p.name for p in DOCS.glob("*.md") if FENCE.search(p.read_text(encoding="utf-8")))
#: Every Markdown file whose shell commands must run: the README and each documentation page.
DOCUMENTS = [ROOT / "README.md", *(DOCS / page for page in PAGES)]

PRELUDE = '''\
import subprocess as _subprocess


def _sh(command):
    run = _subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    print(run.stdout, end="", flush=True)
    if run.returncode != 0:
        raise SystemExit(f"`{command}` exited with {run.returncode}:\\n{run.stderr[-3000:]}")
'''


def blocks(path: Path) -> list[tuple[str, str]]:
    """``(language, text)`` of every runnable fenced block of a Markdown file, in order."""
    return FENCE.findall(path.read_text(encoding="utf-8"))


def shell_commands(block: str, lang: str = "bash") -> list[str]:
    """The command lines of a shell block (``\\`` continuations joined; a ``console`` block's ``$ `` lines),
    comment-only lines dropped; a trailing comment (``# not run: ...``) is kept for :func:`not_run_reason`."""
    lines = block.replace("\\\n", " ").splitlines()
    if lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def not_run_reason(command: str) -> str | None:
    match = NOT_RUN.search(command)
    return match[1].strip() if match else None


def document_script(path: Path) -> str:
    """The Python script that runs ``path``'s examples in order (see the module docstring)."""
    parts = [PRELUDE]
    for i, (lang, block) in enumerate(blocks(path)):
        parts.append(f"# --- {path.name} block {i} ({lang})")
        if lang == "python":
            parts.append(block)
            continue
        for command in shell_commands(block, lang):
            if not_run_reason(command) is None:
                parts.append(f"_sh({command!r})")
            else:
                parts.append(f"# {command}")
    return "\n".join(parts) + "\n"


def not_run() -> list[tuple[str, str, str]]:
    """``(file, command, reason)`` for every shell command marked ``# not run:`` in the README and the docs."""
    out = []
    for path in DOCUMENTS:
        for lang, block in blocks(path):
            if lang in SHELLS:
                out += [(path.name, c, not_run_reason(c)) for c in shell_commands(block, lang) if not_run_reason(c)]
    return out


def run_document(path: Path, tmp_path: Path, *, timeout: int = 1800) -> subprocess.CompletedProcess:
    (tmp_path / "document.py").write_text(document_script(path), encoding="utf-8")
    for name in ("assets", "tests", "benchmarks"):
        (tmp_path / name).symlink_to(ROOT / name)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run([sys.executable, "document.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)


def run_page(page: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return run_document(DOCS / page, tmp_path)


def test_every_task_page_has_examples():
    assert {"steering.md", "calibrate.md", "evaluate.md", "safeclip.md", "merge.md", "probes.md"} <= set(PAGES)
    for page in PAGES:
        blocks = FENCE.findall((DOCS / page).read_text(encoding="utf-8"))
        assert any(lang == "python" for lang, _ in blocks), f"{page} has no Python example"


def test_shell_lines_become_commands_in_document_order(tmp_path):
    script = document_script(DOCS / "steering.md")
    assert "_sh('vlmsafe calibrate --model assets/testbed" in script
    assert script.index("vectors.save(\"vectors\")") < script.index("_sh('vlmsafe calibrate")
    assert shell_commands("pip install x\nvlmsafe merge a.yaml \\\n  --overwrite  # note\n") == [
        "pip install x", "vlmsafe merge a.yaml    --overwrite  # note"]
    assert shell_commands("$ vlmsafe --version\nvlmsafe 0.1\n", "console") == ["vlmsafe --version"]
    page = tmp_path / "page.md"
    page.write_text("```bash\nvlmsafe --version\npip install x  # not run: downloads\n```\n")
    assert "_sh('vlmsafe --version')" in document_script(page)
    assert "_sh('pip install x" not in document_script(page) and "# pip install x  # not run" in document_script(page)


def test_a_failing_command_fails_the_document(tmp_path):
    """What the slow tests rely on: a command that exits non-zero (here: `probe weights` without its required
    --out) stops the document's script with the command and its error."""
    page = tmp_path / "page.md"
    page.write_text("```bash\nvlmsafe probe weights --before assets/testbed/aligned_lm --after assets/testbed\n```\n")
    work = tmp_path / "work"
    work.mkdir()
    run = run_document(page, work, timeout=300)
    assert run.returncode != 0
    command = "vlmsafe probe weights --before assets/testbed/aligned_lm --after assets/testbed"
    assert f"`{command}` exited with 2" in run.stderr
    assert "the following arguments are required: --out" in run.stderr


#: The commands the README and the docs show but the tests cannot run, at most this many (each says why).
MAX_NOT_RUN = 15


def test_commands_that_are_not_run_are_few_and_say_why():
    skipped = not_run()
    assert 0 < len(skipped) <= MAX_NOT_RUN, "\n".join(f"{f}: {c}" for f, c, _ in skipped)
    for name, command, reason in skipped:
        assert len(reason.split()) >= 2, f"{name}: `{command}` needs a reason after 'not run:'"
    # what the marks are for: downloads, GPUs, a user's own checkpoint, the suite itself
    assert {c.split()[0] for _, c, _ in skipped} <= {"python3", ".venv/bin/pip", "pip", "make", "vlmsafe", "python",
                                                    "accelerate"}


def _vlmsafe_argv(command: str) -> list[str] | None:
    """The ``vlmsafe`` arguments of a documented command (``vlmsafe ...``, ``python -m vlmsafe.cli ...``,
    ``torchrun ... -m vlmsafe.cli ...``, ``accelerate launch ... -m vlmsafe.cli ...``), else ``None``."""
    words = shlex.split(command, comments=True)
    if words and words[0] == "vlmsafe":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["vlmsafe.cli"]:
        return words[words.index("-m") + 2:]
    return None


def test_every_documented_vlmsafe_command_parses(monkeypatch):
    """Each ``vlmsafe`` command of the README's and the docs' shell blocks, run by the tests or not, is accepted
    by the CLI's parser as written: a missing required option or a renamed flag fails here, in the fast suite."""
    from vlmsafe.cli import build_parser

    parser = build_parser()
    checked, refused = 0, []
    for path in DOCUMENTS:
        for lang, block in blocks(path):
            for command in shell_commands(block, lang) if lang in SHELLS else []:
                argv = _vlmsafe_argv(command)
                if argv is None:
                    continue
                err = io.StringIO()
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    try:
                        args, extras = parser.parse_known_args(argv)
                        ok = not extras and (getattr(args, "func", None) is not None or argv == ["--version"])
                    except SystemExit as exc:
                        ok = exc.code == 0
                checked += 1
                if not ok:
                    refused.append(f"{path.name}: `{command}`: {err.getvalue().strip()}")
    assert checked >= 40
    assert not refused, "\n".join(refused)


def test_the_demo_block_generator_writes_commands_that_parse():
    """The README's demo block is generated (``vlmsafe.demo.table``); its inline ``vlmsafe probe weights`` command
    must run as written too."""
    from vlmsafe.cli import build_parser
    from vlmsafe.demo.table import merge_paragraph

    sweep = [{"weight": w, "calibration": {"harmful": {"refusal": 0.5}, "accuracy": 0.8,
                                           "benign": {"compliance": 1.0}}} for w in (0.0, 1.0)]
    text = merge_paragraph({"safety_merge": {"sweep": sweep}}, [{"layer": 0, "relative_change": 0.4}])
    commands = [c for c in re.findall(r"`(vlmsafe [^`]+)`", text) if "--" in c]
    assert commands
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])  # SystemExit (exit 2) if a required option is missing


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
