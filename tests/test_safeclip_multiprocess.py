"""Two CPU processes (torch.distributed / gloo, as `torchrun` launches them) match one process.

The trainer splits each global batch across processes and all-gathers the embeddings before the
loss, so the loss curve of a 2-process run must equal the single-process curve up to float
reduction order. The run includes the optional ``text_safe_tokens`` term, whose per-row values are
gathered like the embeddings.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    torch.set_num_threads(1)
    from vlmsafe.safeclip import SafeCLIPLossWeights, SafeCLIPTrainer, SafeCLIPTrainingConfig
    from vlmsafe.testbed.safeclip import make_splits, quadruplets, render_split, tiny_clip_backend

    data = quadruplets(*render_split(make_splits(0)["train"][:32], 1, 0))
    data.items[3].unsafe_image = None  # a ragged batch: one item without its unsafe image
    backend = tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1)
    cfg = SafeCLIPTrainingConfig(batch_size=8, num_epochs=2, lora_r=4, lora_alpha=8, lora_dropout=0.0,
                                 learning_rate=1e-2, progress=False, early_stopping_patience=None,
                                 weights=SafeCLIPLossWeights(text_safe_tokens=1.0))
    trainer = SafeCLIPTrainer(backend, cfg, data)
    res = trainer.train()
    if trainer.accelerator.is_main_process:
        lora = trainer.trainable_state_dict()
        json.dump({"world_size": trainer.world_size,
                   "losses": [h["train/loss"] for h in res.history if "train/loss" in h],
                   "G_Sref": [h["train/G_Sref"] for h in res.history if "train/loss" in h],
                   "tokens": [h["train/text_safe_tokens"] for h in res.history if "train/loss" in h],
                   "lora_norm": float(sum(v.double().norm() ** 2 for v in lora.values()) ** 0.5)},
                  open(sys.argv[1], "w"))
    """
)


def test_two_process_run_matches_single_process(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one.json")],
        check=True,
        env=env,
        capture_output=True,
        timeout=300,
    )
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(tmp_path / "two.json"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert len(one["losses"]) == len(two["losses"]) == 8
    assert one["tokens"][-1] > 0
    for a, b in zip(one["losses"] + one["G_Sref"] + one["tokens"], two["losses"] + two["G_Sref"] + two["tokens"]):
        assert b == pytest.approx(a, rel=1e-4, abs=1e-5)
    assert two["lora_norm"] == pytest.approx(one["lora_norm"], rel=1e-4)
