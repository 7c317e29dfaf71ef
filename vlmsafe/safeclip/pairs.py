"""The safe→unsafe sentence converter that builds Safe-CLIP training text.

The paper fine-tuned an LLM on ~100 hand-curated (safe caption, unsafe caption) pairs, then
generated an unsafe version of every COCO caption to make ViSU's ``nsfw`` sentences. Here that
is two functions over any ``transformers`` causal LM:

* :func:`train_pair_converter` — LoRA (``peft``, default) or full fine-tuning on pairs, with the
  loss on the unsafe continuation only.
* :func:`generate_unsafe` — batched, left-padded generation for a list of safe captions.

For a real run use an instruction-tuned 7B-class model in bf16 on a GPU, e.g.::

    from vlmsafe.loading import load_model

    lm, tok = load_model("meta-llama/Llama-2-7b-chat-hf", kind="causal_lm", dtype="bfloat16", device="cuda")
    result = train_pair_converter(lm, tok, load_pairs("pairs.jsonl"), PairConverterConfig(num_epochs=5))
    unsafe = generate_unsafe(result.model, tok, coco_captions, batch_size=32, do_sample=True, top_p=0.9)

(``vlmsafe safeclip pairs train|generate`` does the same from the command line.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmsafe import validation
from vlmsafe._lazy import no_grad
from vlmsafe.data import read_records
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.options import (
    LORA_ALPHA_MAX,
    LR_MAX,
    WEIGHT_DECAY_MAX,
    check_options,
    float_option,
    int_option,
    other_option,
    switch_option,
)
from vlmsafe.reading import read_text
from vlmsafe.validation import SEED_MAX, check_float, check_int

DEFAULT_TEMPLATE = "Safe: {safe}\nUnsafe:"


@dataclass
class PairConverterConfig:
    """Fine-tuning settings of the converter (help, ranges and CLI flags in the field metadata)."""

    prompt_template: str = other_option(
        "prompt template with {safe} where the safe caption goes",
        flag="--template",
        kind="str",
        default=DEFAULT_TEMPLATE,
    )
    use_lora: bool = switch_option(
        True,
        "train LoRA adapters (False: all weights)",
        flag="--full-finetune",
        const=False,
        flag_help="train all weights instead of LoRA",
    )
    lora_r: int = int_option(16, "LoRA rank")
    lora_alpha: float = float_option(32.0, "LoRA alpha, in (0, 10000]", low=0, low_open=True, high=LORA_ALPHA_MAX)
    lora_dropout: float = float_option(0.05, "LoRA dropout, in [0, 1)", low=0, high=1, high_open=True)
    lora_target_modules: str | list[str] = "all-linear"
    learning_rate: float = float_option(
        2e-4, "AdamW learning rate, in (0, 10]", low=0, low_open=True, high=LR_MAX, flag="--lr")
    weight_decay: float = float_option(0.0, "AdamW weight decay, in [0, 10]", low=0, high=WEIGHT_DECAY_MAX)
    warmup_steps: int = int_option(0, "learning-rate warm-up steps", low=0)
    num_epochs: int = int_option(3, "passes over the pairs", flag="--epochs")
    batch_size: int = int_option(8, "pairs per optimizer step")
    max_length: int = int_option(256, "longest prompt + continuation, in tokens")
    max_grad_norm: float = float_option(1.0, "gradient clipping norm", low=0, low_open=True)
    seed: int = int_option(0, "seed for LoRA init and pair order", low=0, high=SEED_MAX)
    progress: bool = switch_option(
        True, "show a progress bar", flag="--no-progress", const=False, flag_help="hide progress bars"
    )

    def __post_init__(self) -> None:
        check_options(self)
        check_template(self.prompt_template)


def check_template(template: str) -> str:
    """``template`` if it holds the ``{safe}`` placeholder (and nothing else ``str.format`` would fill)."""
    return validation.check_template(template, "prompt template", "safe")


@dataclass
class ConverterTrainingResult:
    model: Any  # the fine-tuned model (a peft PeftModel with LoRA)
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    truncated_pairs: int = 0  # pairs left out: --max-length kept none of their unsafe tokens


def load_pairs(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read (safe, unsafe) pairs from JSONL/JSON (``safe`` + ``unsafe`` or ``nsfw`` keys) or CSV."""
    pairs = []
    for where, r in read_records(path, what="pairs file"):
        unsafe = r.get("unsafe", r.get("nsfw"))
        safe = r.get("safe")
        if not isinstance(safe, str) or not isinstance(unsafe, str) or not safe.strip() or not unsafe.strip():
            raise FileFormatError(
                f"{where}: each pair needs non-empty 'safe' and 'unsafe' (or 'nsfw') text fields; "
                'write one {"safe": ..., "unsafe": ...} object per line'
            )
        pairs.append((safe.strip(), unsafe.strip()))
    return pairs


def load_captions(path: str | os.PathLike[str]) -> list[str]:
    """Safe captions to convert: a text file (one per line) or JSON/JSONL records with ``safe`` or ``caption``."""
    p = Path(path)
    if p.suffix.lower() in (".jsonl", ".json"):
        out = []
        for where, rec in read_records(p, what="captions file"):
            text = rec.get("safe", rec.get("caption"))
            if not isinstance(text, str) or not text.strip():
                raise FileFormatError(
                    f"{where}: expected a non-empty 'safe' or 'caption' text field; add one per record"
                )
            out.append(text.strip())
        return out
    if not p.is_file():
        kind = "is a directory" if p.is_dir() else "does not exist"
        raise FileFormatError(f"{p}: captions file {kind}; pass a .txt file (one caption per line) or JSONL")
    lines = [line.strip() for line in read_text(p, fix="save the captions as UTF-8").splitlines() if line.strip()]
    if not lines:
        raise FileFormatError(f"{p}: captions file is empty; write one caption per line")
    return lines


def _encode_pair(tokenizer: Any, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return ids, labels


def encode_pairs(
    tokenizer: Any, pairs: Sequence[tuple[str, str]], template: str, max_length: int
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Token ids and labels of each pair that keeps at least one unsafe token within ``max_length``.

    A pair cut back to its prompt has no label to learn from, and a batch of only such pairs has a
    0/0 (NaN) loss that would turn every trained weight into NaN; so those pairs are left out (their
    count is returned and warned about once), and if no pair keeps a token the run is refused.

    Raises:
        InputError: every pair is truncated to its prompt at ``max_length``.
    """
    import warnings

    encoded = [_encode_pair(tokenizer, template.format(safe=s), u, max_length) for s, u in pairs]
    kept = [(ids, labels) for ids, labels in encoded if any(t != -100 for t in labels)]
    if not kept:
        shortest = min(len(tokenizer(template.format(safe=s), add_special_tokens=True)["input_ids"]) for s, _ in pairs)
        raise InputError(f"every pair is truncated to its prompt at `max_length` {max_length} (the shortest prompt "
                         f"has {shortest} tokens), so there is nothing to learn; raise `max_length` above {shortest}")
    if len(kept) < len(encoded):
        warnings.warn(f"{len(encoded) - len(kept)} of {len(encoded)} pairs are truncated to their prompt at "
                      f"`max_length` {max_length} and are left out; raise `max_length` to train on them",
                      stacklevel=2)
    return kept, len(encoded) - len(kept)


def train_pair_converter(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    config: PairConverterConfig | None = None,
) -> ConverterTrainingResult:
    """Fine-tune ``model`` to continue ``prompt_template.format(safe=S)`` with `` U<eos>``."""
    import torch
    from tqdm.auto import tqdm
    from transformers import get_constant_schedule_with_warmup

    cfg = config or PairConverterConfig()
    if not pairs:
        raise InputError("no (safe, unsafe) pairs to train on")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded, truncated = encode_pairs(tokenizer, pairs, cfg.prompt_template, cfg.max_length)
    torch.manual_seed(cfg.seed)
    if cfg.use_lora:
        from peft import LoraConfig

        from vlmsafe.loading import inject_lora

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = inject_lora(model, lora)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = get_constant_schedule_with_warmup(opt, cfg.warmup_steps)
    gen = torch.Generator().manual_seed(cfg.seed)
    steps_per_epoch = -(-len(encoded) // cfg.batch_size)
    losses: list[float] = []
    model.train()
    bar = tqdm(total=steps_per_epoch * cfg.num_epochs, desc="pair converter", disable=not cfg.progress)
    pad = tokenizer.pad_token_id
    for _ in range(cfg.num_epochs):
        order = torch.randperm(len(encoded), generator=gen).tolist()
        for start in range(0, len(order), cfg.batch_size):
            chunk = [encoded[i] for i in order[start : start + cfg.batch_size]]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in chunk], device=device)
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk], device=device)
            mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in chunk], device=device)
            loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return ConverterTrainingResult(model, losses, truncated)


@no_grad  # torch loads when this runs: the CLI reads this module for its flags
def generate_unsafe(
    model: Any,
    tokenizer: Any,
    captions: Sequence[str],
    *,
    prompt_template: str = DEFAULT_TEMPLATE,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    progress: bool = False,
    **generate_kwargs: Any,
) -> list[str]:
    """Generate the unsafe version of each safe caption (greedy unless ``do_sample=True`` etc.).

    Prompts are left-padded so a batch generates together; the output is cut at the first
    newline (the template's line structure) and stripped.
    """
    from tqdm.auto import tqdm

    check_int(batch_size, "batch_size", low=1)
    check_int(max_new_tokens, "max_new_tokens", low=1)
    if "temperature" in generate_kwargs:
        check_float(generate_kwargs["temperature"], "temperature", low=0, low_open=True)
    if "top_p" in generate_kwargs:
        check_float(generate_kwargs["top_p"], "top_p", low=0, high=1, low_open=True)
    check_template(prompt_template)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(captions), batch_size), desc="generating", disable=not progress):
            prompts = [prompt_template.format(safe=c) for c in captions[start : start + batch_size]]
            enc = tokenizer(prompts, return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            kwargs = {
                "max_new_tokens": max_new_tokens,
                "do_sample": False,
                "pad_token_id": tokenizer.pad_token_id,
                **generate_kwargs,
            }
            if tokenizer.eos_token_id is not None:
                kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
            gen = model.generate(**enc, **kwargs)
            for row in gen[:, enc["input_ids"].shape[1] :]:
                text = tokenizer.decode(row, skip_special_tokens=True)
                out.append(text.strip().split("\n")[0].strip())
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return out


def save_converter(model: Any, tokenizer: Any, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Save the LoRA adapter (or full model) and tokenizer, safetensors only, atomically.

    An existing non-empty ``path`` is replaced only with ``overwrite=True``.
    """
    from vlmsafe.io import atomic_path

    with atomic_path(path, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(path)
