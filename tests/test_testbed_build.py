"""The testbed build: a seconds-long smoke build (fast suite), its output policy, and the full,
seeded rebuild compared with the shipped figures (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration

from vlmsafe.cli.build_testbed import main
from vlmsafe.errors import InputError, OutputExistsError
from vlmsafe.testbed import load_split, testbed_dir
from vlmsafe.testbed.build import STAGES, BuildConfig, build_testbed

TINY = dict(
    pretrain=(2, 1e-3, 8),
    align=(2, 1e-3, 8),
    vision=(2, 1e-3, 8),
    vl_pretrain=(2, 1e-3, 8),
    vl_finetune=(2, 1e-3, 8),
    n_train_images=16,
    n_instruction_images=8,
    n_random_topics=20,
    threads=1,
    split_topic_limit=30,
)


def test_smoke_build_writes_a_loadable_testbed(tmp_path):
    lines = []
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        info = build_testbed(tmp_path / "tb", BuildConfig(**{**TINY, "threads": 1}), log=lines.append)
        assert torch.get_num_threads() == 2  # the build's own thread count does not leak to the caller
    finally:
        torch.set_num_threads(threads)
    out = tmp_path / "tb"
    model = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    lm = LlamaForCausalLM.from_pretrained(out / "aligned_lm", local_files_only=True)
    assert lm.config.vocab_size == model.config.text_config.vocab_size == len(processor.tokenizer)
    assert info["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["build_command"].endswith("--seed 0 --overwrite")
    assert [line.split(":")[0] for line in lines] == [name for name, _ in STAGES]
    assert set(info["timings_s"]) == {name for name, _ in STAGES} | {"total_build"}
    items = load_split("test", out)
    assert {it["label"] for it in items} == {"harmful", "benign"} and any(it["reference"] for it in items)
    assert json.loads((out / "build_info.json").read_text())["seed"] == 0
    assert "Not measured yet" in (out / "README.md").read_text()


def test_each_stage_trains_only_its_parts():
    """(v) trains the vision tower only, (c1) the projector only, (c2) projector + LM, never the vision tower."""
    from vlmsafe.testbed.build import prepare

    b = prepare(BuildConfig(**TINY))
    parts = {"lm": b.lm_params, "vision": b.vision_params, "projector": b.projector_params}
    expected = {
        "a_pretrain": {"lm"},
        "b_align": {"lm"},
        "v_vision_pretrain": {"vision"},
        "c1_vl_pretrain": {"projector"},
        "c2_vl_finetune": {"lm", "projector"},
    }
    for name, stage in STAGES:
        before = {k: [p.detach().clone() for p in ps] for k, ps in parts.items()}
        stage(b)
        moved = {k for k, ps in parts.items() if any(not torch.equal(a, p) for a, p in zip(before[k], ps))}
        assert moved == expected[name], name


def test_build_refuses_an_existing_folder(tmp_path, capsys):
    out = tmp_path / "tb"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="`overwrite=True`"):
        build_testbed(out, BuildConfig(**TINY))
    assert main(["--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_full_rebuild_reproduces_shipped_figures(tmp_path):
    """Rebuild with the shipped seed and measure it like the shipped one: rates within 5 points."""
    from vlmsafe.demo.check import measure_testbed

    shipped = json.loads((testbed_dir() / "build_info.json").read_text())
    build_testbed(tmp_path / "tb", BuildConfig(seed=shipped["seed"]))
    rebuilt = measure_testbed(tmp_path / "tb")
    for a, b in zip(shipped["measured"]["rows"], rebuilt["rows"]):
        assert a["setting"] == b["setting"]
        for group, outcome in (("harmful", "refusal"), ("harmful", "compliance"), ("benign", "refusal")):
            assert abs(a[group][outcome]["rate"] - b[group][outcome]["rate"]) <= 0.05, (a["setting"], group, outcome)
        if a["accuracy"]:
            assert abs(a["accuracy"]["rate"] - b["accuracy"]["rate"]) <= 0.05, a["setting"]


@pytest.mark.parametrize(
    "bad",
    [
        {"c2_echo_refusal_share": float("nan")},
        {"c2_idiom_share": 1.5},
        {"c2_impossible_share": -0.1},
        {"c2_replay_refusals": float("inf")},
        {"c2_mix": (0.0, 0.0, 0.0)},
        {"c2_mix": (0.4, float("nan"), 0.1)},
    ],
)
def test_config_refuses_bad_shares_before_any_work(bad):
    with pytest.raises(InputError, match=next(iter(bad)).split("_share")[0].split("_refusals")[0]):
        BuildConfig(**bad)
