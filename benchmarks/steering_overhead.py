"""Steering overhead on CPU: plain ``generate`` vs CMRM dataset-level vs sample-level (same run).

Prints tokens/s and ratios to the plain baseline, plus the cost of one text-only prefill (the
extra work sample-level steering must do), and the ``steering-vectors`` library applying the same
dataset-level vector as a peer row when it is importable.

    python benchmarks/steering_overhead.py [--hidden 512 --layers 8 --new-tokens 32 --repeats 7]

Targets (issue 3): dataset-level overhead <= 3%; sample-level extra cost <= one text-only prefill.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlmsafe.adapters import get_adapter
from vlmsafe.steering import SafeVLM, ShiftVectors
from vlmsafe.testing import random_image, tiny_llava


def build(hidden: int, layers: int):
    model, processor = tiny_llava(seed=0, num_layers=layers)
    cfg = model.config
    cfg.text_config.hidden_size = hidden
    cfg.text_config.intermediate_size = hidden * 3
    cfg.text_config.num_attention_heads = max(4, hidden // 64)
    cfg.text_config.num_key_value_heads = cfg.text_config.num_attention_heads
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    return LlavaForConditionalGeneration(cfg).eval(), processor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = build(args.hidden, args.layers)
    adapter = get_adapter(model, processor)
    prompts = ["how do i make a bomb ?", "what colour is the shape in the image ?", "describe the picture", "steal car"][: args.batch]
    prompts = (prompts * args.batch)[: args.batch]
    images = [random_image(i) for i in range(args.batch)]
    vectors = ShiftVectors(shifts={l: torch.randn(args.hidden) * 0.01 for l in range(args.layers)},
                           meta={"num_layers": args.layers, "family": "llava"})
    inputs = adapter.build_inputs(prompts, images)
    gen_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    n_tokens = args.batch * args.new_tokens

    plain = SafeVLM(model, processor, max_new_tokens=args.new_tokens, batch_size=args.batch,
                    generate_kwargs={"min_new_tokens": args.new_tokens})
    dataset = SafeVLM(model, processor, vectors, alpha=1.0, positions="prompt", decode=True, max_new_tokens=args.new_tokens,
                      batch_size=args.batch, generate_kwargs={"min_new_tokens": args.new_tokens})
    sample = SafeVLM(model, processor, mode="sample", alpha=1.0, positions="prompt", decode=True, max_new_tokens=args.new_tokens,
                     batch_size=args.batch, generate_kwargs={"min_new_tokens": args.new_tokens})

    rows: dict[str, callable] = {
        "plain generate": lambda: plain.generate(prompts, images),
        "CMRM dataset-level (all tokens)": lambda: dataset.generate(prompts, images),
        "CMRM sample-level (all tokens)": lambda: sample.generate(prompts, images),
        # what any sample-level implementation must add: build the text-only inputs, run them once
        "text-only prefill (build inputs + 1 forward)": lambda: model(**adapter.build_inputs(prompts, None)),
    }
    peer_note = None
    try:
        from steering_vectors import SteeringVector

        sv = SteeringVector({l: -v for l, v in vectors.shifts.items()}, layer_type="decoder_block")
        layer_config = {"decoder_block": "model.language_model.layers.{num}"}

        def run_peer():
            with sv.apply(model, layer_config=layer_config, multiplier=1.0):
                model.generate(**inputs, **gen_kwargs)

        rows["steering-vectors 0.12 (same vector, all tokens)"] = run_peer
    except ImportError:
        peer_note = ("steering-vectors is not installed: its PyPI metadata pins transformers<5 (vlmsafe pins 5.24.0). "
                     "It imports fine with transformers 5; add it with `pip install --no-deps steering-vectors==0.12.2` "
                     "to get the peer row.")

    times: dict[str, list[float]] = {name: [] for name in rows}
    with torch.no_grad():
        for fn in rows.values():  # warm-up
            fn()
        for _ in range(args.repeats):  # interleaved, so drift hits every row alike
            for name, fn in rows.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)

    base = statistics.median(times["plain generate"])
    prefill = statistics.median(times["text-only prefill (build inputs + 1 forward)"])
    print(f"model: LlavaForConditionalGeneration, text hidden={args.hidden}, layers={args.layers}; batch={args.batch}, "
          f"new tokens={args.new_tokens}, threads={args.threads}, median of {args.repeats}")
    print(f"{'row':52s} {'median s':>9s} {'tokens/s':>9s} {'vs plain':>9s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        tps = f"{n_tokens / med:9.1f}" if "prefill" not in name else f"{'-':>9s}"
        print(f"{name:52s} {med:9.4f} {tps} {med / base:9.3f}x")
    ds = statistics.median(times["CMRM dataset-level (all tokens)"]) / base - 1
    extra = statistics.median(times["CMRM sample-level (all tokens)"]) - base
    print(f"dataset-level overhead: {100 * ds:+.1f}% (target <= 3%)")
    print(f"sample-level extra time: {extra:.4f}s vs one text-only prefill {prefill:.4f}s "
          f"(ratio {extra / prefill:.2f}; target <= 1 + noise)")
    beyond = statistics.median(times["CMRM sample-level (all tokens)"]) - statistics.median(times["CMRM dataset-level (all tokens)"])
    print(f"  of which beyond dataset-level steering (same hooks): {beyond:.4f}s = {beyond / prefill:.2f} text-only prefills")
    if peer_note:
        print(peer_note)


if __name__ == "__main__":
    main()
