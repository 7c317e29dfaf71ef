"""`vlmsafe merge` reads a mergekit-style YAML (models: / merge_method: / parameters:) for the methods both have."""

from __future__ import annotations

import json
import re
import textwrap

import pytest
import torch
from test_merge_stream import lm_params, make_lm, make_vlm
from transformers import LlavaForConditionalGeneration

from vlmsafe.errors import InputError
from vlmsafe.merge.config import MergeConfig
from vlmsafe.merge.mergekit_yaml import translate


@pytest.fixture
def roles(tmp_path):
    """Three model folders with only a config.json: a VLM, its aligned LLM, and a common base LLM."""
    out = {}
    for name, cfg in (("vlm", {"model_type": "llava", "vision_config": {}}), ("lm", {"model_type": "llama"}),
                      ("base", {"model_type": "llama"})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        out[name] = str(tmp_path / name)
    return out


def _doc(method, models, **top):
    return {"merge_method": method, "models": [{"model": m, "parameters": p} for m, p in models], **top}


@pytest.mark.parametrize("method, models, top, expected", [
    # linear: normalised weights; the aligned model's share is lam
    ("linear", [("vlm", {"weight": 0.6}), ("lm", {"weight": 0.2})], {}, {"weight": 0.25}),
    ("linear", [("lm", {"weight": 0.3}), ("vlm", {"weight": 0.7})], {"parameters": {"normalize": False}},
     {"weight": 0.3}),
    # slerp: t runs from the base to the other model
    ("slerp", [("vlm", {}), ("lm", {})], {"base_model": "vlm", "parameters": {"t": 0.3}}, {"weight": 0.3}),
    ("slerp", [("vlm", {}), ("lm", {})], {"base_model": "lm", "parameters": {"t": 0.3}}, {"weight": 0.7}),
    # task vectors on the aligned LLM: aligned + w (vlm - aligned)
    ("ties", [("vlm", {"weight": 0.6, "density": 0.5})], {"base_model": "lm"}, {"weight": 0.4, "density": 0.5}),
    ("task_arithmetic", [("vlm", {"weight": 0.8}), ("lm", {"weight": 1.0})], {"base_model": "lm"},
     {"weight": 0.2}),
    # a third model as the common base: weights (1 - lam, lam)
    ("dare_ties", [("vlm", {"weight": 0.7}), ("lm", {"weight": 0.3})],
     {"base_model": "base", "parameters": {"density": 0.4}}, {"weight": 0.3, "density": 0.4, "base": "base"}),
])
def test_mergekit_weights_become_the_aligned_share(roles, method, models, top, expected):
    top = {k: roles.get(v, v) if k == "base_model" else v for k, v in top.items()}
    got = translate(_doc(method, [(roles[m], p) for m, p in models], **top), where="m.yaml")
    assert got["vlm"] == roles["vlm"] and got["aligned"] == roles["lm"] and got["method"] == method
    for key, value in expected.items():
        value = roles[value] if key == "base" else value
        assert got[key] == pytest.approx(value), key


@pytest.mark.parametrize("mutate, message", [
    (lambda d, r: d.update(slices=[]), "mergekit key(s) ['slices'] are not supported"),
    (lambda d, r: d.update(merge_method="della"), "merge_method 'della' is not one vlmsafe implements"),
    (lambda d, r: d["models"][0]["parameters"].update(weight=[0.1, 0.9]), "a per-layer gradient"),
    (lambda d, r: d["models"].append({"model": r["base"]}), "expected one aligned text-only LLM"),
    (lambda d, r: d["models"][0].update(model=r["lm"]), "cannot tell the VLM from the aligned LLM"),
    (lambda d, r: d["parameters"].update(normalize=False), "do not sum to 1"),
])
def test_what_cannot_be_expressed_is_refused_with_the_reason(roles, mutate, message):
    doc = _doc("linear", [(roles["vlm"], {"weight": 0.6}), (roles["lm"], {"weight": 0.2})], parameters={})
    mutate(doc, roles)
    with pytest.raises(InputError, match=re.escape(message)):
        translate(doc, where="m.yaml")


def test_unequal_densities_and_missing_base_are_refused(roles):
    with pytest.raises(InputError, match="different densities"):
        translate(_doc("ties", [(roles["vlm"], {"weight": 0.7, "density": 0.5}),
                                (roles["lm"], {"weight": 0.3, "density": 0.2})], base_model=roles["base"]), where="m")
    with pytest.raises(InputError, match="needs a base_model"):
        translate(_doc("ties", [(roles["vlm"], {"weight": 0.7})]), where="m")


def test_cli_merges_a_mergekit_yaml_like_the_same_vlmsafe_recipe(tmp_path):
    from vlmsafe.cli import main

    vlm, lm = make_vlm(), make_lm()
    vlm.save_pretrained(tmp_path / "vlm")
    lm.save_pretrained(tmp_path / "lm")
    (tmp_path / "mk.yaml").write_text(textwrap.dedent(f"""
        merge_method: linear
        models:
          - model: {tmp_path / 'vlm'}
            parameters: {{weight: 0.7}}
          - model: {tmp_path / 'lm'}
            parameters: {{weight: 0.3}}
        dtype: float32
    """))
    assert main(["merge", str(tmp_path / "mk.yaml"), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    cfg = MergeConfig.from_yaml(tmp_path / "mk.yaml", output=tmp_path / "x")
    assert (cfg.method, cfg.weight.default, cfg.dtype) == ("linear", pytest.approx(0.3), "float32")
    merged = lm_params(LlavaForConditionalGeneration.from_pretrained(tmp_path / "out"))
    want_vlm, want_lm = lm_params(vlm), dict(lm.state_dict())
    for k, v in merged.items():
        assert torch.allclose(v, 0.7 * want_vlm[k] + 0.3 * want_lm[k], atol=1e-6), k
