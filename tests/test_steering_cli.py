import json

import pytest
import torch

from vlmsafe.cli import main
from vlmsafe.steering import SafeVLM, ShiftVectors, load_model
from vlmsafe.testing import random_image, tiny_llava


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, processor = tiny_llava(seed=3)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    (root / "img").mkdir()
    lines = []
    for i, prompt in enumerate(["how do i make a bomb ?", "what colour is the shape ?", "describe the picture"]):
        random_image(i).save(root / "img" / f"{i}.png")
        lines.append(json.dumps({"id": str(i), "prompt": prompt, "image": f"img/{i}.png", "label": "harmful"}))
    (root / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_saved_model_round_trips(saved_llava):
    model, processor = load_model(saved_llava / "model")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    out = SafeVLM(model, processor, max_new_tokens=3).generate("hello", random_image(0))
    assert isinstance(out, str)


def test_calibrate_then_generate(saved_llava, capsys):
    out_dir = saved_llava / "vectors"
    assert main(["calibrate", "--model", str(saved_llava / "model"), "--data", str(saved_llava / "calib.jsonl"),
                 "--out", str(out_dir), "--layers", "0-1", "--batch-size", "2"]) == 0
    vectors = ShiftVectors.load(out_dir)
    assert vectors.layers == [0, 1] and vectors.meta["num_items"] == 3
    assert vectors.meta["model_name"] == str(saved_llava / "model")
    capsys.readouterr()
    args = ["generate", "--model", str(saved_llava / "model"), "--image", str(saved_llava / "img" / "0.png"),
            "--prompt", "how do i make a bomb ?", "--max-new-tokens", "4"]
    assert main(args) == 0
    plain = capsys.readouterr().out.strip()
    assert main([*args, "--vectors", str(out_dir), "--alpha", "0"]) == 0
    assert capsys.readouterr().out.strip() == plain
    assert main([*args, "--sample-level", "--alpha", "1"]) == 0
    assert len(capsys.readouterr().out.strip()) > 0


def test_cli_errors_are_one_line(saved_llava, capsys, tmp_path):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "has no config.json" in err and "Traceback" not in err
    assert main(["generate", "--model", str(saved_llava / "model"), "--prompt", "x",
                 "--image", str(tmp_path / "nope.png")]) == 2
    assert "image file" in capsys.readouterr().err
    other = tmp_path / "vec"
    ShiftVectors(shifts={0: torch.zeros(48)}, meta={"num_layers": 3}).save(other)
    assert main(["generate", "--model", str(saved_llava / "model"), "--prompt", "x", "--vectors", str(other)]) == 2
    assert "vectors have 48, model has 32" in capsys.readouterr().err


def test_two_process_calibration_matches_one(saved_llava, tmp_path):
    """`torchrun --nproc_per_node 2 -m vlmsafe.cli calibrate` (gloo on CPU) equals one process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    args = ["calibrate", "--model", str(saved_llava / "model"), "--data", str(saved_llava / "calib.jsonl"),
            "--batch-size", "1"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlmsafe.cli",
         *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one, two = ShiftVectors.load(tmp_path / "one"), ShiftVectors.load(tmp_path / "two")
    assert one.meta["num_items"] == two.meta["num_items"] == 3
    assert one.meta["calibration_sha256"] == two.meta["calibration_sha256"]
    for layer in one.layers:
        torch.testing.assert_close(two.shifts[layer], one.shifts[layer], atol=1e-6, rtol=0)
        assert two.stats[layer]["mm_norm"] == pytest.approx(one.stats[layer]["mm_norm"], rel=1e-6)
