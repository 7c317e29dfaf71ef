"""Training loops of the testbed build: tokenised examples, batches, the supervised loop, and the
contrastive pretraining of the vision tower.

Kept apart from :mod:`vlmsafe.testbed.build` (which says *what* each stage trains) so the stages
read as recipes. All loops are seeded, CPU-only and single-threaded by default.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vlmsafe.testbed.data import Example
from vlmsafe.testing.tokenization import IMAGE_TOKEN


def prompt_text(processor, prompt: str, with_image: bool) -> str:
    """The chat-formatted prompt (generation prompt added); text-only = the same turn without image."""
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


class Encoder:
    """Tokenises examples once (image tokens expanded exactly like ``LlavaProcessor``)."""

    def __init__(self, processor, num_image_tokens: int):
        self.processor = processor
        self.tok = processor.tokenizer
        self.n_img = num_image_tokens

    def pixels(self, images: Sequence) -> torch.Tensor:
        return self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]

    def encode(self, examples: Sequence[Example]) -> list[dict]:
        images = [ex.image for ex in examples if ex.image is not None]
        pix = self.pixels(images) if images else None
        out, k = [], 0
        for ex in examples:
            text = prompt_text(self.processor, ex.prompt, ex.image is not None)
            text = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.n_img)
            p_ids = self.tok(text, add_special_tokens=False)["input_ids"]
            a_ids = self.tok(" " + ex.answer, add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
            item = {"prompt": p_ids, "answer": a_ids, "pixel_values": None}
            if ex.image is not None:
                item["pixel_values"] = pix[k]
                k += 1
            out.append(item)
        return out


def collate(items: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded batch with loss on answer tokens only; positions count from the first real token."""
    seqs = [it["prompt"] + it["answer"] for it in items]
    n = max(len(s) for s in seqs)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    labels = torch.full((len(items), n), -100, dtype=torch.long)
    for i, (it, s) in enumerate(zip(items, seqs)):
        ids[i, n - len(s) :] = torch.tensor(s)
        mask[i, n - len(s) :] = 1
        labels[i, n - len(it["answer"]) :] = torch.tensor(it["answer"])
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
    pix = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    if pix:
        batch["pixel_values"] = torch.stack(pix)
    return batch


def optimizer_step(
    opt: torch.optim.Optimizer, sched: Any, loss: torch.Tensor, clip: Iterable[torch.Tensor] | None
) -> float:
    """One update of every testbed loop: clear the gradients, backpropagate ``loss``, clip the gradient norm of
    ``clip`` to 1 (``None``: no clipping), step the optimiser and its schedule. Returns the loss as a float."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    opt.step()
    sched.step()
    return float(loss.detach())


def _tail_mean(losses: Sequence[float]) -> float:
    """The mean loss of the last 50 steps: what a stage reports."""
    tail = losses[-50:]
    return sum(tail) / len(tail)


def _schedule(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    )


def train(
    model: nn.Module,
    groups: Sequence[dict],
    pools: Sequence[tuple[list[dict], float]],
    schedule: tuple[int, float, int],
    pad_id: int,
    rng: random.Random,
    desc: str,
) -> float:
    """AdamW with linear warm-up/decay over parameter ``groups`` (``{"params", "lr_scale"}``).

    Each batch is drawn from one of ``pools`` (items, weight) chosen by weight, so a batch is all
    image or all text. Returns the mean loss of the last 50 steps.
    """
    steps, lr, bs = schedule
    param_groups = [{"params": g["params"], "lr": lr * g.get("lr_scale", 1.0)} for g in groups]
    flat = [p for g in param_groups for p in g["params"]]
    opt = torch.optim.AdamW(param_groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = _schedule(opt, steps)
    weights = [w for _, w in pools]
    model.train()
    losses: list[float] = []
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=5.0):
        items = rng.choices(pools, weights=weights)[0][0]
        picked = rng.sample(items, bs) if len(items) >= bs else rng.choices(items, k=bs)
        losses.append(optimizer_step(opt, sched, model(**collate(picked, pad_id)).loss, flat))
    model.eval()
    return _tail_mean(losses)


class CaptionEncoder(nn.Module):
    """The text side of the vision tower's contrastive pretraining: mean of word embeddings + MLP.

    Captions of the testbed's images are short bags of words ("two red squares ."), so a
    bag-of-words encoder separates them; it is discarded after pretraining, as CLIP's text tower
    is not part of LLaVA.
    """

    def __init__(self, vocab_size: int, dim: int, out_dim: int):
        super().__init__()
        self.embed = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, out_dim))

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embed(ids, offsets))


def pretrain_vision(
    vision_tower: nn.Module,
    pixels: torch.Tensor,
    captions: Sequence[list[int]],
    vocab_size: int,
    schedule: tuple[int, float, int],
    rng: random.Random,
    desc: str = "v: vision pretrain",
) -> float:
    """CLIP-style contrastive pretraining of ``vision_tower`` (a ``CLIPVisionModel``) on image-caption pairs.

    The image embedding is the tower's pooled output (class token after the post-layernorm),
    projected; the loss is the symmetric InfoNCE of CLIP with a learnt temperature. Identical
    captions in a batch are all positives (soft targets), since the testbed's captions repeat.
    Returns the mean loss of the last 50 steps.
    """
    steps, lr, bs = schedule
    dim = vision_tower.config.hidden_size
    text = CaptionEncoder(vocab_size, dim, dim)
    proj = nn.Linear(dim, dim, bias=False)
    log_scale = nn.Parameter(torch.tensor(2.3))
    params = [*vision_tower.parameters(), *text.parameters(), *proj.parameters(), log_scale]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = _schedule(opt, steps)
    keys = [tuple(c) for c in captions]
    vision_tower.train()
    losses: list[float] = []
    for _ in tqdm(range(steps), desc=desc, leave=False, mininterval=5.0):
        idx = rng.sample(range(len(keys)), bs)
        v = F.normalize(proj(vision_tower(pixel_values=pixels[idx]).pooler_output), dim=-1)
        ids = torch.tensor([w for i in idx for w in captions[i]])
        offsets = torch.tensor([0, *torch.tensor([len(captions[i]) for i in idx]).cumsum(0)[:-1].tolist()])
        t = F.normalize(text(ids, offsets), dim=-1)
        same = torch.tensor([[keys[i] == keys[j] for j in idx] for i in idx], dtype=torch.float32)
        target = same / same.sum(-1, keepdim=True)
        logits = log_scale.exp().clamp(max=100) * v @ t.T
        loss = 0.5 * (
            torch.sum(-target * F.log_softmax(logits, -1), -1).mean()
            + torch.sum(-target * F.log_softmax(logits.T, -1), -1).mean()
        )
        losses.append(optimizer_step(opt, sched, loss, params))
    vision_tower.eval()
    return _tail_mean(losses)
