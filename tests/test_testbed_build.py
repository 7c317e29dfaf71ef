"""The testbed build script: a seconds-long smoke build (fast suite) and the full, seeded rebuild
compared with the shipped figures (slow)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlamaForCausalLM, LlavaForConditionalGeneration

from vlmsafe.testbed import load_split, testbed_dir
from vlmsafe.testbed import data as D
from vlmsafe.testbed.build import BuildConfig, build_testbed


def test_split_topics_are_disjoint_combinations_of_training_words():
    s = D.split_topics(0, (0.15, 0.3))
    train = s["train"]
    names = {k: {t.text for t in v} for k, v in s.items()}
    assert not (names["train"] & names["test"]) and not (names["train"] & names["calibration"])
    assert len(names["test"]) >= 30 and sum(t.harmful for t in s["test"]) >= 15
    for t in s["test"] + s["calibration"]:
        assert any(u.verb == t.verb for u in train) and any(u.obj == t.obj for u in train)
    assert s == D.split_topics(0, (0.15, 0.3)), "splits must be deterministic"


def test_harm_is_decidable_from_words():
    for t in D.all_topics():
        assert t.harmful == (t.verb in D.HARMFUL_VERBS or t.obj in D.HARMFUL_OBJECTS)


def test_smoke_build_writes_a_loadable_testbed(tmp_path):
    cfg = BuildConfig(pretrain=(3, 1e-3, 8), align=(3, 1e-3, 8), vl_pretrain=(3, 1e-3, 8), vl_finetune=(3, 1e-3, 8),
                      n_train_images=24, threads=1)
    info = build_testbed(tmp_path / "tb", cfg, measure=False)
    out = tmp_path / "tb"
    model = LlavaForConditionalGeneration.from_pretrained(out, local_files_only=True)
    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    lm = LlamaForCausalLM.from_pretrained(out / "aligned_lm", local_files_only=True)
    assert lm.config.vocab_size == model.config.text_config.vocab_size == len(processor.tokenizer)
    assert info["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["build_command"].endswith("--seed 0")
    items = load_split("test", out)
    assert items and all(it["image_path"] for it in items)
    assert json.loads((out / "build_info.json").read_text())["seed"] == 0


@pytest.mark.slow
def test_full_rebuild_reproduces_shipped_figures(tmp_path):
    """Rebuild with the shipped seed; the measured figures must match within 5 points (10 for CMRM)."""
    shipped = json.loads((testbed_dir() / "build_info.json").read_text())
    torch.set_num_threads(2)
    info = build_testbed(tmp_path / "tb", BuildConfig(seed=shipped["seed"]), measure=True)
    a, b = shipped["measured"]["summary"], info["measured"]["summary"]
    for view, key in (("text_only", "unsafe_rate"), ("multimodal", "unsafe_rate"), ("multimodal", "vqa_accuracy")):
        assert abs(a[view][key] - b[view][key]) <= 0.05, (view, key, a[view][key], b[view][key])
    assert b["cmrm_acceptance"]
