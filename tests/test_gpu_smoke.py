"""benchmarks/gpu_smoke.py: every stage end to end on the CPU at tiny width, its skip without a GPU, and its
failure reporting."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
STAGES = [f"{family}/{stage}" for family in ("llava-1.5", "qwen2-vl")
          for stage in ("build", "calibrate", "steer-dataset", "steer-sample", "evaluate")]
STAGES.insert(5, "llava-1.5/dispatch")
STAGES += ["safeclip", "merge"]


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_smoke"] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_smoke", None)


def test_cpu_run_passes_every_stage(smoke, capsys):
    threads = torch.get_num_threads()
    try:
        code = smoke.main(["--device", "cpu", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in STAGES}
    assert code == 0, out
    assert list(rows) == STAGES
    assert all("  ok  " in row for row in rows.values()), out
    assert "64 image tokens (112 px)" in rows["llava-1.5/build"]  # (112 / 14) ** 2: LLaVA's expansion
    for stage in ("llava-1.5/steer-dataset", "llava-1.5/steer-sample", "qwen2-vl/steer-dataset"):
        assert "alpha 0 == plain; batched equal" in rows[stage]
    assert "greedy equal (plain, dataset, sample); vectors within 0" in rows["llava-1.5/dispatch"]
    assert "20 LoRA steps" in rows["safeclip"] and "merged LM = mean" in rows["merge"]
    assert f"all {len(STAGES)} stages passed" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the default run would not skip")
def test_without_a_gpu_the_default_run_skips_with_one_line(smoke, capsys):
    assert smoke.main([]) == smoke.EXIT_NO_GPU == 77
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "skipped: no CUDA device" in captured.err and "--device cpu" in captured.err


def test_failures_are_reported_and_fail_the_run(smoke, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise smoke.CheckFailed("batched differs from one by one")

    def crashing(*args, **kwargs):
        raise RuntimeError("out of memory\nsecond line")

    monkeypatch.setattr(smoke, "build_llava", broken)
    monkeypatch.setattr(smoke, "build_qwen2_vl", crashing)
    monkeypatch.setattr(smoke.Smoke, "safeclip", lambda self: "fine")
    monkeypatch.setattr(smoke.Smoke, "merge", lambda self: "fine")
    assert smoke.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL llava-1.5/build: batched differs from one by one" in out
    assert "FAIL qwen2-vl/build: RuntimeError: out of memory\n" in out  # first line of the error only
    assert "gpu_smoke: 2 of 4 stages failed" in out


def test_greedy_comparison_allows_only_near_ties(smoke):
    def run(tokens, top2):
        logits = torch.zeros(len(tokens), 5)
        for step, (a, b) in enumerate(top2):
            logits[step, 0], logits[step, 1] = a, b
        return smoke.Run([tokens], [logits])

    same = run([3, 4], [(2.0, 1.0), (2.0, 1.0)])
    assert smoke.same_greedy(same, same, 1e-4, "x") == "equal"
    # a numerical tie: both runs had their top two tokens within the tolerance where they diverge
    a, b = run([3, 4], [(2.0, 1.0), (1.00001, 1.0)]), run([3, 1], [(2.0, 1.0), (1.00002, 1.0)])
    assert smoke.same_greedy(a, b, 1e-4, "x") == "equal up to row 0 near-tie at step 1"
    for clear in (same, run([3, 1], [(2.0, 1.0), (5.0, 1.0)])):  # either run sure of its choice: a real difference
        with pytest.raises(smoke.CheckFailed, match=r"row 0 differs at step 1 with top-2 logit gaps"):
            smoke.same_greedy(clear, b if clear is same else a, 1e-4, "x")
    with pytest.raises(smoke.CheckFailed, match="differs in length only"):
        smoke.same_greedy(same, run([3], [(2.0, 1.0)]), 1e-4, "x")
