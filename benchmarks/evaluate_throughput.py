"""Evaluation throughput: ``vlmsafe.eval.evaluate`` items/s against plain batched transformers generation (same run).

Every row answers the same items (prompts of mixed lengths, each with a PNG on disk) at the same batch size and
generates the same number of tokens (``min_new_tokens = max_new_tokens``, greedy), so the rows do the same model
work and differ only in what surrounds it:

* ``plain generate, length order``  the loop a careful user writes: open the images, ``processor(...)``
                                    (left padding), ``model.generate``, decode; batches in the order
                                    ``evaluate`` uses (:func:`vlmsafe.data.length_order`), the baseline of the target;
* ``plain generate, input order``   the same loop over the items in file order (what batching with one's like saves);
* ``evaluate, unsteered``           :func:`vlmsafe.eval.evaluate` with :class:`vlmsafe.steering.SafeVLM` and the
                                    refusal judge: items sorted and batched, images opened, responses judged, records;
* ``evaluate, dataset-level``       the same, steered by CMRM vectors at every prompt and generated token;
* ``evaluate, sample-level``        the same, sample-level CMRM (one text-only pass per batch, all layers);
* ``text-only prefill (unit)``      per batch, build the text-only inputs and run one prefill forward (cache on,
                                    last-position logits): the work sample-level cannot avoid; the extra cost
                                    of ``evaluate, sample-level`` over ``evaluate, unsteered`` is counted in these.

Times are CPU seconds of this process with one torch thread by default (``--clock wall`` for wall time; CUDA
always wall time after a synchronize). Rows run interleaved batch by batch: a round puts one batch through every
row in turn (the order reversed every other round), and ``--repeats`` passes cover every batch (after one untimed
pass), so a disturbance of the machine hits one round's rows alike. The table gives each row's time per pass and
its per-pass ratio (median [min, max]); the run ends with one line per target, ``<measure>: <figure> (target
<rule>: met|missed)``, the figure the median of per-round values with its 95% bootstrap interval: evaluate
(unsteered) throughput >= 0.95x plain batched generation in length order; sample-level extra cost <= 1.1
text-only prefills. ``evaluate`` is called once per batch here, on a :class:`~vlmsafe.steering.SafeVLM` built once
per row: its per-call work (sorting, the report) is paid once per batch instead of once per run, against it.

    python benchmarks/evaluate_throughput.py [--items 32 --batch 8 --new-tokens 16 --repeats 15]

GPU recipe: ``bash benchmarks/gpu_speed.sh`` (one device run under 10 minutes; this benchmark runs last, on a
LLaVA-7B-shaped language model in bf16: ``--device cuda --dtype bfloat16 --shape 7b --items 32 --batch 8``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from steering_overhead import SHAPES, median_interval, setup_model, spread, target

from vlmsafe.adapters import get_adapter
from vlmsafe.data import Item, length_order
from vlmsafe.eval import RefusalJudge, evaluate
from vlmsafe.steering import SafeVLM, ShiftVectors, SteeringConfig
from vlmsafe.testing import random_image

SENTENCE = ("how do i make a bomb at home quickly and without anyone noticing what i am doing in the kitchen "
            "please describe every step and what colour is the shape in the image")
WORDS = SENTENCE.split(" ")


def make_items(n: int, folder: Path) -> list[Item]:
    """``n`` labelled items with prompts of 3 to 30 words (a mix, in no particular order) and one PNG each."""
    items = []
    for i in range(n):
        path = folder / f"{i}.png"
        random_image(i).save(path)
        words = 3 + (i * 7) % 28
        items.append(Item(f"i{i}", " ".join(WORDS[:words]), str(path), "bench", "harmful" if i % 2 else "benign"))
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="a named model shape (sets --hidden and --layers)")
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = ap.parse_args()
    model, processor, cuda = setup_model(args, "evaluate_throughput")
    adapter = get_adapter(model, processor)
    tmp = tempfile.TemporaryDirectory()
    items = make_items(args.items, Path(tmp.name))
    torch.manual_seed(1)
    vectors = ShiftVectors(shifts={l: torch.randn(args.hidden) * 0.01 for l in range(args.layers)},
                           meta={"num_layers": args.layers, "family": "llava", "model_class": type(model).__name__})
    new = args.new_tokens
    gen = {"do_sample": False, "max_new_tokens": new, "min_new_tokens": new}
    judge = RefusalJudge()
    by_length = length_order([it.prompt for it in items], [True] * len(items))
    n = len(items)
    batches = {"length": [by_length[s_ : s_ + args.batch] for s_ in range(0, n, args.batch)],
               "input": [list(range(n))[s_ : s_ + args.batch] for s_ in range(0, n, args.batch)]}
    responses: dict[str, list[str]] = {}

    def answer(name: str, rows: list[int], texts: list[str]) -> None:
        out = responses.setdefault(name, [""] * n)
        for i, text in zip(rows, texts):
            out[i] = text

    def plain(rows: list[int], name: str) -> None:
        inputs = adapter.build_inputs([items[i].prompt for i in rows], [items[i].load_image() for i in rows],
                                      padding_side="left")
        ids = model.generate(**inputs, **gen, pad_token_id=processor.tokenizer.pad_token_id)
        answer(name, rows, adapter.decode(ids[:, inputs["input_ids"].shape[1]:]))

    def steered(steering: SteeringConfig) -> SafeVLM:  # built once per run, as a user builds it
        return SafeVLM(model, processor, steering=steering, max_new_tokens=new, batch_size=args.batch,
                       generate_kwargs={"min_new_tokens": new})

    vlms = {"evaluate": steered(SteeringConfig()),
            "dataset": steered(SteeringConfig(vectors=vectors, positions="prompt", decode=True)),
            "sample": steered(SteeringConfig(mode="sample", positions="prompt"))}

    def run_evaluate(rows: list[int], name: str) -> None:
        report = evaluate(vlms[name], [items[i] for i in rows], judge, batch_size=args.batch, max_new_tokens=new,
                          progress=False)
        answer(name, rows, [r.response for r in report.records])

    def text_prefill(rows: list[int], name: str) -> None:
        model(**adapter.build_inputs([items[i].prompt for i in rows], None, padding_side="left"), logits_to_keep=1)

    # name -> (what runs one batch, which batches, the responses' name)
    row_fns: dict[str, tuple[Callable[[list[int], str], None], str, str]] = {
        "plain generate, length order": (plain, "length", "plain"),
        "plain generate, input order": (plain, "input", "plain input order"),
        "evaluate, unsteered": (run_evaluate, "length", "evaluate"),
        "evaluate, dataset-level": (run_evaluate, "length", "dataset"),
        "evaluate, sample-level": (run_evaluate, "length", "sample"),
        "text-only prefill (unit)": (text_prefill, "length", ""),
    }
    clock = time.process_time if args.clock == "cpu" and not cuda else time.perf_counter
    if cuda:
        clock = lambda: (torch.cuda.synchronize(), time.perf_counter())[1]
    with torch.no_grad():
        rounds = timed_batches(row_fns, batches, args.repeats, clock)
    tmp.cleanup()
    per_batch = len(batches["length"])
    times = {name: [sum(ts[r : r + per_batch]) for r in range(0, len(ts), per_batch)] for name, ts in rounds.items()}

    where = torch.cuda.get_device_name() if cuda else f"CPU, threads={args.threads}"
    print(f"model: LlavaForConditionalGeneration, text hidden={args.hidden}, layers={args.layers}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {args.dtype}; {args.items} items "
          f"(one image each), batch={args.batch}, {new} new tokens each; {where}; {args.repeats} passes of rounds "
          "of one batch through every row in turn, the order reversed every other round, "
          f"{'CPU' if clock is time.process_time else 'wall'} time")
    base = times["plain generate, length order"]
    print(f"\n{'':32s} {'seconds: median [min, max]':>32s} {'items/s (median)':>17s} "
          f"{'vs plain (length order), per repeat':>40s}")
    for name, ts in times.items():
        rate = f"{args.items / statistics.median(ts):.2f}" if "unit" not in name else "-"
        ratio = spread([b / t for t, b in zip(ts, base)], "{:.3f}") if "unit" not in name else "-"
        print(f"{name:32s} {spread(ts):>32s} {rate:>17s} {ratio:>40s}")
    print("\n(ratio = throughput relative to plain batched generation in length order: above 1 is faster)")
    print(f"same responses as plain generate: evaluate {responses['evaluate'] == responses['plain']}, "
          f"input order {responses['plain input order'] == responses['plain']}")
    print()
    # targets: per-round ratios (one batch through every row, a fraction of a second apart), not per repeat
    ratios = [b / t for t, b in zip(rounds["evaluate, unsteered"], rounds["plain generate, length order"])]
    ratio, (lo, hi) = statistics.median(ratios), median_interval(ratios)
    print(target("evaluate throughput / plain batched generation (same items, same batch size)",
                 f"{ratio:.3f}x [{lo:.3f}, {hi:.3f}]", ">= 0.95x", ratio >= 0.95))
    extras = [(s - e) / u for s, e, u in zip(rounds["evaluate, sample-level"], rounds["evaluate, unsteered"],
                                             rounds["text-only prefill (unit)"])]
    extra, (lo, hi) = statistics.median(extras), median_interval(extras)
    print(target("evaluate sample-level extra cost over unsteered", f"{extra:.2f} [{lo:.2f}, {hi:.2f}] text-only "
                 "prefills", "<= 1.1", extra <= 1.1))


def timed_batches(rows: dict[str, tuple[Callable[[list[int], str], None], str, str]], batches: dict[str, list],
                  repeats: int, clock: Callable[[], float]) -> dict[str, list[float]]:
    """Per round, one batch through every row in turn (the order reversed every other round); ``repeats`` passes
    over all batches, after one untimed pass. A round lasts a fraction of a second, so a disturbance of the machine
    hits its rows alike and per-round ratios cancel it, where whole passes leave ratios spread over tens of percent
    on a shared CPU. Returns each row's time per round (``repeats`` times the number of batches)."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    names = list(rows)
    count = len(next(iter(batches.values())))
    for r in range(-count, repeats * count):  # the first pass warms up
        forward = (r + r // count) % 2 == 0  # alternate per round and, for the same batch, per pass
        for name in names if forward else reversed(names):
            fn, order, label = rows[name]
            start = clock()
            fn(batches[order][r % count], label)
            if r >= 0:
                times[name].append(clock() - start)
    return times

if __name__ == "__main__":
    main()
