"""`vlmsafe calibrate` recommends a setting chosen on items it holds out; generate / evaluate use it."""

from __future__ import annotations

import json

import pytest
import torch

from vlmsafe.cli import main
from vlmsafe.data import Item
from vlmsafe.errors import InputError
from vlmsafe.steering import ShiftVectors
from vlmsafe.steering.recommend import split_for_tuning
from vlmsafe.testbed import testbed_dir
from vlmsafe.testing import random_image, tiny_llava


def _items(n_harmful: int, n_benign: int) -> list[Item]:
    labels = ["harmful"] * n_harmful + ["benign"] * n_benign
    return [Item(id=str(i), prompt=f"p{i}", image=None, label=lab) for i, lab in enumerate(labels)]


def test_split_for_tuning_is_stratified_deterministic_and_says_why_not():
    keep, held, reason = split_for_tuning(_items(40, 40), 0.25)
    assert reason is None and len(held) == 20 and len(keep) == 60
    assert [it.id for it in held if it.label == "harmful"] == [str(i) for i in range(3, 40, 4)]
    assert split_for_tuning(_items(40, 40), 0.25)[1] == held  # the same items every time
    keep, held, reason = split_for_tuning(_items(8, 40), 0.25)
    assert held == [] and len(keep) == 48 and "2 harmful and 10 benign held-out items" in reason
    assert split_for_tuning(_items(40, 40), 0.0)[2] == "not tuned (--tune-share 0)"
    with pytest.raises(InputError, match="tune share must be in"):
        split_for_tuning(_items(4, 4), 1.0)


def _mixed_calibration(root, path, per_group: int = 20) -> None:
    """``per_group`` harmful, benign and image-question records of the testbed's calibration split."""
    groups: dict[str, list] = {}
    for line in (root / "data" / "calibration.jsonl").read_text().splitlines():
        rec = json.loads(line)
        key = "vqa" if rec["reference"] is not None else rec["label"]
        rec["image"] = str(root / "data" / rec["image"])
        groups.setdefault(key, []).append(json.dumps(rec))
    path.write_text("\n".join(line for g in groups.values() for line in g[::3][:per_group]) + "\n")


@pytest.mark.slow  # a sweep of 30 settings on 15 held-out items: 1-5 minutes of CPU
def test_calibrate_records_the_recommended_setting(tmp_path, capsys):
    root = testbed_dir(None)
    out, data = tmp_path / "vectors", tmp_path / "calib.jsonl"
    _mixed_calibration(root, data)
    assert main(["calibrate", "--model", str(root), "--data", str(data), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "vectors.json").read_text())
    rec = meta["recommended"]
    assert rec["status"] in ("tuned", "none-qualified") and rec["held_out_items"] > 0
    assert meta["num_items"] == 60 - rec["held_out_items"]  # the vectors never saw the held-out items
    assert rec["rule"] == "most-refusals-point" and "too few for the paired margin" in rec["note"]
    card = (out / "README.md").read_text()
    if rec["status"] == "tuned":
        assert f"alpha {rec['alpha']:g}, layers {rec['layers']}" in printed
        assert "recommended by calibration" in card
    else:
        assert rec["reason"] in printed and "untuned" in card


def test_calibrate_without_tuning_says_so(tmp_path, capsys):
    root = testbed_dir(None)
    data = tmp_path / "calib.jsonl"
    _mixed_calibration(root, data, per_group=4)
    assert main(["calibrate", "--model", str(root), "--data", str(data), "--out", str(tmp_path / "untuned"),
                 "--tune-share", "0", "--no-progress"]) == 0
    assert "recommended setting: not tuned (--tune-share 0)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "untuned" / "vectors.json").read_text())
    assert meta["recommended"] == {"status": "untuned", "reason": "not tuned (--tune-share 0)"}
    assert meta["num_items"] == 12  # every item calibrates when none is held out
    assert "untuned: not tuned (--tune-share 0)" in (tmp_path / "untuned" / "README.md").read_text()
    # too few labelled items to hold out: every item calibrates, and the reason is recorded
    assert main(["calibrate", "--model", str(root), "--data", str(data), "--out", str(tmp_path / "few"),
                 "--no-progress"]) == 0
    rec = json.loads((tmp_path / "few" / "vectors.json").read_text())["recommended"]
    assert rec["status"] == "untuned" and "fewer than 4 each" in rec["reason"]


def test_generate_uses_the_recommended_setting_unless_told_otherwise(tmp_path, capsys):
    model, processor = tiny_llava(seed=3)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    random_image(0).save(tmp_path / "0.png")
    n, h = model.config.text_config.num_hidden_layers, model.config.text_config.hidden_size
    gen = torch.Generator().manual_seed(0)
    shifts = {layer: 5 * torch.randn(h, generator=gen) for layer in range(n)}
    rec = {"status": "tuned", "alpha": 0.5, "layers": [1], "rule": "most-refusals", "held_out_items": 10}
    ShiftVectors(shifts=shifts, meta={"num_layers": n, "recommended": rec}).save(tmp_path / "vec")
    args = ["generate", "--model", str(tmp_path / "model"), "--image", str(tmp_path / "0.png"), "--prompt",
            "hello", "--max-new-tokens", "6", "--vectors", str(tmp_path / "vec")]
    capsys.readouterr()
    assert main(args) == 0
    used = capsys.readouterr()
    assert "steering with the setting recommended at calibration (alpha 0.5, layers [1])" in used.err
    assert main([*args, "--alpha", "0.5", "--layers", "1"]) == 0
    explicit = capsys.readouterr()
    assert explicit.out == used.out and "recommended" not in explicit.err
    assert main([*args, "--alpha", "0", "--layers", "all"]) == 0
    assert "recommended" not in capsys.readouterr().err
