"""Nothing silently wrong, nothing lost: merge / merge-mask refuse bad numbers and existing outputs before any work."""

from __future__ import annotations

import textwrap

import pytest
import torch

from vlmsafe.cli import main
from vlmsafe.errors import InputError, OutputExistsError
from vlmsafe.merge import MergeConfig, merge_checkpoints, save_masks

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("trust")
    cfg = LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, tie_word_embeddings=False)
    models = {}
    for i, name in enumerate(("vlm", "lm")):
        torch.manual_seed(i)
        models[name] = LlamaForCausalLM(cfg).eval()
        models[name].save_pretrained(root / name)
    return root, models


@pytest.fixture
def no_reading(monkeypatch):
    """Fail the test if a checkpoint is opened: the command must stop before any work."""
    import vlmsafe.merge.localise as localise
    import vlmsafe.merge.streaming as streaming

    def boom(*a, **k):
        raise AssertionError("a checkpoint was opened although the command should have stopped first")

    monkeypatch.setattr(streaming, "Checkpoint", boom)
    monkeypatch.setattr(localise, "Checkpoint", boom)


BAD_NUMBERS = [
    (["--weight", "nan"], "--weight: must be a finite number"),
    (["--weight", "inf"], "--weight: must be a finite number"),
    (["--weight", "1.5"], "weight = 1.5 is outside [0, 1] for method linear"),
    (["--weight", "-0.1"], "weight = -0.1 is outside [0, 1] for method linear"),
    (["--weight", "2.5", "--method", "task_arithmetic"], "--weight: must be in [-1, 2]"),
    (["--weight", "1.5", "--method", "ties"], "outside [0, 1] for method ties"),
    (["--density", "0", "--method", "ties"], "--density: must be in (0, 1]"),
    (["--density", "nan", "--method", "ties"], "--density: must be a finite number"),
    (["--density", "0.5"], "density = 0.5 has no effect with method linear"),
    (["--seed", "-1"], "--seed: must be in [0, 4294967295]"),
    (["--max-shard-size", "0"], "max_shard_size must be positive"),
    (["--max-shard-size", "lots"], "cannot parse 'lots'"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_NUMBERS, ids=[" ".join(e) for e, _ in BAD_NUMBERS])
def test_merge_rejects_bad_numbers_before_any_work(pair, capsys, no_reading, extra, message):
    root, _ = pair
    out = root / "out_bad"
    code = main(["merge", "--vlm", str(root / "vlm"), "--aligned", str(root / "lm"), "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


YAML_BAD = [
    ("weight: .nan", "weight: nan is not a finite number"),
    ("weight: {default: 0.4, layers: [0.2, 1.5]}", "weight.layers[1] = 1.5 is outside [0, 1]"),
    ("weight: {default: 0.4, rules: [{pattern: norm, value: -2}]}", "weight.rules[0].value = -2 is outside"),
    ("method: ties\ndensity: [0.5, 0.0]", "density.layers[1] = 0 is outside (0, 1]"),
    ("allow_passthrough: 'yes'", "allow_passthrough must be true or false"),
    ("seed: 1.5", "seed must be an integer in [0, 4294967295]"),
]


@pytest.mark.parametrize(("line", "message"), YAML_BAD, ids=[m for _, m in YAML_BAD])
def test_yaml_config_numbers_are_checked(pair, tmp_path, capsys, no_reading, line, message):
    root, _ = pair
    path = tmp_path / "merge.yaml"
    path.write_text(f"vlm: {root / 'vlm'}\naligned: {root / 'lm'}\noutput: {tmp_path / 'o'}\n{line}\n")
    assert main(["merge", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(").replace(".", r"\.")):
        MergeConfig.from_yaml(path)


def test_task_arithmetic_extrapolates_within_its_documented_range(pair):
    root, models = pair
    res = merge_checkpoints(MergeConfig(vlm=root / "vlm", aligned=root / "lm", output=root / "ta15",
                                        method="task_arithmetic", weight=1.5, hash_inputs=False), progress=False)
    from safetensors import safe_open

    with safe_open(str(res.output / "model.safetensors"), "pt") as f:
        got = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    v = models["vlm"].state_dict()["model.layers.0.mlp.up_proj.weight"]
    a = models["lm"].state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert torch.allclose(got, a + (1 - 1.5) * (v - a), atol=1e-6)  # past the aligned model, away from the VLM


def test_merge_refuses_existing_outputs_before_any_work(pair, capsys, no_reading):
    root, _ = pair
    args = ["merge", "--vlm", str(root / "vlm"), "--aligned", str(root / "lm"), "--no-progress", "--out"]
    full = root / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    assert main([*args, str(full)]) == 2
    assert "is a non-empty directory; pass --overwrite" in capsys.readouterr().err
    assert (full / "notes.txt").read_text() == "mine"
    a_file = root / "a_file"
    a_file.write_text("mine")
    assert main([*args, str(a_file)]) == 2
    assert "is a file (a directory is written here)" in capsys.readouterr().err
    assert a_file.read_text() == "mine"
    assert main([*args, str(root / "vlm")]) == 2  # the output may not be an input
    assert "overlaps the --vlm input" in capsys.readouterr().err


def test_merge_writes_into_empty_dir_and_overwrites_only_when_asked(pair, capsys):
    root, _ = pair
    out = root / "empty_out"
    out.mkdir()
    args = ["merge", "--vlm", str(root / "vlm"), "--aligned", str(root / "lm"), "--no-progress", "--out", str(out)]
    assert main(args) == 0 and (out / "model.safetensors").is_file()
    (out / "extra.txt").write_text("user file")
    assert main(args) == 2 and (out / "extra.txt").is_file()
    assert main([*args, "--overwrite", "--weight", "0.9"]) == 0
    assert not (out / "extra.txt").exists() and '"weight": 0.9' in (out / "vlmsafe_merge.json").read_text()
    capsys.readouterr()


def test_merge_with_a_nan_mask_fails_cleanly_and_writes_nothing(pair, capsys, tmp_path):
    from safetensors.torch import save_file

    root, models = pair
    mask = {n: torch.full_like(t, 0.5) for n, t in models["vlm"].state_dict().items()}
    mask["model.layers.0.input_layernorm.weight"][1] = float("nan")
    save_file(mask, tmp_path / "mask.safetensors")
    out = tmp_path / "merged"
    rc = main(["merge", "--vlm", str(root / "vlm"), "--aligned", str(root / "lm"), "--mask",
               str(tmp_path / "mask.safetensors"), "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "mask entries must be finite and in [0, 1]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".merged*"))


def test_merge_mask_output_policy_and_numbers(pair, capsys, tmp_path):
    root, _ = pair
    args = ["merge-mask", "--vlm", str(root / "vlm"), "--aligned", str(root / "lm"), "--no-progress", "--out"]
    mask = tmp_path / "mask.safetensors"
    for bad, message in (("0", "--top: must be in (0, 1]"), ("nan", "must be a finite number"),
                         ("1.5", "must be in (0, 1]")):
        assert main([*args, str(mask), "--top", bad]) == 2 and message in capsys.readouterr().err
    assert main([*args, str(mask), "--include", "("]) == 2
    assert "is not a valid regex" in capsys.readouterr().err and not mask.exists()
    assert main([*args, str(mask)]) == 0
    before = mask.read_bytes()
    assert main([*args, str(mask), "--top", "0.5"]) == 2
    assert "is an existing file; pass --overwrite" in capsys.readouterr().err and mask.read_bytes() == before
    assert main([*args, str(mask), "--top", "0.5", "--overwrite"]) == 0 and mask.read_bytes() != before
    (tmp_path / "dir.safetensors").mkdir()
    assert main([*args, str(tmp_path / "dir.safetensors")]) == 2
    assert "a directory (a file is written here)" in capsys.readouterr().err
    with pytest.raises(OutputExistsError):
        save_masks({"x": torch.ones(2, dtype=torch.bool)}, mask)
    save_masks({"x": torch.ones(2, dtype=torch.bool)}, mask, overwrite=True)


def test_merge_sweep_checks_every_weight_before_the_first_merge(pair, tmp_path, no_reading):
    from vlmsafe.merge import merge_sweep

    root, _ = pair
    with pytest.raises(InputError, match=r"weight = 1\.2 is outside"):
        merge_sweep(root / "vlm", root / "lm", [0.2, 1.2], tmp_path / "sweep", progress=False)
    with pytest.raises(InputError, match="weight must be a finite number"):
        merge_sweep(root / "vlm", root / "lm", [0.2, float("nan")], tmp_path / "sweep", progress=False)
    assert not (tmp_path / "sweep").exists()


def test_yaml_overwrite_and_cli_flag(pair, tmp_path, capsys):
    root, _ = pair
    out = tmp_path / "o"
    out.mkdir()
    (out / "x").write_text("x")
    path = tmp_path / "m.yaml"
    path.write_text(textwrap.dedent(f"""
        vlm: {root / 'vlm'}
        aligned: {root / 'lm'}
        output: {out}
        overwrite: true
    """))
    assert main(["merge", str(path), "--no-progress"]) == 0 and not (out / "x").exists()
    capsys.readouterr()


def test_merge_seed_only_where_something_is_random(pair, capsys, no_reading):
    root, _ = pair
    args = ["merge", "--vlm", str(root / "vlm"), "--aligned", str(root / "lm"), "--out", str(root / "never")]
    assert main([*args, "--seed", "5"]) == 2  # linear: nothing is random, the seed would be silently ignored
    err = capsys.readouterr().err
    assert "seed = 5 has no effect with method linear" in err and "dare_linear, dare_ties" in err
