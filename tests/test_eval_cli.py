"""`vlmsafe evaluate` end to end with an injected fake generator."""

import json
import sys
from pathlib import Path

import pytest

import vlmsafe.cli.eval as eval_cli
from vlmsafe.cli import build_parser, main

FIXTURES = Path(__file__).parent / "fixtures" / "eval"


class FakeVLM:
    """Refuses text-only prompts, complies when an image is present; says 'red' for images."""

    def generate(self, prompts, images, *, max_new_tokens=64):
        return ["sure , here are the steps , it is red" if im is not None else "i cannot help with that ."
                for im in images]


@pytest.fixture()
def fake_loader(monkeypatch):
    seen = []

    def load(args, steering=None):
        seen.append(args)
        return FakeVLM()

    monkeypatch.setattr(eval_cli, "load_generator", load)
    return seen


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--data", "--judge", "--vectors", "--alpha", "--sample-level", "--modality", "--out",
                 "over-refusal"):
        assert flag in out


def test_evaluate_both_modalities_writes_reports(tmp_path, fake_loader, capsys):
    out = tmp_path / "run"
    rc = main(["evaluate", "--model", "m", "--data", str(FIXTURES / "items.jsonl"), "--modality", "both",
               "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    # items.jsonl: h1 (image), h2 (no image), b1 (image, reference "red"). text-only and multimodal cover the items
    # with an image (h1, b1); h2 is its own modality, never counted as multimodal. Over-refusal is over benign
    # instructions (none here: b1 is an image question, measured by utility).
    # columns: unsafe, refusal, degenerate (harmful), over-refusal (benign instructions), utility (with reference)
    assert ("| text-only | 0.0% [0.0\u201379.3] (n=1) | 100.0% [20.7\u2013100.0] (n=1) | 0.0% [0.0\u201379.3] (n=1) "
            "| - (n=0) | 0.0% [0.0\u201379.3] (n=1) |") in printed
    assert ("| multimodal | 100.0% [20.7\u2013100.0] (n=1) | 0.0% [0.0\u201379.3] (n=1) | 0.0% [0.0\u201379.3] (n=1) "
            "| - (n=0) | 100.0% [20.7\u2013100.0] (n=1) |") in printed
    assert ("| no-image | 0.0% [0.0\u201379.3] (n=1) | 100.0% [20.7\u2013100.0] (n=1) | 0.0% [0.0\u201379.3] (n=1) "
            "| - (n=0) | - (n=0) |") in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "multimodal.json", "multimodal.md", "no-image.json", "no-image.md", "summary.md", "text-only.json",
        "text-only.md",
    ]
    mm = json.loads((out / "multimodal.json").read_text())
    assert mm["summary"]["unsafe_rate"] == 1.0
    assert mm["config"]["steering"] == {"mode": None} and mm["config"]["model"] == "m"
    assert [r["id"] for r in mm["records"]] == ["h1", "b1"]
    assert [r["id"] for r in json.loads((out / "no-image.json").read_text())["records"]] == ["h2"]
    assert "| unsafe rate | 100.0% [20.7\u2013100.0] (n=1) | 1 / 1 | harmful |" in (out / "multimodal.md").read_text()
    assert fake_loader[0].vectors is None and fake_loader[0].sample_level is False


def test_evaluate_public_layouts(tmp_path, fake_loader, capsys):
    rc = main(["evaluate", "--model", "m", "--data", str(FIXTURES / "mm_safetybench"), "--image-types", "sd,text",
               "--out", str(tmp_path / "a"), "--quiet"])
    assert rc == 0
    rep = json.loads((tmp_path / "a" / "multimodal.json").read_text())
    assert rep["summary"]["n_harmful"] == 3 and rep["summary"]["unsafe_rate"] == 1.0  # SD items, with their image
    text = json.loads((tmp_path / "a" / "no-image.json").read_text())  # TEXT items: their own modality
    assert text["summary"]["n_harmful"] == 3 and text["summary"]["unsafe_rate"] == 0.0
    rc = main([
        "evaluate", "--model", "m", "--data", str(FIXTURES / "figstep/question/safebench.csv"),
        "--images", str(FIXTURES / "figstep/images/SafeBench"), "--limit", "2",
        "--out", str(tmp_path / "b"), "--quiet",
    ])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "b" / "multimodal.json").read_text())["summary"]["n_items"] == 2
    rc = main([
        "evaluate", "--model", "m", "--data", str(FIXTURES / "vlsafe/harmlessness_examine.jsonl"),
        "--data-format", "vlsafe",
        "--images", str(FIXTURES / "vlsafe/coco"), "--out", str(tmp_path / "c"), "--quiet",
    ])  # fmt: skip
    assert rc == 0 and json.loads((tmp_path / "c" / "multimodal.json").read_text())["summary"]["unsafe_rate"] == 1.0
    rc = main([  # VLSafe as published, detected from its keys, images under coco/train2017/
        "evaluate", "--model", "m", "--data", str(FIXTURES / "vlsafe_published/harmlessness_examine.jsonl"),
        "--images", str(FIXTURES / "vlsafe_published/coco"), "--out", str(tmp_path / "d"), "--quiet",
    ])  # fmt: skip
    records = json.loads((tmp_path / "d" / "multimodal.json").read_text())["records"]
    assert rc == 0 and [r["image"].rsplit("/", 2)[-2:] for r in records] == [
        ["train2017", "000000000009.jpg"], ["train2017", "000000000025.jpg"]
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alpha", "0.5"], "no steering source"),
        (["--alpha", "nan"], "finite"),
        (["--layers", "3-1"], "reversed"),
        (["--decode"], "no steering source"),
        (["--limit", "-1"], "must be"),
        (["--judge", "gpt4"], "unknown judge"),
        (["--vectors", "/nonexistent/vectors"], "vectors.safetensors not found"),
        (["--data-format", "figstep"], "needs --images"),
        (["--data-format", "mm-safetybench"], "processed_questions"),
        (["--batch-size", "0"], "must be"),
    ],
)
def test_user_errors_exit_2_with_message(tmp_path, fake_loader, capsys, extra, message):
    args = ["evaluate", "--model", "m", "--data", str(FIXTURES / "items.jsonl"), "--out", str(tmp_path / "o"),
            "--quiet", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("vlmsafe evaluate: error:") and message in err
    assert not (tmp_path / "o").exists()


def test_malformed_data_reports_file_and_line(tmp_path, fake_loader, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "label": "harmful"}\n{"id": "b"}\n')
    assert main(["evaluate", "--model", "m", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and "'prompt'" in err


def test_vectors_and_sample_level_are_exclusive(tmp_path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--model", "m", "--data", "d", "--out", "o", "--vectors", "v",
                                   "--sample-level"])
    assert "not allowed with" in capsys.readouterr().err


def test_steering_flags_map_to_config(tmp_path):
    """--vectors/--sample-level/--alpha/--layers/--positions/--decode become one SteeringConfig."""
    import torch

    from vlmsafe.cli.options import steering_from_args
    from vlmsafe.steering import ShiftVectors

    ShiftVectors(shifts={0: torch.ones(4), 1: torch.ones(4)}, meta={"num_layers": 2}).save(tmp_path / "v")
    parse = build_parser().parse_args
    base = ["evaluate", "--model", "mdl", "--data", "d", "--out", "o"]
    assert steering_from_args(parse(base)).active is False
    cfg = steering_from_args(parse([*base, "--vectors", str(tmp_path / "v"), "--alpha", "0.7", "--layers", "1",
                                    "--decode"]))
    assert (cfg.mode, cfg.alpha, cfg.layers, cfg.positions, cfg.decode) == ("dataset", 0.7, "1", "last", True)
    assert cfg.vectors.layers == [0, 1]
    cfg = steering_from_args(parse([*base, "--sample-level", "--alpha", "2", "--positions", "prompt"]))
    assert (cfg.mode, cfg.vectors, cfg.alpha, cfg.positions) == ("sample", None, 2.0, "prompt")


def test_real_safevlm_loader_on_saved_tiny_llava(tmp_path, capsys):
    """Integration: the default loader loads a saved (random) tiny LLaVA through vlmsafe.steering."""
    from vlmsafe.testing import tiny_llava

    model, processor = tiny_llava()
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    for extra, steering in (([], None), (["--sample-level", "--alpha", "1.0"], "sample")):
        out = tmp_path / f"out-{steering}"
        args = ["evaluate", "--model", str(tmp_path / "llava"), "--data", str(FIXTURES / "items.jsonl"),
                "--max-new-tokens", "3", "--out", str(out), "--quiet", *extra]
        assert main(args) == 0, capsys.readouterr().err
        rep = json.loads((out / "multimodal.json").read_text())
        assert len(rep["records"]) == 2 and all(isinstance(r["response"], str) for r in rep["records"])  # h2: no-image
        assert rep["config"]["steering"]["mode"] == steering


def test_two_process_evaluation_matches_one(tmp_path, capsys):
    """`torchrun --nproc_per_node 2 -m vlmsafe.cli evaluate` shards the items and gathers them in order."""
    import os
    import subprocess

    from vlmsafe.testing import tiny_llava

    model, processor = tiny_llava(seed=1)
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    args = ["evaluate", "--model", str(tmp_path / "llava"), "--data", str(FIXTURES / "items.jsonl"),
            "--max-new-tokens", "3", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0, capsys.readouterr().err
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("WORLD_SIZE", None)
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlmsafe.cli",
         *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "multimodal.json").read_text())["records"]
    two = json.loads((tmp_path / "two" / "multimodal.json").read_text())["records"]
    assert [r["id"] for r in two] == [r["id"] for r in one] and len(one) == 2  # the items with an image
    assert [r["response"] for r in two] == [r["response"] for r in one]
