"""The safe→unsafe converter on a tiny LlamaForCausalLM with an offline word-level tokenizer."""

import json

import pytest
import torch

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.safeclip.pairs import (
    PairConverterConfig,
    generate_unsafe,
    load_pairs,
    save_converter,
    train_pair_converter,
)
from vlmsafe.testing import tiny_text_config
from vlmsafe.testing.tokenization import build_word_tokenizer

SUBJECTS = ["dog", "cat", "man", "woman", "child", "horse", "bird", "car"]
PAIRS = [(f"a {s} on the {p}", f"a {s} on the {p} covered in blood") for s in SUBJECTS for p in ("grass", "beach")]


pytestmark = pytest.mark.usefixtures("one_thread")  # Safe-CLIP results are bit-exact on one thread


def tiny_lm():
    from transformers import LlamaForCausalLM

    words = {w for a, b in PAIRS for w in f"{a} {b}".split()} | {"safe", "unsafe", ":"}
    tok = build_word_tokenizer(words, chat_template=None, padding_side="right", image_token=None, special_tokens=())
    torch.manual_seed(0)
    cfg = tiny_text_config(
        len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_key_value_heads=4,
        max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(cfg), tok


def test_lora_converter_learns_pairs_and_generates_in_batches(tmp_path):
    from peft import PeftModel

    lm, tok = tiny_lm()
    res = train_pair_converter(
        lm,
        tok,
        PAIRS,
        PairConverterConfig(num_epochs=60, learning_rate=3e-3, batch_size=8, lora_dropout=0.0, progress=False),
    )
    assert isinstance(res.model, PeftModel)
    assert len(res.losses) == 60 * 2 and res.losses[-1] < 0.7 * res.losses[0]
    captions = [s for s, _ in PAIRS[:5]]
    out = generate_unsafe(
        res.model, tok, captions, batch_size=2, max_new_tokens=12
    )  # batches of 2 and 1: left padding
    assert out == [u for _, u in PAIRS[:5]]
    assert tok.padding_side == "right"  # restored
    # the adapter is saved as safetensors and reloads to the same generations
    save_converter(res.model, tok, tmp_path / "conv")
    assert (tmp_path / "conv" / "adapter_model.safetensors").is_file()
    base, _ = tiny_lm()
    reloaded = PeftModel.from_pretrained(base, tmp_path / "conv")
    assert generate_unsafe(reloaded, tok, captions[:2]) == out[:2]


def test_full_finetune_leaves_no_adapter():
    lm, tok = tiny_lm()
    res = train_pair_converter(
        lm, tok, PAIRS[:4], PairConverterConfig(use_lora=False, num_epochs=2, batch_size=4, progress=False)
    )
    assert res.model is lm and len(res.losses) == 2


def test_load_pairs_formats(tmp_path):
    (tmp_path / "p.jsonl").write_text(
        '{"safe": "a dog", "unsafe": "a dead dog"}\n\n{"safe": "a cat", "nsfw": "a bloody cat"}\n'
    )
    (tmp_path / "p.csv").write_text("safe,unsafe\na dog,a dead dog\n")
    (tmp_path / "p.json").write_text(json.dumps([{"safe": "x", "unsafe": "y"}]))
    assert load_pairs(tmp_path / "p.jsonl") == [("a dog", "a dead dog"), ("a cat", "a bloody cat")]
    assert load_pairs(tmp_path / "p.csv") == [("a dog", "a dead dog")]
    assert load_pairs(tmp_path / "p.json") == [("x", "y")]
    (tmp_path / "bad.jsonl").write_text('{"safe": "a dog"}\n')
    with pytest.raises(FileFormatError, match="'safe' and 'unsafe'"):
        load_pairs(tmp_path / "bad.jsonl")
    with pytest.raises(FileFormatError, match="does not exist"):
        load_pairs(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match=r"\{safe\}"):
        PairConverterConfig(prompt_template="no placeholder")


def test_cli_pairs_train_and_generate(tmp_path, capsys):
    from vlmsafe.cli import main

    lm, tok = tiny_lm()
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"safe": s, "unsafe": u}) + "\n" for s, u in PAIRS))
    (tmp_path / "caps.txt").write_text("a dog on the grass\na cat on the beach\n")
    assert (
        main(
            [
                "safeclip",
                "pairs",
                "train",
                "--model",
                str(tmp_path / "lm"),
                "--pairs",
                str(tmp_path / "pairs.jsonl"),
                "--output-dir",
                str(tmp_path / "conv"),
                "--epochs",
                "2",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    assert (tmp_path / "conv" / "adapter_model.safetensors").is_file()
    assert (
        main(
            [
                "safeclip",
                "pairs",
                "generate",
                "--model",
                str(tmp_path / "lm"),
                "--adapter",
                str(tmp_path / "conv"),
                "--captions",
                str(tmp_path / "caps.txt"),
                "--output",
                str(tmp_path / "out.jsonl"),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["safe"] for r in rows] == ["a dog on the grass", "a cat on the beach"]
    assert all(isinstance(r["unsafe"], str) for r in rows)


def test_captions_and_templates_are_checked(tmp_path):
    from vlmsafe.safeclip.pairs import check_template, load_captions

    (tmp_path / "c.jsonl").write_text('{"caption": "a dog"}\n{"safe": " a cat "}\n')
    assert load_captions(tmp_path / "c.jsonl") == ["a dog", "a cat"]
    (tmp_path / "bad.jsonl").write_text('{"caption": "a dog"}\n{"text": "x"}\n')
    with pytest.raises(FileFormatError, match=r"bad\.jsonl:2: expected a non-empty 'safe' or 'caption'"):
        load_captions(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="field other than"):
        check_template("Safe: {safe} {extra}")
    with pytest.raises(InputError, match="temperature must be > 0"):
        generate_unsafe(None, None, ["a dog"], do_sample=True, temperature=0.0)
    with pytest.raises(InputError, match="top_p must be a finite"):
        generate_unsafe(None, None, ["a dog"], do_sample=True, top_p=float("nan"))
    with pytest.raises(InputError, match="learning_rate"):
        PairConverterConfig(learning_rate=float("inf"))


def test_cli_pairs_train_refuses_when_max_length_keeps_no_unsafe_token(tmp_path, capsys):
    """--max-length 1 cuts every pair to its prompt: refused before training (was: NaN losses, an all-zero adapter)."""
    from vlmsafe.cli import main

    lm, tok = tiny_lm()
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"safe": s, "unsafe": u}) + "\n" for s, u in PAIRS))
    out = tmp_path / "conv"
    rc = main(["safeclip", "pairs", "train", "--model", str(tmp_path / "lm"), "--pairs", str(tmp_path / "pairs.jsonl"),
               "--output-dir", str(out), "--max-length", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 2 and not out.exists() and captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "every pair is truncated to its prompt at --max-length 1" in err[0]
    assert "raise --max-length above" in err[0]


def test_max_length_reads_as_the_config_field_in_python_and_as_the_flag_on_the_command_line(tmp_path, capsys):
    """The same refusal: ``PairConverterConfig.max_length`` from Python, ``--max-length`` from the command line."""
    from vlmsafe.cli import main

    lm, tok = tiny_lm()
    with pytest.raises(InputError) as info:
        train_pair_converter(lm, tok, PAIRS, PairConverterConfig(max_length=1, progress=False))
    python = str(info.value)
    assert python.startswith("every pair is truncated to its prompt at `max_length` 1 (the shortest prompt has ")
    assert "raise `max_length` above" in python and "--" not in python
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"safe": s, "unsafe": u}) + "\n" for s, u in PAIRS))
    rc = main(["safeclip", "pairs", "train", "--model", str(tmp_path / "lm"), "--pairs", str(tmp_path / "pairs.jsonl"),
               "--output-dir", str(tmp_path / "conv"), "--max-length", "1", "--no-progress"])
    assert rc == 2
    cli = python.replace("`max_length`", "--max-length")
    assert capsys.readouterr().err.strip() == f"vlmsafe safeclip: error: {cli}"


def test_pairs_cut_to_their_prompt_are_left_out_with_one_warning():
    """Pairs whose unsafe text --max-length cuts off entirely are dropped (a batch of them has a NaN loss)."""
    from vlmsafe.safeclip.pairs import encode_pairs

    _, tok = tiny_lm()
    template = "safe : {safe} unsafe :"
    short = [("a dog", "a dog covered in blood")]
    long = [("a dog on the grass on the beach on the grass", "a dog covered in blood")]
    prompt_len = len(tok(template.format(safe=short[0][0]))["input_ids"])
    with pytest.warns(UserWarning, match="1 of 2 pairs are truncated to their prompt at `max_length`"):
        kept, dropped = encode_pairs(tok, short + long, template, prompt_len + 2)
    assert dropped == 1 and len(kept) == 1
    assert [t for t in kept[0][1] if t != -100] == tok(" a dog", add_special_tokens=False)["input_ids"][:2]
    with pytest.raises(InputError, match=f"shortest prompt has {prompt_len} tokens"):
        encode_pairs(tok, short + long, template, prompt_len)


def test_printed_json_has_null_not_nan():
    from vlmsafe.reading import json_text as _json

    text = _json({"first_loss": float("nan"), "best_metrics": {"loss": float("inf"), "r": 1.5}, "h": [float("-inf")]})
    assert json.loads(text) == {"first_loss": None, "best_metrics": {"loss": None, "r": 1.5}, "h": [None]}


def test_a_warning_names_the_parameter_in_python_and_the_flag_on_the_command_line(tmp_path):
    """The truncation warning says ``max_length`` to a Python caller and ``--max-length`` to a command-line user (the
    command shows library warnings through :func:`vlmsafe.cli.parsing.flags_in_warnings`)."""
    from vlmsafe.cli import main
    from vlmsafe.safeclip.pairs import encode_pairs

    lm, tok = tiny_lm()
    template = "safe : {safe} unsafe :"
    pairs = [("a dog", "a dog covered in blood"),
             ("a dog on the grass on the beach on the grass", "a dog covered in blood")]
    limit = len(tok(template.format(safe=pairs[0][0]))["input_ids"]) + 2
    with pytest.warns(UserWarning) as python:
        encode_pairs(tok, pairs, template, limit)
    assert str(python[0].message) == (f"1 of 2 pairs are truncated to their prompt at `max_length` {limit} and are "
                                      "left out; raise `max_length` to train on them")
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"safe": s, "unsafe": u}) + "\n" for s, u in pairs))
    with pytest.warns(UserWarning) as cli:
        rc = main(["safeclip", "pairs", "train", "--model", str(tmp_path / "lm"),
                   "--pairs", str(tmp_path / "pairs.jsonl"),
                   "--output-dir", str(tmp_path / "conv"), "--max-length", str(limit), "--template", template,
                   "--epochs", "1", "--no-progress"])
    assert rc == 0
    shown = [str(w.message) for w in cli if "truncated" in str(w.message)]
    assert shown == [str(python[0].message).replace("`max_length`", "--max-length")]
