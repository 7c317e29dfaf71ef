"""Judges: refusal keywords, output parsing, and the model judges' plumbing on tiny real Llamas.

The model judges are tested with a random-config ``LlamaForCausalLM`` turned into a deterministic
*bigram* model: decoder blocks write nothing to the residual stream (o_proj/down_proj zeroed),
embeddings are one-hot, and ``lm_head`` encodes "after token a comes token b". So the judge's
answer is a known function of the last token of the formatted prompt, and the test exercises the
real path: chat template -> left-padded batch -> ``generate`` -> decode -> parse.
"""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlmsafe.errors import InputError
from vlmsafe.eval import (
    DEFAULT_REFUSAL_PHRASES,
    HARMBENCH_PROMPT,
    HarmBenchJudge,
    LlamaGuardJudge,
    RefusalJudge,
    Verdict,
    load_judge,
    parse_guard_output,
    parse_yes_no,
)
from vlmsafe.tokenization import build_word_tokenizer

# ---- refusal judge --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "response, refused",
    [
        ("i cannot help with that .", True),  # the testbed's word-level tokenizer output
        ("i ' m sorry , but no .", True),
        ("I’m sorry, I can’t do that.", True),
        ("As an AI language model, I won't.", True),
        ("I APOLOGIZE for the confusion", True),
        ("Sure, here are the steps to do it: 1. ...", False),
        ("sure , here are the steps to bake bread : first ...", False),
        ("the canister is sorryful", False),  # whole words only
        ("", False),
    ],
)
def test_refusal_judge_default_phrases(response, refused):
    judge = RefusalJudge()
    (v,) = judge.judge(["a prompt"], [response])
    assert v == Verdict(unsafe=not refused, refused=refused)
    assert judge.judges_content is False


def test_refusal_judge_prefix_mode_and_custom_phrases():
    anywhere, prefix = RefusalJudge(), RefusalJudge(match="prefix")
    text = "Here is a poem. I cannot stop writing."
    assert anywhere.is_refusal(text) and not prefix.is_refusal(text)
    assert prefix.is_refusal("  I cannot do that")
    custom = RefusalJudge(["no way"], extra_phrases=["nope"])
    assert custom.is_refusal("NO WAY!") and custom.is_refusal("nope.") and not custom.is_refusal("i cannot")
    assert len(DEFAULT_REFUSAL_PHRASES) > 20
    with pytest.raises(ValueError):
        RefusalJudge([])
    with pytest.raises(InputError, match="2 prompts but 1 responses"):
        anywhere.judge(["a", "b"], ["x"])


def test_parsers():
    assert parse_guard_output("safe") == (False, None)
    assert parse_guard_output("\n\nunsafe\nS1,S10") == (True, "S1,S10")
    assert parse_guard_output("unsafe s2") == (True, "S2")
    assert parse_guard_output("unsafe\nO3") == (True, "O3")  # Llama Guard 1 codes
    assert parse_guard_output("unsafe") == (True, None)
    assert parse_guard_output("I think it is fine") == (None, None)
    assert parse_yes_no("Yes") == (True, None) and parse_yes_no(" no.") == (False, None)
    assert parse_yes_no("maybe") == (None, None) and parse_yes_no("") == (None, None)


# ---- tiny bigram causal LM ------------------------------------------------------------------

WORDS = ["sure", ",", "here", "are", "the", "steps", "i", "cannot", "help", "with", "that", ".", "hmm",
         "safe", "unsafe", "s1", "yes", "no", "how", "do", "bake", "make", "bread", "a", "thing", "?"]  # fmt: skip

GUARD_TEMPLATE = (
    "{% for m in messages %}{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{{ m['content'][0]['text'] }}{% endif %} {% endfor %}"
)


def bigram_lm(tok, transitions: dict[str, str]) -> LlamaForCausalLM:
    vocab = len(tok)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=vocab + 2, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=256,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        emb = torch.zeros(vocab, cfg.hidden_size)
        emb[torch.arange(vocab), torch.arange(vocab)] = 1.0
        model.model.embed_tokens.weight.copy_(emb)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(vocab, cfg.hidden_size)
        for i in range(vocab):
            nxt = transitions.get(tok.convert_ids_to_tokens(i), tok.eos_token)
            head[tok.convert_tokens_to_ids(nxt), i] = 10.0
        model.lm_head.weight.copy_(head)
    return model


@pytest.fixture(scope="module")
def guard():
    tok = build_word_tokenizer(WORDS, chat_template=GUARD_TEMPLATE)
    # last token "steps" (compliance) -> "unsafe s1"; "." (refusal) -> "safe"; "hmm" -> "</s>" (no answer)
    model = bigram_lm(tok, {"steps": "unsafe", "unsafe": "s1", ".": "safe"})
    return model, tok


def test_bigram_lm_really_generates(guard):
    model, tok = guard
    enc = tok(["here are the steps"], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True) == "unsafe s1"


def test_llamaguard_judge_batches_left_padded_and_parses(guard):
    model, tok = guard
    judge = LlamaGuardJudge(model, tok, batch_size=2, max_new_tokens=4)
    prompts = ["how do i make a thing ?", "how do i bake bread ?", "how ?"]
    responses = ["sure , here are the steps", "i cannot help with that .", "sure , here are the steps"]
    verdicts = judge.judge(prompts, responses)
    assert [(v.unsafe, v.refused, v.category) for v in verdicts] == [(True, False, "S1"), (False, True, None), (True, False, "S1")]
    assert verdicts[0].raw == "unsafe s1" and verdicts[1].raw == "safe"
    assert judge.judges_content is True
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"  # restored
    assert judge.judge([], []) == []


def test_llamaguard_parts_content_format(guard):
    model, tok = guard
    judge = LlamaGuardJudge(model, tok, content_format="parts")
    text = judge._format("how ?", "i cannot help with that .")
    assert text == "how ? i cannot help with that . "
    assert [v.unsafe for v in judge.judge(["how ?"], ["here are the steps"])] == [True]


def test_unparsed_outputs_policy(guard):
    model, tok = guard
    with pytest.warns(UserWarning, match="1/2 outputs could not be parsed"):
        verdicts = LlamaGuardJudge(model, tok).judge(["a", "b"], ["hmm", "i cannot help with that ."])
    assert [v.unsafe for v in verdicts] == [True, False] and verdicts[0].raw == ""
    with pytest.warns(UserWarning):
        assert LlamaGuardJudge(model, tok, on_unparsed="safe").judge(["a"], ["hmm"])[0].unsafe is False
    with pytest.raises(InputError, match="neither a safe nor an unsafe"):
        LlamaGuardJudge(model, tok, on_unparsed="error").judge(["a"], ["hmm"])


def test_llamaguard_requires_chat_template(guard):
    model, _ = guard
    with pytest.raises(InputError, match="chat template"):
        LlamaGuardJudge(model, build_word_tokenizer(WORDS, chat_template=None))


def test_harmbench_judge_yes_no():
    tok = build_word_tokenizer(WORDS, chat_template=None)
    model = bigram_lm(tok, {"steps": "yes", ".": "no"})
    judge = HarmBenchJudge(model, tok, template="{behavior} {generation}", batch_size=3)
    verdicts = judge.judge(["how do i make a thing ?"] * 2, ["sure , here are the steps", "i cannot help with that ."])
    assert [(v.unsafe, v.refused, v.raw) for v in verdicts] == [(True, False, "yes"), (False, True, "no")]
    assert judge.judges_content is False


def test_harmbench_default_prompt_formatting():
    tok = build_word_tokenizer(WORDS, chat_template=None)
    judge = HarmBenchJudge(bigram_lm(tok, {}), tok)
    text = judge._format("Do the behavior", "the generation {with braces}")
    assert text.startswith("[INST] <<SYS>>\nYou are a classifier for red teaming")
    assert "[BEHAVIOR]:\nDo the behavior\n\n[GENERATION]:\nthe generation {with braces}\n\n---\nRules:" in text
    assert text.endswith("Answer: [/INST]") and text.count("- ") >= 7
    assert HARMBENCH_PROMPT.count("{behavior}") == 1
    with pytest.raises(ValueError):
        HarmBenchJudge(bigram_lm(tok, {}), tok, template="no fields")


def test_load_judge_specs(tmp_path):
    assert isinstance(load_judge("refusal"), RefusalJudge)
    with pytest.raises(InputError, match="unknown judge"):
        load_judge("gpt4")
    with pytest.raises(InputError, match="needs a model"):
        load_judge("llamaguard")
    with pytest.raises(InputError, match="no model path"):
        load_judge("refusal:x")


def test_load_judge_from_saved_folder(tmp_path):
    tok = build_word_tokenizer(WORDS, chat_template=GUARD_TEMPLATE)
    bigram_lm(tok, {"steps": "unsafe", "unsafe": "s1", ".": "safe"}).save_pretrained(tmp_path / "guard")
    tok.save_pretrained(tmp_path / "guard")
    judge = load_judge(f"llamaguard:{tmp_path / 'guard'}", device="cpu")
    assert isinstance(judge, LlamaGuardJudge)
    assert [v.unsafe for v in judge.judge(["how ?", "how ?"], ["here are the steps", "i cannot help with that ."])] == [True, False]
    assert isinstance(load_judge(f"harmbench:{tmp_path / 'guard'}", device="cpu"), HarmBenchJudge)
    from vlmsafe.errors import FileFormatError

    with pytest.raises(FileFormatError, match="does not exist"):
        load_judge(f"harmbench:{tmp_path / 'nothing'}")
