"""The speed benchmarks run end to end and end with their target lines, and the GPU recipe's commands parse.

A GPU is lent rarely and for minutes: a benchmark that crashes on a flag or a renamed row there costs the whole
measurement. These runs use a model a few layers wide and one or two repeats, so they check that every block runs
and every target line is printed, not the figures (those live in ``benchmarks/results/``).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
TARGET = re.compile(r"^(?P<measure>[^\n]+): (?P<figure>[^\n]+) \(target (?P<rule>[^\n]+): (?P<verdict>met|missed)\)$",
                    re.M)


def _run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _targets(out: str) -> dict[str, str]:
    return {m["measure"]: m["verdict"] for m in TARGET.finditer(out)}


def test_steering_overhead_runs_every_block_and_prints_its_targets():
    proc = _run("benchmarks/steering_overhead.py", "--hidden", "64", "--layers", "2", "--batch", "2",
                "--new-tokens", "4", "--sample-new-tokens", "2", "--caption-tokens", "2", "--repeats", "2",
                "--shiftdc-repeats", "1", "--inner", "2", "--decode-rounds", "3", "--no-compiled")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "2 interleaved repeats (the fastest of 2 runs each)" in out
    for block in ("4 new tokens", "decode step (3 rounds of 4)", "2 new tokens", "ShiftDC, 4 new tokens"):
        assert re.search(rf"^{re.escape(block)} +seconds", out, re.M), out
    assert set(_targets(out)) == {"dataset-level overhead above the no-op-hook floor, per decode step",
                                  "sample-level extra cost (2 new tokens)"}, out
    assert "same tokens as the hook path: {'static': True}" in out
    assert "decode step: steering changes the logits: True" in out


def test_evaluate_throughput_runs_and_prints_its_targets():
    proc = _run("benchmarks/evaluate_throughput.py", "--hidden", "64", "--layers", "2", "--items", "4",
                "--batch", "2", "--new-tokens", "2", "--repeats", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(_targets(proc.stdout)) == {
        "evaluate throughput / plain batched generation (same items, same batch size)",
        "evaluate sample-level extra cost over unsteered"}, proc.stdout
    assert "same responses as plain generate: evaluate True, input order True" in proc.stdout


def _gpu_recipe_commands() -> list[list[str]]:
    """The Python commands of ``benchmarks/gpu_speed.sh``, with its ``common`` flags spelled out."""
    text = (BENCH / "gpu_speed.sh").read_text().replace("\\\n", " ")
    common = shlex.split(re.search(r"^common=\((.*)\)$", text, re.M)[1])
    commands = []
    for line in text.splitlines():
        if '"$py" benchmarks/' in line:
            words = shlex.split(line.split('"$py"', 1)[1].split("2>&1")[0])
            commands.append([w for word in words for w in (common if word == "${common[@]}" else [word])])
    return commands


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU these commands run the real benchmark")
def test_gpu_recipe_commands_parse_and_skip_without_a_gpu():
    """Every command of the GPU recipe gets past its argument parser (a misspelt flag would exit 2 on the GPU
    machine, after its start-up); on a machine without CUDA each stops with exit 77 and one line."""
    commands = _gpu_recipe_commands()
    assert [c[0] for c in commands] == ["benchmarks/steering_overhead.py"] * 2 + ["benchmarks/evaluate_throughput.py"]
    for command in commands:
        proc = _run(*command, timeout=120)
        assert proc.returncode == 77, (command, proc.stdout, proc.stderr[-2000:])
        assert proc.stdout.strip().endswith("--device cuda asked for but no CUDA device is present"), proc.stdout
