"""Time one Safe-CLIP training step against one plain CLIP contrastive step (same model, same batch).

A Safe-CLIP step runs the trainable towers on four inputs (S, U, V, G) and the frozen reference on two
(S, V); a plain CLIP step runs the towers on (S, V). Every step here uses the same LoRA-injected model,
optimizer and batch, and includes forward, backward, gradient clipping and the optimizer step.

Rows (each timed once per round; rounds interleave the kinds in a rotating order, so a change of load on
a shared machine hits all of them alike; ratios are taken within a round):

* plain CLIP step (the peer): the towers' stock forward, as any CLIP training runs it;
* the same plain step with the pooled last block Safe-CLIP's passes use (``vlmsafe.safeclip.pooled``: the
  last block of each tower runs its query, attention and MLP on the pooled token only). It shows how much
  of Safe-CLIP's ratio comes from that trick, which any CLIP training could use, and which saves most of
  ``1/L`` of a tower of ``L`` blocks: much more on this benchmark's 4-block towers than on a 24-block ViT-L;
* the floor of a cached Safe-CLIP step: the same four (pooled) tower passes as two plain CLIP
  forward/backward pairs, (S, V) and (U, G), and one update: twice a plain step's data, none of Safe-CLIP's
  own work;
* Safe-CLIP, reference computed in the step (``cache_reference=False``);
* Safe-CLIP, reference read from the cache: every step of every epoch, the first included, because the
  trainer computes the frozen reference's outputs for all training items before the first step;
* that one-off computation, per batch of items, and the first epoch with it spread over its steps.

    python benchmarks/safeclip_step.py                  # CLIP hidden 256, 4 layers/tower, 64 px, batch 32, LoRA
    python benchmarks/safeclip_step.py --rounds 15 --size tiny
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from vlmsafe.safeclip import SafeCLIPTrainer, SafeCLIPTrainingConfig, clip_nce
from vlmsafe.safeclip.data import Quadruplet, QuadrupletDataset
from vlmsafe.safeclip.pooled import pooled_image, pooled_text

SIZES = {
    # hidden, layers (each tower), image size, patch
    "tiny": (64, 2, 32, 8),
    "small": (256, 4, 64, 8),
    "base": (512, 6, 96, 16),
    "deep": (256, 12, 64, 8),  # ViT-B's depth: how the pooled last block's share shrinks with depth
}


def build(size: str, batch_size: int, full_finetune: bool, threads: int):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from vlmsafe.safeclip import HFCLIPBackend
    from vlmsafe.testbed.safeclip import build_tokenizer

    torch.set_num_threads(threads)
    hidden, layers, image, patch = SIZES[size]
    tok = build_tokenizer()
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    heads = max(1, hidden // 64)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=16,
                         eos_token_id=eot, pad_token_id=0),
        vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image, patch_size=patch),
        projection_dim=hidden,
    )
    torch.manual_seed(0)
    processor = CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
    backend = HFCLIPBackend(CLIPModel(cfg), tok, processor)
    colors = ["blue", "green", "yellow", "purple", "pink", "white"]
    items = [
        Quadruplet(f"a {colors[i % 6]} circle on the left on sand", f"a {colors[i % 6]} circle on the left on sand "
                   "with blood", torch.randn(3, image, image), torch.randn(3, image, image))
        for i in range(batch_size)
    ]
    data = QuadrupletDataset(items)
    config = SafeCLIPTrainingConfig(batch_size=batch_size, eval_batch_size=batch_size, use_lora=not full_finetune,
                                    lora_dropout=0.0, progress=False, max_grad_norm=1.0)
    trainer = SafeCLIPTrainer(backend, config, data)
    trainer.module.train()
    batch = trainer.collator(items)
    batch["index"] = torch.arange(batch_size)  # item ids, as the trainer's data loader adds them
    return trainer, batch


def _step(trainer: SafeCLIPTrainer) -> None:
    torch.nn.utils.clip_grad_norm_([p for p in trainer.inner.parameters() if p.requires_grad], 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def safeclip_step(trainer: SafeCLIPTrainer, batch) -> None:
    trainer.forward_backward(batch)  # what the training loop runs per micro-batch
    _step(trainer)


def safeclip_step_uncached(trainer: SafeCLIPTrainer, batch) -> None:
    cache, trainer.frozen.cache = trainer.frozen.cache, None
    try:
        safeclip_step(trainer, batch)
    finally:
        trainer.frozen.cache = cache


def clip_step(trainer: SafeCLIPTrainer, batch) -> None:
    b, model = trainer.backend, trainer.inner
    t = b.encode_text(model, batch["safe_text"])
    v = b.encode_image(model, batch["safe_image_pixels"])
    clip_nce(t, v, 100.0).backward()
    _step(trainer)


def _pooled_pair_backward(trainer: SafeCLIPTrainer, text, pixels) -> None:
    """The plain contrastive loss of one (text, image) pair batch through the pooled passes, backpropagated."""
    b, model = trainer.backend, trainer.inner
    clip_nce(pooled_text(b, model, text), pooled_image(b, model, pixels), 100.0).backward()


def pooled_clip_step(trainer: SafeCLIPTrainer, batch) -> None:
    _pooled_pair_backward(trainer, batch["safe_text"], batch["safe_image_pixels"])
    _step(trainer)


def floor_step(trainer: SafeCLIPTrainer, batch) -> None:
    """Two pooled plain CLIP forward/backward pairs, one update: the work a cached Safe-CLIP step cannot avoid."""
    for text, pixels in (("safe_text", "safe_image_pixels"), ("unsafe_text", "unsafe_image_pixels")):
        _pooled_pair_backward(trainer, batch[text], batch[pixels])
    _step(trainer)


def precompute(trainer: SafeCLIPTrainer, batch) -> None:
    """The one-off reference computation for the batch's items (what ``train`` does before the first step)."""
    trainer.frozen.cache.filled.zero_()
    trainer.frozen.fill_cache(trainer.train_data, trainer.collator, batch_size=trainer.config.eval_batch_size,
                              device=trainer.accelerator.device)


def measure(trainer, batch, rounds: int, warmup: int) -> dict[str, list[float]]:
    kinds: list[tuple[str, Callable[[], None]]] = [
        ("clip", lambda: clip_step(trainer, batch)),
        ("pooled_clip", lambda: pooled_clip_step(trainer, batch)),
        ("floor", lambda: floor_step(trainer, batch)),
        ("in_step", lambda: safeclip_step_uncached(trainer, batch)),
        ("cached", lambda: safeclip_step(trainer, batch)),
        ("precompute", lambda: precompute(trainer, batch)),
    ]
    times: dict[str, list[float]] = {name: [] for name, _ in kinds}
    for r in range(warmup + rounds):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for name, fn in order:
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):8.2f} [{min(values):.2f}-{max(values):.2f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (each times every kind once)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full-finetune", action="store_true")
    args = parser.parse_args()

    trainer, batch = build(args.size, args.batch_size, args.full_finetune, args.threads)
    t = measure(trainer, batch, args.rounds, args.warmup)
    ratio = {k: [a / c for a, c in zip(v, t["clip"])] for k, v in t.items()}
    ratio["first_epoch"] = [(a + p) / c for a, p, c in zip(t["cached"], t["precompute"], t["clip"])]
    pooled = {k: [a / c for a, c in zip(t[k], t["pooled_clip"])] for k in ("cached", "in_step")}
    pooled["first_epoch"] = [(a + p) / c for a, p, c in zip(t["cached"], t["precompute"], t["pooled_clip"])]
    ms = {k: [1000 * x for x in v] for k, v in t.items()}
    hidden, layers, image, patch = SIZES[args.size]
    mode = "full fine-tuning" if args.full_finetune else "LoRA r=16"
    print(f"model: CLIP hidden={hidden} layers={layers}/tower image={image}px patch={patch}; batch {args.batch_size}; "
          f"{mode}; {args.threads} thread(s); {args.rounds} rounds (median [min-max])")
    rows = [
        ("plain CLIP step (peer)", "clip"),
        ("plain CLIP step, pooled last block", "pooled_clip"),
        ("floor: 2 pooled plain forward/backward, 1 update", "floor"),
        ("Safe-CLIP, reference computed in the step", "in_step"),
        ("Safe-CLIP, reference cached (every epoch)", "cached"),
        ("one-off reference computation, per batch", "precompute"),
    ]
    print(f"{'':52}{'ms':>24}  {'x plain CLIP (per round)':>26}")
    for label, key in rows:
        print(f"{label:52}{spread(ms[key]):>24}  {spread(ratio[key]):>26}")
    print(f"{'first epoch: cached step + its share of the one-off':52}{'':>24}  {spread(ratio['first_epoch']):>26}")
    print("targets: cached step <= 2.1x, first epoch <= 2.3x plain CLIP")
    print("against the plain step with the pooled last block: "
          + "; ".join(f"{k.replace('_', ' ')} {spread(v).strip()}x" for k, v in pooled.items()))


if __name__ == "__main__":
    main()
