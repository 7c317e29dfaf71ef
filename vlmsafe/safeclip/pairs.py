"""The safe→unsafe sentence converter that builds Safe-CLIP training text.

The paper fine-tuned an LLM on ~100 hand-curated (safe caption, unsafe caption) pairs, then
generated an unsafe version of every COCO caption to make ViSU's ``nsfw`` sentences. Here that
is two functions over any ``transformers`` causal LM:

* :func:`train_pair_converter` — LoRA (``peft``, default) or full fine-tuning on pairs, with the
  loss on the unsafe continuation only.
* :func:`generate_unsafe` — batched, left-padded generation for a list of safe captions.

For a real run use an instruction-tuned 7B-class model in bf16 on a GPU, e.g.::

    tok = AutoTokenizer.from_pretrained("meta-llama/Llama-2-7b-chat-hf")
    lm = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-2-7b-chat-hf", torch_dtype=torch.bfloat16, device_map="cuda")
    result = train_pair_converter(lm, tok, load_pairs("pairs.jsonl"), PairConverterConfig(num_epochs=5))
    unsafe = generate_unsafe(result.model, tok, coco_captions, batch_size=32, do_sample=True, top_p=0.9)

(``vlmsafe safeclip pairs train|generate`` does the same from the command line.)
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from vlmsafe.errors import FileFormatError, InputError

DEFAULT_TEMPLATE = "Safe: {safe}\nUnsafe:"


@dataclass
class PairConverterConfig:
    """Fine-tuning settings of the converter. ``prompt_template`` must contain ``{safe}``."""

    prompt_template: str = DEFAULT_TEMPLATE
    use_lora: bool = True
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_target_modules: Union[str, list[str]] = "all-linear"
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    num_epochs: int = 3
    batch_size: int = 8
    max_length: int = 256
    max_grad_norm: float = 1.0
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if "{safe}" not in self.prompt_template:
            raise InputError("prompt_template must contain '{safe}' where the safe caption goes")


@dataclass
class ConverterTrainingResult:
    model: Any  # the fine-tuned model (a peft PeftModel with LoRA)
    losses: list[float] = field(default_factory=list)  # one per optimizer step


def load_pairs(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Read (safe, unsafe) pairs from JSONL/JSON (``safe`` + ``unsafe`` or ``nsfw`` keys) or CSV."""
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"pairs file {p} does not exist")
    if p.suffix.lower() == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        text = p.read_text(encoding="utf-8")
        try:
            data = json.loads(text)
            rows = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:
            try:
                rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as exc:
                raise FileFormatError(f"{p}: not JSON/JSONL ({exc}); write one {{\"safe\": ..., \"unsafe\": ...}} object per line") from exc
    pairs = []
    for i, r in enumerate(rows, start=1):
        unsafe = r.get("unsafe", r.get("nsfw")) if isinstance(r, dict) else None
        if not isinstance(r, dict) or not r.get("safe") or not unsafe:
            raise FileFormatError(f"{p}: record {i} needs non-empty 'safe' and 'unsafe' (or 'nsfw') fields")
        pairs.append((str(r["safe"]).strip(), str(unsafe).strip()))
    if not pairs:
        raise FileFormatError(f"{p} holds no pairs")
    return pairs


def _encode_pair(tokenizer: Any, prompt: str, target: str, max_length: int) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + target_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + target_ids)[:max_length]
    return ids, labels


def train_pair_converter(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[str, str]],
    config: Optional[PairConverterConfig] = None,
) -> ConverterTrainingResult:
    """Fine-tune ``model`` to continue ``prompt_template.format(safe=S)`` with `` U<eos>``."""
    from tqdm.auto import tqdm
    from transformers import get_constant_schedule_with_warmup

    cfg = config or PairConverterConfig()
    if not pairs:
        raise InputError("no (safe, unsafe) pairs to train on")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(cfg.seed)
    if cfg.use_lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
    device = next(model.parameters()).device
    encoded = [_encode_pair(tokenizer, cfg.prompt_template.format(safe=s), u, cfg.max_length) for s, u in pairs]
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
    return ConverterTrainingResult(model, losses)


@torch.no_grad()
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
            kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": tokenizer.pad_token_id, **generate_kwargs}
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


def save_converter(model: Any, tokenizer: Any, path: str | os.PathLike[str]) -> Path:
    """Save the LoRA adapter (or full model) and tokenizer, safetensors only, atomically."""
    from vlmsafe.io import atomic_path

    with atomic_path(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(path)
