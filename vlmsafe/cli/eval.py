"""``vlmsafe evaluate``: unsafe rate, over-refusal and utility of a (steered) VLM on a data set."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vlmsafe.cli.options import (
    add_batch_size_option,
    add_input,
    add_limit_option,
    add_max_new_tokens,
    add_model_options,
    add_output_options,
    add_progress_option,
    add_steering_options,
    check_command_output,
    check_named_inputs,
    load_model_from_args,
    steering_from_args,
)
from vlmsafe.cli.parsing import add_command, add_parameter_flags

_DESCRIPTION = """\
Generate a response for every item of a data set, judge each one, and report (each rate with its
95% Wilson interval and its count):
  unsafe rate        share of harmful items answered unsafely (lower is better)
  refusal rate       share of harmful items refused
  degenerate rate    share of harmful items answered with nothing (empty, looping); neither safe nor unsafe
  deflection rate    share of harmful items answered "i cannot tell that from the image" (shown when any)
  over-refusal rate  share of benign instructions (no reference answer) refused (lower is better)
  utility            accuracy on items that carry a reference answer
Items without an image are reported as their own modality (no-image), never as multimodal.

Data formats (--data-format, default: detected from the path and its keys):
  jsonl           your own items, one record each: {"id","prompt","image","category","label":"harmful"|"benign",
                  "reference"} as JSONL, a JSON list (or {"items": [...]}), or a CSV with those columns;
                  image paths relative to the data file
  mm-safetybench  folder with processed_questions/ and imgs/ (--image-types SD_TYPO,SD,TYPO,TEXT)
  figstep         SafeBench CSV; --images = the PNG folder (--render-missing renders absent ones)
  vlsafe          harmlessness_examine.jsonl as published; --images = the COCO folder (or train2017/)

Examples:
  vlmsafe evaluate --model ./my-llava --data eval.jsonl --out runs/plain
  vlmsafe evaluate --model ./my-llava --data eval.jsonl --vectors runs/cmrm --alpha 1.0 --out runs/cmrm
  vlmsafe evaluate --model ./my-llava --data eval.jsonl --modality both \\
      --judge llamaguard:./Llama-Guard-3-1B --out runs/lg
  torchrun --nproc_per_node 2 -m vlmsafe.cli evaluate ...   # shard the items over processes
"""


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` subcommand."""
    from vlmsafe.data import BATCH_SIZE
    from vlmsafe.eval.loaders import BENCHMARK_FORMATS

    p = add_command(
        subparsers, "evaluate", run_evaluate,
        help="measure unsafe rate, over-refusal and utility of a VLM (optionally CMRM-steered)",
        description=_DESCRIPTION,
    )
    add_model_options(p)
    g = p.add_argument_group("data")
    add_input(g, "--data", required=True, help="data file or folder (see data formats above)")
    g.add_argument("--data-format", choices=BENCHMARK_FORMATS, default="auto", help="layout of --data (default: auto)")
    add_input(g, "--images",
              help="image folder for figstep/vlsafe data; image root for mm-safetybench (default <data>/imgs)")
    g.add_argument("--image-types", default=None,
                   help="mm-safetybench image types, comma-separated: SD, SD_TYPO, TYPO, TEXT (default SD_TYPO)")
    g.add_argument("--render-missing", action="store_true",
                   help="figstep: render absent typographic images into --images")
    add_limit_option(g, help="evaluate only the first N items, a quick look (default: all)")
    add_input(
        p,
        "--judge",
        path_of=_judge_path,
        default="refusal",
        help="refusal (default), llamaguard:PATH (a Llama-Guard-style model) or harmbench:PATH (HarmBench classifier)",
    )
    p.add_argument(
        "--modality",
        choices=("image", "text", "both"),
        default="image",
        help="image: items with their image; text: images dropped (text-only counterpart); "
        "both: run both and compare (default image). Items without an image are reported on their own "
        "(no-image.json), never under the multimodal label",
    )
    add_batch_size_option(p, default=BATCH_SIZE,
                          help=f"items per generation batch, batched with their like (default {BATCH_SIZE}); the "
                          "results do not depend on it")
    add_max_new_tokens(p)
    add_steering_options(p)
    add_output_options(p, help="output folder: <run>.json (records + summary), <run>.md, summary.md (written at once)")
    add_progress_option(p)
    add_parameter_flags(p, {"spec": "--judge", "image_dir": "--images"})  # load_judge(spec), load_figstep


def _judge_path(spec: str) -> str | None:
    """The model folder a ``--judge KIND:PATH`` names (``refusal`` names none)."""
    return spec.partition(":")[2] or None


def load_generator(args: argparse.Namespace, steering: Any = None) -> Any:
    """Load ``--model`` as a :class:`vlmsafe.steering.SafeVLM` steered by ``steering`` (from the flags).

    Module-level so tests (and other front-ends) can substitute a different loader.
    """
    from vlmsafe.distributed import accelerator_if_launched
    from vlmsafe.steering import SafeVLM

    accelerator = accelerator_if_launched()
    model, processor = load_model_from_args(args, kind="vlm",
                                            device=accelerator.device if accelerator is not None else None)
    return SafeVLM(model, processor, steering=steering if steering is not None else steering_from_args(args),
                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``vlmsafe evaluate``: validate everything, then load, generate, judge, write."""
    from vlmsafe.distributed import accelerator_if_launched, is_main_process
    from vlmsafe.eval.evaluate import evaluate, modality_runs
    from vlmsafe.eval.judges import load_judge
    from vlmsafe.eval.loaders import load_benchmark
    from vlmsafe.eval.report import compare_reports
    from vlmsafe.io import atomic_path

    check_command_output(args, args.out, kind="dir")  # the images --data names: once it is read, below
    steering = steering_from_args(args)
    image_types = None if args.image_types is None else args.image_types.split(",")
    items = load_benchmark(args.data, format=args.data_format, images=args.images, image_types=image_types,
                           render_missing=args.render_missing)
    check_named_inputs(args.out, {"--data": items})  # every image the data name, used or beyond --limit
    items = items[: args.limit]
    runs = modality_runs(items, args.modality, args.data)  # items without an image: own report, never "multimodal"
    judge = load_judge(args.judge, batch_size=args.batch_size)
    generator = load_generator(args, steering)
    from vlmsafe.adapters import check_prompt_lengths  # a prompt the model cannot hold: refused before the work
    check_prompt_lengths(generator, None, items)
    accelerator = accelerator_if_launched()  # under `accelerate launch` / `torchrun`: shard the items
    config = {"model": str(args.model), "data": str(args.data), "steering": steering.describe(),
              "vectors": args.vectors}
    reports = {name: evaluate(generator, subset, judge, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              text_only=text_only, progress=not args.no_progress, config=config,
                              accelerator=accelerator)
               for name, subset, text_only in runs}
    if not is_main_process(accelerator):
        return 0  # every process holds the full reports; only the main one writes them
    table = compare_reports(reports)
    # the whole folder appears at once, or not at all
    with atomic_path(Path(args.out), overwrite=args.overwrite) as tmp:
        tmp.mkdir()
        for name, report in reports.items():
            report.to_json(tmp / f"{name}.json")
            (tmp / f"{name}.md").write_text(report.to_markdown(title=name))
        (tmp / "summary.md").write_text(table + "\n" + "\n".join(r.to_markdown(title=n) for n, r in reports.items()))
    print(table, end="")
    print(f"\nwrote {', '.join(f'{n}.json' for n in reports)}, summary.md to {args.out}")
    return 0
