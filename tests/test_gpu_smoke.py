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
#: The other families the CPU test runs (a plain decoder, the cross-attention one, the fused-experts one); all of
#: them: the slow test.
QUICK_FAMILIES = ("gemma3", "mllama", "qwen3_vl_moe")


def _family_stages(families):
    return [f"{family}/{stage}" for family in families for stage in ("build", "steer", "sample", "merge")]


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


def _run(smoke, capsys, families):
    threads = torch.get_num_threads()
    try:
        code = smoke.main(["--device", "cpu", "--threads", "1", "--families", ",".join(families)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    stages = STAGES + _family_stages(families)
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in stages}
    assert code == 0, out
    assert list(rows) == stages
    assert all("  ok  " in row for row in rows.values()), out
    assert f"all {len(stages)} stages passed" in out
    return rows


def test_cpu_run_passes_every_stage(smoke, capsys):
    rows = _run(smoke, capsys, QUICK_FAMILIES)
    for family in ("gemma3", "qwen3_vl_moe"):
        assert "alpha 0 == plain; batched equal" in rows[f"{family}/steer"]
        assert "alpha 0 == plain; batched equal" in rows[f"{family}/sample"]
        assert "LM tensors = mean" in rows[f"{family}/merge"] and "kept bit for bit" in rows[f"{family}/merge"]
    assert "given vectors: alpha 0 == plain; batched equal" in rows["mllama/steer"]
    assert "refused in one line (cross-attention" in rows["mllama/sample"]
    assert "loads as MllamaForConditionalGeneration" in rows["mllama/merge"]
    assert "loads as Qwen3VLMoeForConditionalGeneration" in rows["qwen3_vl_moe/merge"]
    assert "64 image tokens (112 px)" in rows["llava-1.5/build"]  # (112 / 14) ** 2: LLaVA's expansion
    for stage in ("llava-1.5/steer-dataset", "llava-1.5/steer-sample", "qwen2-vl/steer-dataset"):
        assert "alpha 0 == plain; batched equal" in rows[stage]
    assert "greedy equal (plain, dataset, sample); vectors within 0" in rows["llava-1.5/dispatch"]
    assert "20 LoRA steps" in rows["safeclip"] and "merged LM = mean" in rows["merge"]


@pytest.mark.slow
def test_cpu_run_passes_every_stage_on_every_family(smoke, capsys):
    rows = _run(smoke, capsys, smoke.FAMILIES)
    assert sum("LM tensors = mean" in rows[f"{family}/merge"] for family in smoke.FAMILIES) == len(smoke.FAMILIES)


def test_unknown_family_is_refused_in_one_line(smoke, capsys):
    with pytest.raises(SystemExit) as exit_:
        smoke.main(["--device", "cpu", "--families", "gemma3,llava_onevison"])
    assert exit_.value.code == 2
    assert "unknown families ['llava_onevison']; choose from llava_onevision" in capsys.readouterr().err


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
    assert smoke.main(["--device", "cpu", "--families", ""]) == 1
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


def test_a_training_stage_whose_loss_does_not_fall_is_not_ok(smoke):
    rising = [3.031, 3.105, 4.557, 3.426, 3.283, 4.615, 3.644, 3.306, 4.85, 3.675, 3.09, 2.217, 4.234, 4.126,
              3.606, 3.672, 2.832, 3.076, 2.172, 3.664]  # the Safe-CLIP stage that printed "ok" (3.03 -> 3.66)
    with pytest.raises(smoke.CheckFailed, match=r"^Safe-CLIP: the loss did not fall \(by 5% at least\): "
                                                r"loss 3\.0310 -> 3\.6640 "):
        smoke.training_check(rising, "Safe-CLIP")
    falling = [3.59, 3.56, 3.53, 3.49, 3.45, 3.41, 3.37, 3.32, 3.28, 3.23, 3.17, 3.12, 3.06, 3.01, 2.95, 2.89]
    assert smoke.training_check(falling, "x") == "loss 3.5900 -> 2.8900 (means of 3 steps: 3.5600 -> 2.9500, -17.1%)"
    with pytest.raises(smoke.CheckFailed, match="did not fall"):
        smoke.training_check([1.0] * 3 + [0.99] * 3, "x")  # a 1% dip: noise, not training
    assert "-1.0%" in smoke.training_check([1.0] * 3 + [0.99] * 3, "x", min_drop=0.0)
    with pytest.raises(smoke.CheckFailed, match="did not fall"):
        smoke.training_check([2.0, 3.0, 3.0, 3.0, 3.0, 1.9], "x")  # endpoints fall, the means rise
    with pytest.raises(smoke.CheckFailed, match="not finite"):
        smoke.training_check([*falling[:-1], float("nan")], "x")
    with pytest.raises(smoke.CheckFailed, match="need at least 6"):
        smoke.training_check([2.0, 1.0], "x")
