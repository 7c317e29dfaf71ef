"""Streaming checkpoint merge on tiny random LLaVA / LLaMA checkpoints built from config."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.merge import (
    RECIPE_NAME,
    KeyMap,
    MergeConfig,
    build_masks,
    collect_input_norms,
    merge_checkpoints,
    merge_sweep,
    save_masks,
    wanda_scores,
    weight_difference_mask,
)

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

VOCAB, LAYERS = 64, 2


def text_config(**kw) -> LlamaConfig:
    args = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=LAYERS,
                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    args.update(kw)
    return LlamaConfig(**args)


def make_vlm(seed: int = 0) -> LlavaForConditionalGeneration:
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=text_config(), vision_config=vc,
                                                     image_token_index=VOCAB - 1)).eval()


def make_lm(seed: int = 1, dtype=torch.float32, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(text_config(**kw)).to(dtype).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    vlm, lm = make_vlm(), make_lm()
    vlm.save_pretrained(root / "vlm_orig", max_shard_size="20KB")  # original layout: language_model.model.*
    vlm.save_pretrained(root / "vlm_new", save_original_format=False)  # model.language_model.*
    lm.save_pretrained(root / "lm")
    return {"root": root, "vlm": vlm, "lm": lm}


def lm_params(model) -> dict[str, torch.Tensor]:
    """Language-model parameters of a LLaVA model, keyed by LLM name."""
    return {KeyMap().lm_name(k): v.detach() for k, v in model.state_dict().items() if KeyMap().lm_name(k)}


def cfg(ckpts, out: str, vlm: str = "vlm_orig", aligned: str = "lm", **kw) -> MergeConfig:
    r = ckpts["root"]
    return MergeConfig(vlm=r / vlm, aligned=r / aligned, output=r / out, **kw)


@pytest.mark.parametrize("layout", ["vlm_orig", "vlm_new"])
def test_roundtrip_loads_as_llava_with_interpolated_lm(ckpts, layout):
    res = merge_checkpoints(cfg(ckpts, f"out_{layout}", vlm=layout, weight=0.3, max_shard_size="25KB"),
                            progress=False)
    out = res.output
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(files) > 1 and (out / "model.safetensors.index.json").is_file()
    merged = LlavaForConditionalGeneration.from_pretrained(out)
    vlm_lm, ref_lm = lm_params(ckpts["vlm"]), dict(ckpts["lm"].state_dict())
    got = lm_params(merged)
    assert set(got) == set(vlm_lm) and len(got) == 2 + 9 * LAYERS + 1
    for k, v in got.items():
        assert torch.allclose(v, 0.7 * vlm_lm[k] + 0.3 * ref_lm[k], atol=1e-6), k
    vis = {k: v for k, v in merged.state_dict().items() if KeyMap().lm_name(k) is None}
    orig = ckpts["vlm"].state_dict()
    assert vis and all(torch.equal(v, orig[k]) for k, v in vis.items())  # vision + projector untouched

    recipe = json.loads((out / RECIPE_NAME).read_text())
    assert recipe["tensors"]["merged"] == len(got)
    lm_file = ckpts["root"] / "lm" / "model.safetensors"
    digest = hashlib.sha256(lm_file.read_bytes()).hexdigest()
    assert recipe["inputs"]["aligned"]["sha256"]["model.safetensors"] == digest
    assert (out / "config.json").is_file() and not list(out.parent.glob(f".{out.name}.*"))


def test_per_layer_schedule_and_rules(ckpts):
    weight = {"default": 0.5, "layers": [0.0, 1.0], "rules": [{"pattern": r"v_proj", "value": 0.25}]}
    out = merge_checkpoints(cfg(ckpts, "sched", weight=weight), progress=False).output
    vlm_lm, ref = lm_params(ckpts["vlm"]), ckpts["lm"].state_dict()
    got = _load_lm(out)
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], vlm_lm["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], ref["model.layers.1.mlp.up_proj.weight"])
    k = "model.layers.1.self_attn.v_proj.weight"  # the rule beats the layer value
    assert torch.allclose(got[k], 0.75 * vlm_lm[k] + 0.25 * ref[k])
    k = "model.embed_tokens.weight"  # outside the decoder layers: default
    assert torch.allclose(got[k], 0.5 * vlm_lm[k] + 0.5 * ref[k])


def test_a_schedule_rule_that_matches_no_tensor_is_refused(ckpts):
    weight = {"default": 0.5, "rules": [{"pattern": r"v_porj", "value": 0.25}]}  # a typo: would merge at 0.5
    with pytest.raises(InputError, match=r"weight rule 'v_porj' matches no tensor name"):
        merge_checkpoints(cfg(ckpts, "typo", weight=weight), progress=False)


def _load_lm(out: Path) -> dict[str, torch.Tensor]:
    res = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            for k in list(h.keys()):
                if KeyMap().lm_name(k):
                    res[KeyMap().lm_name(k)] = h.get_tensor(k)
    return res


def test_vocab_rows_error_then_shared(ckpts):
    r = ckpts["root"]
    small = make_lm(seed=2, vocab_size=VOCAB - 4)
    small.save_pretrained(r / "lm_small_vocab")
    msg = r"vocabulary sizes differ \(VLM 64 rows, aligned 60 rows\).*`vocab_rows='shared'`"
    with pytest.raises(InputError, match=msg):
        merge_checkpoints(cfg(ckpts, "vocab", aligned="lm_small_vocab"), progress=False)
    assert not (r / "vocab").exists()
    out = merge_checkpoints(cfg(ckpts, "vocab", aligned="lm_small_vocab", vocab_rows="shared"), progress=False).output
    got, vlm_lm, ref = _load_lm(out), lm_params(ckpts["vlm"]), small.state_dict()
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.allclose(got[k][:60], 0.5 * vlm_lm[k][:60] + 0.5 * ref[k])
        assert torch.equal(got[k][60:], vlm_lm[k][60:])  # LLaVA's extra tokens (e.g. <image>) keep VLM rows
    reconciled = json.loads((out / RECIPE_NAME).read_text())["tensors"]["vocab_reconciled"]
    assert reconciled["language_model.lm_head.weight"] == 60


def test_shape_dtype_and_unmatched_errors(ckpts):
    r = ckpts["root"]
    make_lm(seed=3, intermediate_size=24).save_pretrained(r / "lm_wide")
    make_lm(seed=3, dtype=torch.float16).save_pretrained(r / "lm_fp16")
    make_lm(seed=3, num_hidden_layers=1).save_pretrained(r / "lm_shallow")
    make_lm(seed=3, num_hidden_layers=3).save_pretrained(r / "lm_deep")

    with pytest.raises(InputError, match=r"shape mismatch, VLM F32\[32, 16\] vs aligned F32\[24, 16\]") as e:
        merge_checkpoints(cfg(ckpts, "bad", aligned="lm_wide"), progress=False)
    assert "`allow_passthrough=True`" in str(e.value)
    with pytest.raises(InputError, match=r"dtype mismatch.*`cast_dtype=True`"):
        merge_checkpoints(cfg(ckpts, "bad", aligned="lm_fp16"), progress=False)
    with pytest.raises(InputError, match=r"language_model\.model\.layers\.1.*no counterpart in the aligned model"):
        merge_checkpoints(cfg(ckpts, "bad", aligned="lm_shallow"), progress=False)
    with pytest.raises(InputError, match="aligned-model tensors match no VLM tensor"):
        merge_checkpoints(cfg(ckpts, "bad", aligned="lm_deep"), progress=False)
    assert not (r / "bad").exists()

    res = merge_checkpoints(cfg(ckpts, "wide", aligned="lm_wide", allow_passthrough=True), progress=False)
    passed = res.recipe["tensors"]["passed_through"]
    assert len(passed) == 3 * LAYERS and all("up_proj" in k or "gate_proj" in k or "down_proj" in k for k in passed)
    got = _load_lm(res.output)
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(got[k], lm_params(ckpts["vlm"])[k])

    res = merge_checkpoints(cfg(ckpts, "fp16", aligned="lm_fp16", cast_dtype=True, dtype="float16"), progress=False)
    out = res.output
    got = _load_lm(out)
    assert got["model.norm.weight"].dtype == torch.float16
    assert json.loads((out / "config.json").read_text()).get("dtype", "float16") == "float16"


def test_tied_lm_head_maps_to_embeddings():
    km = KeyMap()
    assert km.find("language_model.lm_head.weight", {"model.embed_tokens.weight"}) == "model.embed_tokens.weight"
    assert km.find("lm_head.weight", {"lm_head.weight", "model.embed_tokens.weight"}) == "lm_head.weight"
    assert km.lm_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert km.lm_name("vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight") is None


def test_weight_difference_mask_confines_merge(ckpts):
    r = ckpts["root"]
    summary = weight_difference_mask(r / "vlm_orig", r / "lm", r / "mask.safetensors", fraction=0.25)
    assert summary["tensors"] == 9 * LAYERS and summary["selected_fraction"] == pytest.approx(0.25, abs=0.02)
    out = merge_checkpoints(cfg(ckpts, "masked", weight=1.0, mask=r / "mask.safetensors"), progress=False).output
    got, vlm_lm, ref = _load_lm(out), lm_params(ckpts["vlm"]), ckpts["lm"].state_dict()
    with safe_open(str(r / "mask.safetensors"), "pt") as f:
        m = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
    k = "model.layers.0.self_attn.q_proj.weight"
    assert m.dtype == torch.bool and torch.equal(got[k], torch.where(m, ref[k], vlm_lm[k]))
    # the selected entries are the most changed ones in each row
    diff = (ref[k] - vlm_lm[k]).abs()
    assert all(diff[i][m[i]].min() >= diff[i][~m[i]].max() for i in range(diff.shape[0]))
    k = "model.embed_tokens.weight"
    assert torch.equal(got[k], vlm_lm[k]) and not torch.equal(got[k], ref[k])  # not in mask: VLM kept


def test_wanda_norms_scores_and_masks(ckpts):
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x = torch.tensor([[1.0, 2.0, 2.0], [0.0, 0.0, 1.0]])
    norms = collect_input_norms(lin, [{"input": x}], include=None)
    assert torch.allclose(norms["0"], torch.tensor([1.0, 2.0, 5**0.5]))
    assert torch.allclose(wanda_scores(lin, norms)["0.weight"], lin[0].weight.abs() * norms["0"])

    vlm = ckpts["vlm"]
    ids = torch.randint(0, VOCAB - 2, (2, 6), generator=torch.Generator().manual_seed(0))
    norms = collect_input_norms(vlm, [ids])
    assert len(norms) == 7 * LAYERS and not any("vision" in k for k in norms)
    masks = build_masks(wanda_scores(vlm, norms), 0.1)
    assert "model.layers.0.mlp.down_proj.weight" in masks  # LLM naming: fits any LLaVA layout
    path = save_masks(masks, ckpts["root"] / "wanda.safetensors")
    res = merge_checkpoints(cfg(ckpts, "wanda", weight=1.0, mask=path), progress=False)
    assert res.num_merged == 7 * LAYERS


@pytest.mark.parametrize("stage", ["read", "compute", "write"])
def test_exception_midway_leaves_destination_untouched(ckpts, monkeypatch, stage):
    """A failure in any of the three pipeline threads stops the merge and leaves the destination as it was."""
    import vlmsafe.merge.checkpoint as checkpoint
    import vlmsafe.merge.streaming as streaming
    import vlmsafe.merge.writer as writer

    owner, attr = {"read": (checkpoint.Checkpoint, "get_rows"), "compute": (streaming._Merger, "compute"),
                   "write": (writer.ShardedWriter, "write_block")}[stage]
    c = cfg(ckpts, f"atomic_{stage}", weight=0.2)
    real, calls = getattr(owner, attr), {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 20:
            raise RuntimeError("disk on fire")
        return real(*a, **k)

    monkeypatch.setattr(owner, attr, flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        merge_checkpoints(c, progress=False)
    assert calls["n"] == 20 and not c.output.exists() and not list(c.output.parent.glob(f".{c.output.name}.*"))

    monkeypatch.setattr(owner, attr, real)
    merge_checkpoints(c, progress=False)
    before = {p.name: p.read_bytes() for p in c.output.iterdir()}
    calls["n"] = 0
    monkeypatch.setattr(owner, attr, flaky)
    c.overwrite, c.weight = True, c.weight.parse(0.9)
    with pytest.raises(RuntimeError):
        merge_checkpoints(c, progress=False)
    assert {p.name: p.read_bytes() for p in c.output.iterdir()} == before  # previous result intact


def test_sigkill_midway_leaves_no_destination_and_rerun_succeeds(ckpts):
    root = ckpts["root"]
    out, marker = root / "killed", root / "marker"
    script = textwrap.dedent(f"""
        import time, pathlib
        import vlmsafe.merge.writer as w
        from vlmsafe.cli import main
        real, n = w.ShardedWriter.write_block, [0]
        def slow(self, block):
            real(self, block); n[0] += 1
            if n[0] == 10:
                self._file.flush(); pathlib.Path({str(marker)!r}).touch(); time.sleep(120)
        w.ShardedWriter.write_block = slow
        main(["merge", "--vlm", {str(root / "vlm_orig")!r}, "--aligned", {str(root / "lm")!r},
              "--out", {str(out)!r}, "--no-progress", "--max-shard-size", "10KB"])
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "merge subprocess never reached the midpoint"
        partial = list(root.glob(".killed*/**/*.safetensors"))
        assert partial  # it really was midway: shards in the temporary directory
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not out.exists()
    res = merge_checkpoints(MergeConfig(vlm=root / "vlm_orig", aligned=root / "lm", output=out), progress=False)
    assert LlavaForConditionalGeneration.from_pretrained(res.output) is not None


def test_cli_yaml_config_and_overrides(ckpts, capsys):
    from vlmsafe.cli import main

    r = ckpts["root"]
    (r / "merge.yaml").write_text(textwrap.dedent(f"""
        vlm: {r / 'vlm_new'}
        aligned: {r / 'lm'}
        method: ties
        density: 0.5
        weight: {{default: 0.4, layers: [0.2, 0.6]}}
        output: {r / 'cli_out'}
    """))
    assert main(["merge", str(r / "merge.yaml"), "--no-progress", "--weight", "0.3"]) == 0
    recipe = json.loads((r / "cli_out" / RECIPE_NAME).read_text())
    assert recipe["config"]["method"] == "ties" and recipe["config"]["weight"] == 0.3
    assert "merged 21 tensors" in capsys.readouterr().out
    assert main(["merge", str(r / "merge.yaml"), "--no-progress"]) == 2  # exists, no --overwrite
    assert "is a non-empty directory; pass --overwrite" in capsys.readouterr().err
    (r / "bad.yaml").write_text("vlm: a\naligned: b\noutput: c\nwieght: 0.3\n")
    assert main(["merge", str(r / "bad.yaml")]) == 2
    assert "unknown merge config keys ['wieght']" in capsys.readouterr().err
    assert main(["merge", "--vlm", str(r / "nope"), "--aligned", str(r / "lm"), "--out", str(r / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
    mask = r / "cli_mask.safetensors"
    assert main(["merge-mask", "--vlm", str(r / "vlm_new"), "--aligned", str(r / "lm"), "--top", "0.1",
                 "--scope", "tensor", "--out", str(mask)]) == 0
    pct = float(re.search(r"selecting ([\d.]+)%", capsys.readouterr().out).group(1))
    assert pct == pytest.approx(10.0, abs=0.5)  # per-tensor rounding of 10%
    with safe_open(str(mask), "pt") as f:
        assert len(f.keys()) == 9 * LAYERS and f.metadata()["score"] == "weight_difference"


def test_merge_sweep_table_and_plot(ckpts):
    r = ckpts["root"]
    ref = ckpts["lm"].state_dict()["model.layers.0.mlp.up_proj.weight"]

    def evaluate(model_dir: Path) -> dict[str, float]:
        got = _load_lm(model_dir)["model.layers.0.mlp.up_proj.weight"]
        return {"dist_to_aligned": float((got - ref).norm())}

    rows = merge_sweep(r / "vlm_orig", r / "lm", [0.0, 0.5, 1.0], r / "sweep", evaluate,
                       plot_metrics=["dist_to_aligned"], progress=False, keep_models=False)
    d = [row["dist_to_aligned"] for row in rows]
    assert d[0] > d[1] > d[2] == pytest.approx(0.0, abs=1e-6)
    assert (r / "sweep" / "sweep.csv").read_text().startswith("weight,model_dir,dist_to_aligned")
    assert (r / "sweep" / "sweep.png").stat().st_size > 1000
    assert not (r / "sweep" / "weight_0.5").exists()


def test_unreadable_inputs_raise_file_format_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileFormatError, match=r"no \.safetensors or pytorch_model\.bin weights"):
        merge_checkpoints(MergeConfig(vlm=tmp_path / "empty", aligned=tmp_path / "empty", output=tmp_path / "o"),
                          progress=False)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(FileFormatError, match="not a readable safetensors"):
        merge_checkpoints(MergeConfig(vlm=bad, aligned=bad, output=tmp_path / "o"), progress=False)


def test_checkpoint_reader_reads_exact_tensors_and_rejects_damage(tmp_path):
    from safetensors.torch import save_file

    from vlmsafe.merge.checkpoint import Checkpoint

    t = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    save_file(t, str(tmp_path / "model.safetensors"))
    with Checkpoint(tmp_path) as ck:
        assert sorted(ck.keys()) == ["a", "b"] and ck.info("b").shape == (2, 3)
        assert torch.equal(ck.get("b"), t["b"]) and torch.equal(ck.get("a"), t["a"])
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-4])
    with pytest.raises(FileFormatError, match="bad byte range"):
        Checkpoint(tmp_path / "cut")
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model-1.safetensors"}}')
    with pytest.raises(FileFormatError, match="missing; re-download"):
        Checkpoint(tmp_path / "idx")


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_row_block_streaming_equals_whole_tensor_merge(ckpts, monkeypatch, method):
    import vlmsafe.merge.streaming as streaming

    r = ckpts["root"]
    if not (r / "lm_small_vocab").exists():
        make_lm(seed=2, vocab_size=VOCAB - 4).save_pretrained(r / "lm_small_vocab")
    if not (r / "mask.safetensors").exists():
        weight_difference_mask(r / "vlm_orig", r / "lm", r / "mask.safetensors", fraction=0.25)
    common = dict(aligned="lm_small_vocab", vocab_rows="shared", method=method, weight=0.6,
                  density=0.5 if method == "ties" else 1.0, mask=r / "mask.safetensors", mask_missing="merge",
                  hash_inputs=False)
    whole = merge_checkpoints(cfg(ckpts, f"whole_{method}", **common), progress=False).output
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 40)  # 16-wide rows: 2 rows per block, split at row 60
    assert len(streaming._row_blocks((64, 16), 60)) == 32
    blocks = merge_checkpoints(cfg(ckpts, f"blocks_{method}", **common), progress=False).output
    a, b = _load_lm(whole), _load_lm(blocks)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], lm_params(ckpts["vlm"])["lm_head.weight"])
