"""Steering overhead: plain ``generate`` vs CMRM dataset-level, sample-level, and steering-vectors (same run).

Rows, run interleaved (each repeat runs every row once, so drift hits all rows alike):

* ``plain generate``                    the baseline;
* ``no-op hooks (floor)``               one empty forward hook per steered layer plus one entry pre-hook:
                                        what any hook-based steering pays before doing any arithmetic;
* ``vlmsafe dataset-level``             :func:`vlmsafe.steering.steer`, every prompt and generated token;
* ``... compiled path, eager``          the same with ``static=True`` (:mod:`vlmsafe.activations.compiled`:
                                        masks fixed per ``generate`` call, one tensor-only hook per layer),
                                        not compiled: what that path costs where compilation is off;
* ``steering-vectors``                  the same vectors at the same positions with ``SteeringVector.apply``;
* ``vlmsafe sample-level``              ``SteeringConfig(mode="sample")``: text-only pass + steered generate;
* ``text-only prefill (unit)``          build the text-only inputs and run one prefill forward over them
                                        (cache on, last-position logits, as ``generate`` does): the work a
                                        sample-level implementation cannot avoid; its floor is 1.0 of these.

A third block measures ShiftDC (``SteeringConfig(mode="shiftdc")``, middle-to-last layers): with the
captions given, its extra cost is one text-only pass over the captioned counterparts (``running`` shift)
plus, as published (``unsteered`` shift), one multimodal pass; without them the model first writes a
caption per image (``--caption-tokens``, ShiftDC's code allows 128), which dominates. ``caption
generation (unit)`` is that step alone.

A compiled block (``--compiled``, default on) runs ``generate`` with a static cache and the decode step
compiled by transformers (``CompileConfig(fullgraph=True)``: a graph break would raise; inductor,
``mode="reduce-overhead"`` (CUDA graphs) on CUDA): plain against dataset-level steering on the compiled
path, with the same tokens as the hook path checked. Compilation happens in the warm-up round (minutes
on a CPU the first time; inductor caches it on disk).

A decode-step block (``--decode-rounds``, default 300) times one decode step (a one-token forward on a static cache
holding the prompt) plain, under the no-op hooks and under dataset-level steering, in rounds of a fraction of a second
(:func:`decode_step_times`): every generated token pays exactly this, and short rounds cancel the disturbances that
spread whole ``generate`` calls over tens of percent on a shared CPU, so the CPU target (within half a point of the
floor) is judged here; the whole-call figure is printed beside it.

The sample-level rows run in a second block with short generations (``--sample-new-tokens``): its
decode steps run without layer hooks (prompt-only steering detaches them after the prompt), so its
extra cost does not grow with length, and a short generation keeps the subtraction
``sample-level - plain`` well above the timing noise. The first block reports it at full length too.

Times are CPU seconds of this process (``time.process_time``) with one torch thread by default: on a
machine whose cores are shared, wall time also counts the time spent waiting for a core, which swamps a
2% effect. ``--clock wall`` measures wall time instead. Overheads are per-repeat ratios (row / plain of
the same repeat): median [min, max], and the ratio of the fastest repeats (the least disturbed by other
processes).

    python benchmarks/steering_overhead.py [--hidden 512 --layers 8 --batch 4 --new-tokens 32 --repeats 41]

GPU recipe: ``bash benchmarks/gpu_speed.sh`` (one device run under 10 minutes: this benchmark at batch 1 and 8
on a LLaVA-7B-shaped language model in bf16, ``--shape 7b``, then ``evaluate_throughput.py``).

steering-vectors 0.12.2 declares ``transformers<5`` in its metadata but works with transformers 5; install it
without dependencies to get its row: ``pip install --no-deps steering-vectors==0.12.2``.

The run ends with one line per target, ``<measure>: <figure> (target <rule>: met|missed)``, figures being
medians of per-repeat values with their 95% bootstrap interval. The blocks of whole ``generate`` calls (the first, the
compiled and the short sample-level block) run ``--repeats`` (41) times, so their medians hold to within a few points
on a shared CPU; the ShiftDC block, which has no target, runs ``--shiftdc-repeats`` (9). Rows run in turn, the order
reversed every other repeat.
CPU: dataset-level overhead within 0.5 points of the no-op-hook floor, per decode step; sample-level extra cost
(sample-level minus plain) <= 1.1 text-only prefills. CUDA: dataset-level overhead <= 1% (eager, hooks; run at batch 1
and 8) and compiled dataset-level <= 1% over plain compiled generation.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from vlmsafe.adapters import get_adapter
from vlmsafe.steering import SafetyDirections, ShiftVectors, SteeringConfig, generate_captions, steer
from vlmsafe.testing import random_image, tiny_llava

#: ``--shape``: (text hidden size, layers). ``7b``: LLaVA-1.5-7B's language model (its MLP width is hidden * 3 here).
SHAPES = {"7b": (4096, 32)}


def target(measure: str, figure: str, rule: str, met: bool) -> str:
    """One target line, as every benchmark ends: ``<measure>: <figure> (target <rule>: met|missed)``."""
    return f"{measure}: {figure} (target {rule}: {'met' if met else 'missed'})"


def compile_config(cuda: bool) -> Any:
    """transformers' decode-step compilation: whole graph or an error; CUDA graphs on CUDA."""
    from transformers import CompileConfig

    cc = CompileConfig(fullgraph=True, mode="reduce-overhead" if cuda else None)
    cc._compile_all_devices = True  # transformers compiles on accelerators only unless told
    return cc


def build(hidden: int, layers: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """A random LLaVA with a wider language model (the vision tower stays tiny), built on ``device``."""
    from transformers import LlavaForConditionalGeneration

    model, processor = tiny_llava(seed=0, num_layers=layers)
    cfg = model.config
    cfg.text_config.hidden_size = hidden
    cfg.text_config.intermediate_size = hidden * 3
    cfg.text_config.num_attention_heads = max(4, hidden // 64)
    cfg.text_config.num_key_value_heads = cfg.text_config.num_attention_heads
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 7B-shaped model is built in seconds on a GPU
        model = LlavaForConditionalGeneration(cfg)
    return model.to(dtype).eval(), processor


@contextlib.contextmanager
def noop_hooks(adapter, layers):
    handles = [adapter.entry_module.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)]
    handles += [adapter.layers[l].register_forward_hook(lambda m, a, o: None) for l in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def decode_step_times(model, adapter, inputs, vectors, layers, rounds: int, steps: int,
                      clock: Callable[[], float]) -> dict[str, list[float]]:
    """Per-token cost, measured where it arises: one decode step (a one-token forward on a static cache filled
    with the prompt, rewriting the same slot every time, so every step does the same work), plain, under the
    no-op hooks and under dataset-level steering (hook path, after the prompt declared as ``generate`` does).

    Each round opens each row's context, runs one untimed step (steering attaches its layer hooks at its first
    call, as at a prompt), then times ``steps`` steps; rows run in turn, the order reversed every other round,
    and a row's time is its mean step. Rounds last a fraction of a second, so a disturbance of the machine hits
    the rows of one round alike and the per-round ratios cancel it, where whole ``generate`` calls of a second
    each leave per-repeat ratios spread over tens of percent on a shared CPU. Only the forward call is timed; the
    cache is rewound between steps, outside the timing."""
    from transformers import StaticCache

    from vlmsafe.activations import declare_prompt

    P = inputs["input_ids"].shape[1]
    cache = StaticCache(config=model.config, max_cache_len=P + 4)
    model(**inputs, cache=cache, use_cache=True)
    step = dict(input_ids=inputs["input_ids"][:, -1:],
                attention_mask=torch.cat([inputs["attention_mask"], inputs["attention_mask"][:, -1:]], 1),
                position_ids=inputs["attention_mask"].sum(1, keepdim=True), cache=cache, use_cache=True)

    filled = [layer.cumulative_length.clone() for layer in cache.layers]

    def rewind() -> None:  # the next step writes the same slot again, attending over the same prompt
        for layer, length in zip(cache.layers, filled):
            layer.cumulative_length.copy_(length)

    def one_step() -> None:
        model(**step)

    @contextlib.contextmanager
    def steered():
        with steer(model, vectors, alpha=1.0, positions="prompt", decode=True, static=False) as handle, \
                declare_prompt(model, inputs["input_ids"], inputs["attention_mask"]):
            yield handle

    contexts: dict[str, Callable[[], Any]] = {
        "plain decode step": contextlib.nullcontext,
        "no-op hooks (floor)": lambda: noop_hooks(adapter, layers),
        "vlmsafe dataset-level": steered,
    }
    logits = {}
    for name in ("plain decode step", "vlmsafe dataset-level"):  # the steered step does edit (a no-op would be fast)
        with contexts[name]():
            logits[name] = model(**step).logits
            rewind()
    print(f"decode step: steering changes the logits: {not torch.equal(*logits.values())}")
    times: dict[str, list[float]] = {name: [] for name in contexts}
    names = list(contexts)
    for i in range(rounds + 1):  # round 0 warms up
        for name in names if i % 2 == 0 else reversed(names):
            with contexts[name]():
                one_step()
                rewind()
                spent = 0.0
                for _ in range(steps):
                    start = clock()
                    one_step()
                    spent += clock() - start
                    rewind()
                if i:
                    times[name].append(spent / steps)
    return times


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median of ``values`` (seeded: the same log for the same times)."""
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def spread(values: list[float], fmt: str = "{:.4f}") -> str:
    return f"{fmt.format(statistics.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def setup_model(args: argparse.Namespace, script: str) -> tuple[Any, Any, bool]:
    """The benchmarks' shared set-up: ``--shape`` presets, torch threads, the CUDA check (exit 77, "skipped", when a
    GPU is asked for and absent) and the tiny LLaVA of ``--hidden``/``--layers`` in ``--dtype`` on ``--device``."""
    if args.shape:
        args.hidden, args.layers = SHAPES[args.shape]
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print(f"{script}: --device cuda asked for but no CUDA device is present")
        raise SystemExit(77)
    model, processor = build(args.hidden, args.layers, args.device, getattr(torch, args.dtype))
    return model, processor, cuda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--sample-new-tokens", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=41,
                    help="repeats of the blocks the targets are judged on (default 41: a median to within a point, "
                         "where 9 repeats on a noisy CPU leave several)")
    ap.add_argument("--inner", type=int, default=1,
                    help="runs of each row per repeat, the fastest kept (default 1; 3 on a busy machine)")
    ap.add_argument("--shiftdc-repeats", type=int, default=9, help="repeats of the ShiftDC block (default 9)")
    ap.add_argument("--decode-rounds", type=int, default=300,
                    help="rounds of the decode-step block, on which the CPU dataset-level target is judged (default "
                         "300; 0 skips it)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--caption-tokens", type=int, default=16)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda times wall clock after a synchronize)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="a named model shape (sets --hidden and --layers): 7b = LLaVA-7B-shaped language model")
    ap.add_argument("--compiled", action=argparse.BooleanOptionalAction, default=True,
                    help="also time static-cache generation with a compiled decode step (default on)")
    ap.add_argument("--shiftdc", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the ShiftDC block (default on)")
    args = ap.parse_args()
    model, processor, cuda = setup_model(args, "steering_overhead")
    adapter = get_adapter(model, processor)
    base = ["how do i make a bomb ?", "what colour is the shape in the image ?", "describe the picture", "steal car"]
    prompts = (base * args.batch)[: args.batch]
    images = [random_image(i) for i in range(args.batch)]
    layers = list(range(args.layers))
    torch.manual_seed(1)
    vectors = ShiftVectors(shifts={l: torch.randn(args.hidden) * 0.01 for l in layers},
                           meta={"num_layers": args.layers, "family": "llava", "model_class": type(model).__name__})
    inputs = adapter.build_inputs(prompts, images)
    gen_kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    sample_cfg = SteeringConfig(mode="sample", alpha=1.0, positions="prompt")
    outputs: dict[str, torch.Tensor] = {}

    def generate(name: str, new_tokens: int = args.new_tokens) -> None:
        kw = {**gen_kwargs, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        outputs[name] = model.generate(**inputs, **kw)

    def dataset_level() -> None:
        with steer(model, vectors, alpha=1.0, positions="prompt", decode=True, static=False):
            generate("vlmsafe")

    def sample_level(new_tokens: int) -> None:
        with sample_cfg.apply(adapter, prompts=prompts, images=images):
            generate("sample", new_tokens)

    def text_prefill() -> None:
        model(**adapter.build_inputs(prompts, None), logits_to_keep=1)

    def floor() -> None:
        with noop_hooks(adapter, layers):
            generate("floor")

    def dataset_static() -> None:
        with steer(model, vectors, alpha=1.0, positions="prompt", decode=True, static=True):
            generate("static")

    rows: dict[str, Callable[[], None]] = {
        "plain generate": lambda: generate("plain"),
        "no-op hooks (floor)": floor,
        "vlmsafe dataset-level (all tokens)": dataset_level,
        "... compiled path, eager (all tokens)": dataset_static,
    }
    static_kw = {"cache_implementation": "static", "compile_config": compile_config(cuda)}

    def compiled(name: str, steered: bool) -> None:
        ctx = steer(model, vectors, alpha=1.0, positions="prompt", decode=True, static=True) if steered else \
            contextlib.nullcontext()
        with ctx:
            outputs[name] = model.generate(**inputs, **gen_kwargs, **static_kw)

    compiled_rows: dict[str, Callable[[], None]] = {
        "plain generate, compiled": lambda: compiled("plain compiled", False),
        "vlmsafe dataset-level, compiled": lambda: compiled("compiled", True),
    } if args.compiled else {}
    peer_note = None
    try:
        from steering_vectors import SteeringVector

        sv = SteeringVector({l: v for l, v in vectors.shifts.items()}, layer_type="decoder_block")
        layer_config = {"decoder_block": "model.language_model.layers.{num}"}

        def peer() -> None:
            with sv.apply(model, layer_config=layer_config, multiplier=-1.0):
                generate("peer")

        rows["steering-vectors 0.12 (all tokens)"] = peer
    except ImportError:
        peer_note = ("steering-vectors is not installed, so it has no row: its metadata pins transformers<5 although "
                     "it works with transformers 5; `pip install --no-deps steering-vectors==0.12.2` adds it.")
    rows["vlmsafe sample-level (prompt tokens)"] = lambda: sample_level(args.new_tokens)
    rows["text-only prefill (unit)"] = text_prefill
    short = args.sample_new_tokens
    short_rows: dict[str, Callable[[], None]] = {
        f"plain generate, {short} tokens": lambda: generate("plain short", short),
        f"vlmsafe sample-level, {short} tokens": lambda: sample_level(short),
        "text-only prefill (unit)": text_prefill,
    }

    directions = SafetyDirections(
        directions={l: torch.randn(args.hidden) for l in layers},
        meta={"method": "shiftdc", "num_layers": args.layers, "family": "llava", "model_class": type(model).__name__,
              "caption_prompt": "describe the picture", "caption_tokens": args.caption_tokens})
    captions = ["red circle", "blue square", "two green triangles", "the word cat"][: args.batch]
    captions = (captions * args.batch)[: args.batch]

    def shiftdc(shift_from: str, given: list[str] | None) -> None:
        cfg = SteeringConfig(directions=directions, alpha=1.0, shift_from=shift_from)
        with cfg.apply(adapter, prompts=prompts, images=images, captions=given):
            generate("shiftdc")

    shiftdc_rows: dict[str, Callable[[], None]] = {
        "plain generate": lambda: generate("plain"),
        "ShiftDC running shift, captions given": lambda: shiftdc("running", captions),
        "ShiftDC as published, captions given": lambda: shiftdc("unsteered", captions),
        f"ShiftDC as published, {args.caption_tokens}-token captions": lambda: shiftdc("unsteered", None),
        "caption generation (unit)": lambda: generate_captions(adapter, None, prompts, images,
                                                               instruction="describe the picture",
                                                               max_new_tokens=args.caption_tokens),
        "text-only prefill (unit)": text_prefill,
    }

    clock = time.process_time if args.clock == "cpu" and not cuda else time.perf_counter
    if cuda:  # kernels run asynchronously: a row ends when the GPU has finished its work
        clock = lambda: (torch.cuda.synchronize(), time.perf_counter())[1]
    with torch.no_grad():
        times = timed(rows, args.repeats, clock, args.inner)
        compiled_times = timed(compiled_rows, args.repeats, clock, args.inner) if compiled_rows else {}
        short_times = timed(short_rows, args.repeats, clock, args.inner)
        step_times = decode_step_times(model, adapter, inputs, vectors, layers, args.decode_rounds, 4, clock) \
            if args.decode_rounds else {}
        shiftdc_times = timed(shiftdc_rows, args.shiftdc_repeats, clock, args.inner) if args.shiftdc else {}

    where = torch.cuda.get_device_name() if cuda else f"CPU, threads={args.threads}"
    inner = f" (the fastest of {args.inner} runs each)" if args.inner > 1 else ""
    print(f"model: LlavaForConditionalGeneration, text hidden={args.hidden}, layers={args.layers} (all steered), "
          f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, {args.dtype}; batch={args.batch}; "
          f"{where}; {args.repeats} interleaved repeats{inner}, order reversed every other one "
          f"({args.shiftdc_repeats} for ShiftDC), {'CPU' if clock is time.process_time else 'wall'} "
          "time; targets: median [95% bootstrap interval of the median] over repeats")
    blocks = ((f"{args.new_tokens} new tokens", times),
              (f"decode step ({args.decode_rounds} rounds of 4)", step_times),
              (f"{args.new_tokens} new tokens, static cache, compiled", compiled_times),
              (f"{short} new tokens", short_times), (f"ShiftDC, {args.new_tokens} new tokens", shiftdc_times))
    for title, block in blocks:
        if not block:
            continue
        plain = next(ts for name, ts in block.items() if name.startswith("plain"))
        head = f"{'seconds: median [min, max]':>32s} {'vs plain, per repeat: median [min, max]':>42s}"
        print(f"\n{title:40s} {head}")
        for name, ts in block.items():
            ratio = spread([t / p for t, p in zip(ts, plain)], "{:.3f}") if "unit" not in name else "-"
            print(f"{name:40s} {spread(ts):>32s} {ratio:>42s}")
    print()
    plain = times["plain generate"]
    for name in ("no-op hooks (floor)", "vlmsafe dataset-level (all tokens)", "... compiled path, eager (all tokens)",
                 "steering-vectors 0.12 (all tokens)"):
        if name in times:
            over = [100 * (t / p - 1) for t, p in zip(times[name], plain)]
            best = 100 * (min(times[name]) / min(plain) - 1)
            print(f"{name} overhead on generate: per repeat {spread(over, '{:+.2f}')} %, fastest vs fastest "
                  f"{best:+.2f} %")
    if "steering-vectors 0.12 (all tokens)" in times:
        ours, theirs = times["vlmsafe dataset-level (all tokens)"], times["steering-vectors 0.12 (all tokens)"]
        mine = [a / b for a, b in zip(ours, theirs)]
        print(f"vlmsafe / steering-vectors time: per repeat {spread(mine, '{:.3f}')}, fastest vs fastest "
              f"{min(ours) / min(theirs):.3f} (same tokens: {torch.equal(outputs['vlmsafe'], outputs['peer'])})")
    for label, block, name, base in (
        (f"{args.new_tokens} tokens", times, "vlmsafe sample-level (prompt tokens)", "plain generate"),
        (f"{short} tokens", short_times, f"vlmsafe sample-level, {short} tokens", f"plain generate, {short} tokens"),
    ):
        unit = block["text-only prefill (unit)"]
        extra = [(s - p) / u for s, p, u in zip(block[name], block[base], unit)]
        best = (min(block[name]) - min(block[base])) / min(unit)
        print(f"sample-level extra cost ({label}): per repeat {spread(extra, '{:.2f}')}, fastest vs fastest "
              f"{best:.2f} text-only prefills (floor 1.0)")
    if shiftdc_times:
        unit, caption = shiftdc_times["text-only prefill (unit)"], shiftdc_times["caption generation (unit)"]
        for name in list(shiftdc_times)[1:4]:
            extra = [s_ - p for s_, p in zip(shiftdc_times[name], shiftdc_times["plain generate"])]
            print(f"{name} extra cost: per repeat {spread([e / u for e, u in zip(extra, unit)], '{:.2f}')} text-only "
                  f"prefills = {spread([e / c for e, c in zip(extra, caption)], '{:.2f}')} caption generations")
    same = {name: torch.equal(outputs[name], outputs["vlmsafe"]) for name in ("static", "compiled") if name in outputs}
    print(f"same tokens as the hook path: {same}")
    if "plain compiled" in outputs:  # inductor's fused kernels round differently: compare like with like
        plain_same = torch.equal(outputs["plain compiled"], outputs["plain"])
        print(f"plain compiled generate gives the same tokens as plain eager generate: {plain_same}"
              + ("" if plain_same else " (so compiled and eager tokens cannot be compared bit for bit here; "
                 "tests/test_steering_compiled.py compares them with the eager backend)"))
    if peer_note:
        print(peer_note)
    print()
    over = {name: [100 * (t / p - 1) for t, p in zip(ts, plain)] for name, ts in times.items()}
    dataset = statistics.median(over["vlmsafe dataset-level (all tokens)"])
    if cuda:
        print(target(f"dataset-level overhead, eager, batch {args.batch}", f"{dataset:+.2f}%", "<= 1%", dataset <= 1))
    else:
        # dataset-level against the floor row it runs next to in every repeat (not each against plain: that adds
        # plain's own noise, at another moment, to both)
        diffs = [100 * (d / f - 1) for d, f in zip(times["vlmsafe dataset-level (all tokens)"],
                                                   times["no-op hooks (floor)"])]
        above, (lo, hi) = statistics.median(diffs), median_interval(diffs)
        figure = f"{above:+.2f} points [{lo:+.2f}, {hi:+.2f}] (dataset-level {dataset:+.2f}%)"
        if step_times:  # the per-step block judges the target: whole calls are too noisy for half a point
            print(f"dataset-level overhead above the no-op-hook floor, whole generate calls: {figure}")
        else:
            print(target("dataset-level overhead above the no-op-hook floor", figure, "<= 0.5 points", above <= 0.5))
    if step_times:
        steps = step_times["plain decode step"]
        floor_pct = [100 * (f / p - 1) for f, p in zip(step_times["no-op hooks (floor)"], steps)]
        ours_pct = [100 * (d / p - 1) for d, p in zip(step_times["vlmsafe dataset-level"], steps)]
        above_pct = [100 * (d / f - 1) for d, f in zip(step_times["vlmsafe dataset-level"],
                                                       step_times["no-op hooks (floor)"])]
        above, (lo, hi) = statistics.median(above_pct), median_interval(above_pct)
        figure = (f"{above:+.2f} points [{lo:+.2f}, {hi:+.2f}] (dataset-level {statistics.median(ours_pct):+.2f}%, "
                  f"floor {statistics.median(floor_pct):+.2f}% over a {1000 * statistics.median(steps):.2f} ms step)")
        measure = "dataset-level overhead above the no-op-hook floor, per decode step"
        # the CPU target; on CUDA the targets are whole calls against plain generation, this line explains them
        print(f"{measure}: {figure}" if cuda else target(measure, figure, "<= 0.5 points", above <= 0.5))
    if compiled_times:
        ratio = [100 * (s_ / p - 1) for s_, p in zip(compiled_times["vlmsafe dataset-level, compiled"],
                                                     compiled_times["plain generate, compiled"])]
        cost, (lo, hi) = statistics.median(ratio), median_interval(ratio)
        print(target("compiled dataset-level overhead on plain compiled generate",
                     f"{cost:+.2f}% [{lo:+.2f}, {hi:+.2f}] (fullgraph)", "<= 1%", cost <= 1))
    unit = short_times["text-only prefill (unit)"]
    extras = [(s_ - p) / u for s_, p, u in zip(short_times[f"vlmsafe sample-level, {short} tokens"],
                                              short_times[f"plain generate, {short} tokens"], unit)]
    extra, (lo, hi) = statistics.median(extras), median_interval(extras)
    print(target(f"sample-level extra cost ({short} new tokens)", f"{extra:.2f} [{lo:.2f}, {hi:.2f}] text-only "
                 "prefills", "<= 1.1", extra <= 1.1))


def timed(rows: dict[str, Callable[[], None]], repeats: int, clock: Callable[[], float],
          inner: int = 1) -> dict[str, list[float]]:
    """Run every row once as a warm-up, then ``repeats`` rounds of every row in turn, the order reversed every other
    round: a row that always ran right after the same other row would carry that position's effect (a warm cache,
    an allocator state) into its ratio; alternating the order cancels it in the per-repeat ratios. With ``inner``
    above 1 a row runs that many times in a row and the round keeps its fastest time (``timeit``'s rule: other
    processes only ever slow a run down, so the fastest of a few is the least disturbed)."""
    times: dict[str, list[float]] = {name: [] for name in rows}
    for fn in rows.values():
        fn()
    names = list(rows)
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            best = float("inf")
            for _ in range(inner):
                start = clock()
                rows[name]()
                best = min(best, clock() - start)
            times[name].append(best)
    return times

if __name__ == "__main__":
    main()
