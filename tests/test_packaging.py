"""Packaging: the optional extras stay optional, and the CLI starts without them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]

BLOCK_EXTRAS = """
import sys
for name in ("open_clip", "diffusers", "peft", "sklearn", "matplotlib"):
    sys.modules[name] = None  # importing any of them now raises ImportError
"""


def test_cli_and_core_work_without_the_optional_extras():
    """`pip install vlmsafe` (no extras) must give a working CLI and steering/eval/merge library."""
    code = BLOCK_EXTRAS + (
        "import vlmsafe.steering, vlmsafe.eval, vlmsafe.merge, vlmsafe.data, vlmsafe.loading\n"
        "from vlmsafe.cli import main\n"
        "for cmd in ([], ['calibrate'], ['evaluate'], ['merge'], ['safeclip'], ['probe']):\n"
        "    try:\n"
        "        main([*cmd, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (cmd, exc.code)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def test_dependencies_are_ranges_and_constraints_pin_them():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = [d for d in meta["dependencies"] if "==" in d]
    assert not pinned, f"core dependencies must be ranges a host environment can satisfy, not pins: {pinned}"
    constraints = {
        line.split("==")[0].lower().replace("_", "-")
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    extras = meta["optional-dependencies"]
    for dep in meta["dependencies"] + extras["safeclip"] + extras["probes"]:
        name = dep.split(">")[0].split("<")[0].split("=")[0].strip().lower().replace("_", "-")
        assert name in constraints, f"{name} has no tested version in constraints.txt"
