"""Time one Safe-CLIP training step against one plain CLIP contrastive step (same model, same batch).

A Safe-CLIP step runs the trainable towers on four inputs (S, U, V, G) and the frozen reference
on two (S, V); a plain CLIP step runs the towers on (S, V). Both steps here use the same
LoRA-injected model, optimizer and batch, and include forward, backward and optimizer step.
Two Safe-CLIP timings are printed: the first epoch, where the reference embeddings are computed,
and later epochs, where the trainer reuses them (``cache_reference=True``, the default: the
reference is frozen and items are not augmented, so they cannot change). Timings alternate
between the step kinds and report medians. Target: ratio <= 2.5x.

    python benchmarks/safeclip_step.py                  # ViT-ish CLIP, 64 px, batch 32, LoRA
    python benchmarks/safeclip_step.py --full-finetune --size small --batch-size 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlmsafe.safeclip import SafeCLIPTrainer, SafeCLIPTrainingConfig, clip_nce
from vlmsafe.safeclip.data import Quadruplet, QuadrupletDataset

SIZES = {
    # hidden, layers (each tower), image size, patch
    "tiny": (64, 2, 32, 8),
    "small": (256, 4, 64, 8),
    "base": (512, 6, 96, 16),
}


def build(size: str, batch_size: int, full_finetune: bool, threads: int):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from vlmsafe.safeclip import HFCLIPBackend
    from vlmsafe.safeclip.testbed import build_tokenizer

    torch.set_num_threads(threads)
    hidden, layers, image, patch = SIZES[size]
    tok = build_tokenizer()
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), max_position_embeddings=16, eos_token_id=eot, pad_token_id=0),
        vision_config=dict(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), image_size=image, patch_size=patch),
        projection_dim=hidden,
    )
    torch.manual_seed(0)
    backend = HFCLIPBackend(CLIPModel(cfg), tok, CLIPImageProcessor(size={"shortest_edge": image}, crop_size={"height": image, "width": image}))
    colors = ["blue", "green", "yellow", "purple", "pink", "white"]
    items = [
        Quadruplet(f"a {colors[i % 6]} circle on the left on sand", f"a {colors[i % 6]} circle on the left on sand with blood", torch.randn(3, image, image), torch.randn(3, image, image))
        for i in range(batch_size)
    ]
    data = QuadrupletDataset(items)
    config = SafeCLIPTrainingConfig(batch_size=batch_size, use_lora=not full_finetune, lora_dropout=0.0, progress=False, max_grad_norm=1.0)
    trainer = SafeCLIPTrainer(backend, config, data)
    batch = trainer.collator(items)
    batch["index"] = torch.arange(batch_size)  # item ids, as the trainer's data loader adds them
    return trainer, batch


def safeclip_step(trainer: SafeCLIPTrainer, batch) -> None:
    losses = trainer.compute_losses(batch)
    losses["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for p in trainer.inner.parameters() if p.requires_grad], 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def safeclip_step_uncached(trainer: SafeCLIPTrainer, batch) -> None:
    trainer.config.cache_reference = False
    try:
        safeclip_step(trainer, batch)
    finally:
        trainer.config.cache_reference = True


def clip_step(trainer: SafeCLIPTrainer, batch) -> None:
    b, model = trainer.backend, trainer.inner
    t = b.encode_text(model, batch["safe_text"])
    v = b.encode_image(model, batch["safe_image_pixels"])
    loss = clip_nce(t, v, 100.0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--full-finetune", action="store_true")
    args = parser.parse_args()

    trainer, batch = build(args.size, args.batch_size, args.full_finetune, args.threads)
    trainer.module.train()
    steps = (("clip", clip_step), ("first", safeclip_step_uncached), ("cached", safeclip_step))
    for _ in range(args.warmup):
        for _, fn in steps:
            fn(trainer, batch)
    times: dict[str, list[float]] = {name: [] for name, _ in steps}
    for _ in range(args.steps):
        for name, fn in steps:
            t0 = time.perf_counter()
            fn(trainer, batch)
            times[name].append(time.perf_counter() - t0)
    clip_ms, first_ms, cached_ms = (1000 * statistics.median(times[k]) for k in ("clip", "first", "cached"))
    hidden, layers, image, patch = SIZES[args.size]
    mode = "full fine-tuning" if args.full_finetune else "LoRA r=16"
    print(f"model: CLIP hidden={hidden} layers={layers}/tower image={image}px patch={patch}; batch {args.batch_size}; {mode}; {args.threads} thread(s)")
    print(f"{'step':<46}{'median ms':>10}{'vs CLIP':>9}")
    print(f"{'plain CLIP contrastive':<46}{clip_ms:>10.1f}{1.0:>8.2f}x")
    print(f"{'Safe-CLIP, first epoch (reference computed)':<46}{first_ms:>10.1f}{first_ms / clip_ms:>8.2f}x")
    print(f"{'Safe-CLIP, later epochs (reference cached)':<46}{cached_ms:>10.1f}{cached_ms / clip_ms:>8.2f}x")
    print("target: <= 2.5x")


if __name__ == "__main__":
    main()
