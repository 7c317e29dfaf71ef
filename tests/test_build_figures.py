"""Build-time and run-time figures agree everywhere they appear: the README, the documentation pages and the
assets' READMEs state what the assets' ``build_info.json`` recorded (testbed build minutes, the text-to-image
testbed's CPU seconds, the demo's wall and CPU seconds and its machine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "assets").glob("*/README.md"))]


def info(name: str) -> dict:
    return json.loads((ROOT / "assets" / name / "build_info.json").read_text(encoding="utf-8"))


def mentions(pattern: str) -> list[tuple[str, re.Match]]:
    return [(path.relative_to(ROOT).as_posix(), m) for path in TEXTS
            for m in re.finditer(pattern, path.read_text(encoding="utf-8"))]


def test_testbed_build_minutes_agree_with_its_build_info():
    """Both READMEs state the build's CPU minutes with one torch thread (what a rebuild costs on an idle core)
    and the recorded build's wall minutes, as build_info.json records them."""
    built = info("testbed")
    cpu, wall = built["cpu_s"]["total_build"] / 60, built["timings_s"]["total_build"] / 60
    found = mentions(r"(\d+) minutes of CPU with one torch thread; the recorded build took (\d+) minutes wall")
    assert {name for name, _ in found} >= {"README.md", "assets/testbed/README.md"}, found
    for name, m in found:
        assert (int(m[1]), int(m[2])) == (round(cpu), round(wall)), (name, m[0], cpu, wall)


def test_text_to_image_build_cpu_seconds_agree_with_its_build_info():
    cpu = info("t2i")["cpu_seconds"]
    found = mentions(r"about (\d+) s of CPU time")
    assert {name for name, _ in found} >= {"docs/safeclip.md", "assets/t2i/README.md"}, found
    for name, m in found:
        assert int(m[1]) == round(cpu, -1), f"{name}: {m[0]!r}, build_info.json: {cpu} s of CPU"


def test_the_demo_time_in_the_readme_is_the_recorded_run():
    """The README's demo block states the run recorded in the testbed's build_info.json (``measured``): its wall
    seconds, and once recorded, its CPU seconds and the machine's CPU and cores."""
    measured = info("testbed")["measured"]
    block = (ROOT / "README.md").read_text(encoding="utf-8").split("<!-- DEMO-TABLE-START -->")[1]
    head = block.split("Each cell:")[0]
    wall = re.search(r"(?:CPU, (\d+) s\)|(\d+) s wall)", head)
    assert wall, head
    assert int(wall[1] or wall[2]) == round(measured["seconds"])
    if measured.get("cpu_seconds") is not None:
        from vlmsafe.demo.table import run_time

        assert run_time(measured) in head
