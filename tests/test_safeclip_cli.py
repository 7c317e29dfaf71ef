"""``vlmsafe safeclip``: flags derived from the config, bad input, and the output policy.

Every bad input exits with code 2 and one line naming the problem and the fix, before any model is
loaded (the model paths in the bad-input cases do not even exist), and writes or deletes nothing.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from vlmsafe.cli import build_parser, main
from vlmsafe.safeclip import SafeCLIPLossWeights, SafeCLIPTrainingConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # Safe-CLIP results are bit-exact on one thread


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    from PIL import Image

    from vlmsafe.testbed.safeclip import make_splits, render_split, tiny_clip_backend

    root = tmp_path_factory.mktemp("safeclip_cli")
    tiny_clip_backend(0, hidden=32, layers=1, vision_layers=1).save_pretrained(root / "clip")
    records, safe, unsafe = render_split(make_splits(0)["train"][:8], 1, 0)
    (root / "img").mkdir()
    lines = []
    for i, r in enumerate(records):
        Image.fromarray(safe[i].permute(1, 2, 0).numpy()).save(root / "img" / f"v{i}.png")
        Image.fromarray(unsafe[i].permute(1, 2, 0).numpy()).save(root / "img" / f"g{i}.png")
        lines.append({"safe": r["safe"], "unsafe": r["unsafe"], "safe_image": f"img/v{i}.png",
                      "unsafe_image": f"img/g{i}.png"})
    write_jsonl(root / "good.jsonl", lines)
    (root / "empty.jsonl").write_text("")
    (root / "malformed.jsonl").write_text(json.dumps(lines[0]) + "\n{\"safe\": \n")
    (root / "img" / "not_image.png").write_text("this is text, not a PNG")
    full = (root / "img" / "v0.png").read_bytes()
    (root / "img" / "truncated.png").write_bytes(full[: len(full) // 2])
    for name, image in (("nonimage.jsonl", "img/not_image.png"), ("truncated.jsonl", "img/truncated.png"),
                        ("missing_image.jsonl", "img/nope.png")):
        write_jsonl(root / name, [lines[0], {**lines[1], "safe_image": image}, *lines[2:]])
    write_jsonl(root / "no_unsafe.jsonl", [{"safe": "a cat"}])
    (root / "captions.txt").write_text("a dog on the grass\n")
    write_jsonl(root / "pairs.jsonl", [{"safe": "a dog", "unsafe": "a dead dog"}])
    return root


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def user_folder(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    (path / "users_notes.txt").write_text("precious")
    return path


def check_error(capsys, argv: list[str], expected: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("vlmsafe") and "error:" in lines[0], err
    assert expected in lines[0], f"expected {expected!r} in: {lines[0]}"


# --------------------------------------------------------------------------- flags from the config
def parse_train(*flags: str):
    from vlmsafe.cli.safeclip import _training_config

    args = build_parser().parse_args(["safeclip", "train", "--model", "m", "--data", "d", "--output-dir", "o", *flags])
    return _training_config(args)


def test_every_config_field_is_a_flag_and_reaches_the_config():
    from vlmsafe.options import option_fields

    assert {f.name for f in option_fields(SafeCLIPTrainingConfig)} == {f.name for f in dataclasses.fields(
        SafeCLIPTrainingConfig)}
    assert parse_train() == SafeCLIPTrainingConfig()  # no flag: every default is the dataclass's
    cfg = parse_train(
        "--no-text", "--text-only", "--full-finetune", "--lora-r", "4", "--lora-alpha", "2", "--lora-dropout", "0",
        "--lora-targets", "q_proj, v_proj", "--reference", "copy", "--no-cache-reference", "--lr", "3e-4",
        "--weight-decay", "0.01", "--adam-betas", "0.8,0.99", "--scheduler", "cosine", "--warmup-steps", "5",
        "--batch-size", "16", "--grad-accum", "2", "--epochs", "3", "--max-steps", "7", "--max-grad-norm", "0",
        "--mixed-precision", "bf16", "--cpu", "--eval-every", "9", "--eval-batch-size", "32", "--patience", "4",
        "--min-delta", "0.5", "--best-metric", "loss", "--save-every", "11", "--keep-checkpoints", "3", "--seed", "2",
        "--logit-scale", "50", "--loss-scale", "reference", "--weights", "G_Sref=1,text_nsfw=0,text_safe_tokens=2",
        "--token-layer", "penultimate", "--num-workers", "1", "--no-progress",
    )
    expected = SafeCLIPTrainingConfig(
        train_text=False, train_vision=False, use_lora=False, lora_r=4, lora_alpha=2.0, lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj"], cache_reference=False, learning_rate=3e-4, weight_decay=0.01,
        adam_betas=(0.8, 0.99), lr_scheduler="cosine", warmup_steps=5, batch_size=16, gradient_accumulation_steps=2,
        num_epochs=3, max_steps=7, max_grad_norm=0.0, mixed_precision="bf16", cpu=True, eval_every=9,
        eval_batch_size=32, early_stopping_patience=4, early_stopping_min_delta=0.5, best_metric="loss",
        save_every=11, keep_checkpoints=3, seed=2, logit_scale=50.0, loss_scale="reference",
        weights=SafeCLIPLossWeights(G_Sref=1.0, text_nsfw=0.0, text_safe_tokens=2.0), token_layer="penultimate",
        num_workers=1, progress=False,
    )
    assert cfg == expected


def test_train_help_documents_the_token_term(capsys):
    with pytest.raises(SystemExit):
        main(["safeclip", "train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "text_safe_tokens (default 0, not in the paper)" in text
    assert "--token-layer {last,penultimate}" in text and "hidden_states[-2]" in text
    assert "--weights text_safe_tokens=" in text  # the epilog's example


def test_config_file_then_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("batch_size: 8\nweights: {G_Sref: 2.0, text_safe: 0.3}\n")
    cfg = parse_train("--config", str(tmp_path / "c.yaml"), "--weights", "G_Sref=1")
    assert cfg.batch_size == 8 and cfg.weights.G_Sref == 1.0 and cfg.weights.text_safe == 0.3
    (tmp_path / "c.json").write_text('{"batch_size": 8,}')
    with pytest.raises(Exception, match=r"c.json:1:\d+: invalid JSON"):
        parse_train("--config", str(tmp_path / "c.json"))


# --------------------------------------------------------------------------- bad input
def train_argv(ws: Path, data: str = "good.jsonl", out: str = "out-train", model: str = "nope-model") -> list[str]:
    return ["safeclip", "train", "--model", str(ws / model), "--data", str(ws / data), "--output-dir", str(ws / out),
            "--batch-size", "2", "--no-progress"]


TRAIN_DATA_CASES = [
    ("missing.jsonl", "does not exist"),
    ("empty.jsonl", "empty"),
    ("malformed.jsonl", "malformed.jsonl:2:"),
    ("nonimage.jsonl", "not a readable image"),
    ("truncated.jsonl", "not a readable image"),
    ("missing_image.jsonl", "does not exist; fix the path or --image-root"),  # the library names `image_root`
    ("no_unsafe.jsonl", "'safe' and 'unsafe'"),
    ("img", "is a directory"),
]


def test_train_output_over_its_data_is_refused_even_with_overwrite(ws, capsys):
    before = sorted(p.name for p in ws.iterdir())
    # --output-dir is the folder holding --data (and its images): --overwrite would delete them
    check_error(capsys, [*train_argv(ws, out="."), "--overwrite"], "overlaps the --data input")
    assert sorted(p.name for p in ws.iterdir()) == before


@pytest.mark.parametrize("data, expected", TRAIN_DATA_CASES, ids=[c[0] for c in TRAIN_DATA_CASES])
def test_train_bad_data(ws, capsys, data, expected):
    check_error(capsys, train_argv(ws, data), expected)
    assert not (ws / "out-train").exists()


NUMBER_CASES = [
    (["--lr", "0"], "--lr: must be in (0, 10]"),
    (["--lr", "nan"], "finite"),
    (["--lr", "1e300"], "--lr: must be in (0, 10]"),
    (["--weight-decay", "1e300"], "--weight-decay: must be in [0, 10]"),
    (["--lora-alpha", "1e300"], "--lora-alpha: must be in (0, 10000]"),
    (["--logit-scale", "1e300"], "--logit-scale: must be in (0, 100]"),
    (["--weights", "G_Sref=1e300"], "loss weight G_Sref must be in [0, 1000]"),
    (["--seed", "4294967296"], "--seed: must be in [0, 4294967295]"),
    (["--lora-dropout", "1"], "--lora-dropout: must be in [0, 1)"),
    (["--lora-alpha", "-1"], "--lora-alpha"),
    (["--weight-decay", "inf"], "finite"),
    (["--max-grad-norm", "-1"], "--max-grad-norm"),
    (["--logit-scale", "0"], "--logit-scale"),
    (["--val-fraction", "1"], "--val-fraction: must be in [0, 1)"),
    (["--val-fraction", "nan"], "finite"),
    (["--adam-betas", "0.9,1"], "--adam-betas"),
    (["--weights", "G_Sref=nan"], "finite"),
    (["--weights", "G_Sref=-1"], "--weights"),
    (["--weights", "nope=1"], "NAME=WEIGHT"),
    (["--weights", "text_safe_tokens=-1"], "--weights"),
    (["--token-layer", "first"], "--token-layer"),
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--batch-size", "-2"], "--batch-size"),
    (["--scheduler", "nope"], "not a transformers scheduler"),
    (["--text-only", "--weights", "text_safe=0,text_nsfw=0"], "weight 0"),
    (["--batch-size", "64"], "need at least batch_size=64"),
    (["--resume", "latest", "--overwrite"], "resuming (--resume) continues the run in the output folder and "
                                            "overwriting (--overwrite) replaces it; pass one of them"),
    (["--resume", "latest"], "no checkpoint-* folder"),
]


@pytest.mark.parametrize("extra, expected", NUMBER_CASES, ids=[" ".join(c[0]) for c in NUMBER_CASES])
def test_train_bad_numbers_and_options(ws, capsys, extra, expected):
    check_error(capsys, train_argv(ws) + extra, expected)
    assert not (ws / "out-train").exists()


def test_config_rejects_non_finite_and_out_of_range_values():
    from vlmsafe.errors import InputError

    for kw, name in ((dict(learning_rate=float("inf")), "learning_rate"), (dict(lora_dropout=-0.1), "lora_dropout"),
                     (dict(early_stopping_min_delta=float("nan")), "early_stopping_min_delta"),
                     (dict(keep_checkpoints=0), "keep_checkpoints"), (dict(loss_scale="half"), "loss_scale"),
                     (dict(adam_betas=(0.9,)), "adam_betas")):
        with pytest.raises(InputError, match=name):
            SafeCLIPTrainingConfig(**kw)
    with pytest.raises(InputError, match="loss weight G_Sref must be a finite"):
        SafeCLIPLossWeights(G_Sref=float("nan"))


CONFIG_TYPE_CASES = [
    ({"use_lora": "false"}, "use_lora must be true or false"),
    ({"cpu": "no"}, "cpu must be true or false"),
    ({"train_vision": 0}, "train_vision must be true or false"),
    ({"keep_checkpoints": "4"}, "keep_checkpoints must be an integer, got '4'"),
    ({"keep_checkpoints": True}, "keep_checkpoints must be an integer, got True"),
    ({"keep_checkpoints": 4.0}, "keep_checkpoints must be an integer"),
    ({"learning_rate": "1e-3"}, "learning_rate must be a number"),
    ({"learning_rate": True}, "learning_rate must be a number"),
    ({"learning_rate": 1e300}, "learning_rate must be in (0, 10]"),
    ({"seed": 2**32}, "seed must be in [0, 4294967295]"),
    ({"lora_target_modules": "q_proj,v_proj"}, "lora_target_modules must be a list of names"),
    ({"lora_target_modules": ["q_proj", 3]}, "lora_target_modules must be a list of names"),
    ({"lr_scheduler": 3}, "lr_scheduler must be a non-empty string"),
    ({"weights": "G_Sref=1"}, "weights must be a mapping"),
    ({"weights": {"normalize": "yes"}}, "normalize must be true or false"),
    ({"adam_betas": ["0.9", 0.999]}, "adam_betas must be a number"),
]


@pytest.mark.parametrize("fields, expected", CONFIG_TYPE_CASES, ids=[next(iter(c[0])) + "=" + repr(next(iter(
    c[0].values()))) for c in CONFIG_TYPE_CASES])
def test_train_config_file_values_of_the_wrong_type_are_refused(ws, tmp_path, capsys, fields, expected):
    """A config file's "false" for a switch (truthy!) or "4" for a count is refused, not trained with."""
    (tmp_path / "cfg.json").write_text(json.dumps(fields))
    check_error(capsys, [*train_argv(ws), "--config", str(tmp_path / "cfg.json")], expected)
    assert not (ws / "out-train").exists()


def test_train_refuses_a_non_empty_output_before_any_work(ws, capsys):
    user_folder(ws / "existing")
    check_error(capsys, train_argv(ws, out="existing"), "--overwrite")  # the model path does not even exist
    assert sorted(p.name for p in (ws / "existing").iterdir()) == ["users_notes.txt"]
    check_error(capsys, train_argv(ws, out="captions.txt"), "a file")


def test_eval_json_output_policy(ws, capsys):
    user_folder(ws / "rows.json")  # a directory named like the JSON file is never replaced by a file
    check_error(capsys, ["safeclip", "eval", "--json", str(ws / "rows.json")], "--overwrite")
    assert (ws / "rows.json" / "users_notes.txt").read_text() == "precious"
    (ws / "rows2.json").write_text("keep me")
    check_error(capsys, ["safeclip", "eval", "--json", str(ws / "rows2.json")], "--overwrite")
    assert (ws / "rows2.json").read_text() == "keep me"
    assert main(["safeclip", "eval", "--json", str(ws / "rows2.json"), "--overwrite"]) == 0
    assert "Safe-CLIP testbed" in capsys.readouterr().out
    rows = json.loads((ws / "rows2.json").read_text())
    assert {r["direction"] for r in rows} >= {"S→V", "U→(V∪G)"}
    check_error(capsys, ["safeclip", "eval", "--batch-size", "0"], "--batch-size")


PAIRS_CASES = [
    (["pairs", "train", "--pairs", "{ws}/pairs.jsonl", "--output-dir", "{ws}/conv", "--lr", "0"], "--lr"),
    (["pairs", "train", "--pairs", "{ws}/pairs.jsonl", "--output-dir", "{ws}/conv", "--lr", "1e300"],
     "--lr: must be in (0, 10]"),
    (["pairs", "train", "--pairs", "{ws}/pairs.jsonl", "--output-dir", "{ws}/conv", "--weight-decay", "1e300"],
     "--weight-decay: must be in [0, 10]"),
    (["pairs", "train", "--pairs", "{ws}/pairs.jsonl", "--output-dir", "{ws}/conv", "--seed", "4294967296"],
     "--seed: must be in [0, 4294967295]"),
    (["pairs", "train", "--pairs", "{ws}/pairs.jsonl", "--output-dir", "{ws}/conv", "--lora-dropout", "1"],
     "--lora-dropout"),
    (["pairs", "train", "--pairs", "{ws}/pairs.jsonl", "--output-dir", "{ws}/conv", "--epochs", "0"], "--epochs"),
    (["pairs", "train", "--pairs", "{ws}/pairs.jsonl", "--output-dir", "{ws}/conv", "--template", "no slot"],
     "has no {safe}"),
    (["pairs", "train", "--pairs", "{ws}/malformed.jsonl", "--output-dir", "{ws}/conv"], "malformed.jsonl:2:"),
    (["pairs", "train", "--pairs", "{ws}/good.jsonl", "--output-dir", "{ws}/existing"], "--overwrite"),
    (["pairs", "generate", "--captions", "{ws}/captions.txt", "--output", "{ws}/gen.jsonl", "--temperature", "0.5"],
     "add --sample"),
    (["pairs", "generate", "--captions", "{ws}/captions.txt", "--output", "{ws}/gen.jsonl", "--sample", "--top-p",
      "0"], "--top-p: must be in (0, 1]"),
    (["pairs", "generate", "--captions", "{ws}/captions.txt", "--output", "{ws}/gen.jsonl", "--sample",
      "--temperature", "nan"], "finite"),
    (["pairs", "generate", "--captions", "{ws}/empty.jsonl", "--output", "{ws}/gen.jsonl"], "empty"),
    (["pairs", "generate", "--captions", "{ws}/missing.txt", "--output", "{ws}/gen.jsonl"], "does not exist"),
    (["pairs", "generate", "--captions", "{ws}/captions.txt", "--output", "{ws}/captions.txt"],
     "overlaps the --captions input"),
    (["pairs", "generate", "--captions", "{ws}/captions.txt", "--output", "{ws}/gen.jsonl", "--max-new-tokens", "0"],
     "--max-new-tokens"),
]


@pytest.mark.parametrize("argv, expected", PAIRS_CASES, ids=[f"{c[0][1]}:{c[0][-2]}={c[0][-1]}" for c in PAIRS_CASES])
def test_pairs_bad_input(ws, capsys, argv, expected):
    user_folder(ws / "existing")
    argv = [a.format(ws=ws) for a in argv]
    check_error(capsys, ["safeclip", *argv, "--model", str(ws / "nope-model")], expected)
    assert not (ws / "conv").exists() and not (ws / "gen.jsonl").exists()
    assert (ws / "captions.txt").read_text() == "a dog on the grass\n"
    assert sorted(p.name for p in (ws / "existing").iterdir()) == ["users_notes.txt"]


# --------------------------------------------------------------------------- runs
def test_train_overwrite_replaces_the_old_run_and_resume_continues_it(ws, capsys):
    run = user_folder(ws / "run")
    argv = [*train_argv(ws, out="run", model="clip"), "--epochs", "1", "--lora-r", "2", "--val-fraction", "0.25",
            "--overwrite"]
    assert main(argv) == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    assert summary["model_dir"] == str(run / "model") and summary["global_step"] == 3
    assert sorted(p.name for p in run.iterdir()) == ["best", "checkpoint-0000003", "model"]  # the old file is gone
    assert not [p for p in ws.iterdir() if p.name.startswith(".run.")]  # no temporaries left
    check_error(capsys, argv[:-1], "--overwrite")  # a second run without --overwrite is refused ...
    assert main([*argv[:-1], "--epochs", "2", "--resume", "latest"]) == 0  # ... --resume continues it
    assert json.loads(capsys.readouterr().out)["global_step"] == 6
