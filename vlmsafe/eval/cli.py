"""``vlmsafe evaluate``: unsafe rate, over-refusal and utility of a (steered) VLM on a data set."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from vlmsafe.errors import InputError, VlmsafeError
from vlmsafe.data import Item as EvalItem
from vlmsafe.data import load_items
from vlmsafe.eval.evaluate import Generator, evaluate
from vlmsafe.eval.judges import load_judge
from vlmsafe.eval.loaders import load_figstep, load_mm_safetybench, load_vlsafe
from vlmsafe.eval.report import EvalReport, compare_reports
from vlmsafe.io import atomic_path, check_output

DATA_FORMATS = ("auto", "jsonl", "mm-safetybench", "figstep", "vlsafe")

_DESCRIPTION = """\
Generate a response for every item of a data set, judge each one, and report:
  unsafe rate        share of harmful items answered unsafely (lower is better)
  refusal rate       share of harmful items refused
  over-refusal rate  share of benign items refused (lower is better)
  utility            accuracy on items that carry a reference answer

Data formats (--data-format, default: guessed from the path):
  jsonl           vlmsafe JSONL: {"id","prompt","image","category","label":"harmful"|"benign","reference"}
  mm-safetybench  folder with processed_questions/ and imgs/ (--image-types SD_TYPO,SD,TYPO,TEXT)
  figstep         SafeBench CSV; --images = the PNG folder (--render-missing renders absent ones)
  vlsafe          VLSafe JSONL; --images = the COCO image folder

Examples:
  vlmsafe evaluate --model ./my-llava --data eval.jsonl --out runs/plain
  vlmsafe evaluate --model ./my-llava --data eval.jsonl --vectors runs/cmrm --alpha 1.0 --out runs/cmrm
  vlmsafe evaluate --model ./my-llava --data eval.jsonl --modality both --judge llamaguard:./Llama-Guard-3-1B --out runs/lg
"""


def register(subparsers: Any) -> None:
    """Add the ``evaluate`` subcommand."""
    p = subparsers.add_parser(
        "evaluate",
        help="measure unsafe rate, over-refusal and utility of a VLM (optionally CMRM-steered)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="folder of a saved VLM (e.g. a LLaVA checkpoint)")
    p.add_argument("--data", required=True, help="data file or folder (see data formats above)")
    p.add_argument("--data-format", choices=DATA_FORMATS, default="auto", help="layout of --data (default: auto)")
    p.add_argument("--images", help="image folder for figstep/vlsafe data; image root for mm-safetybench (default <data>/imgs)")
    p.add_argument("--image-types", default="SD_TYPO", help="mm-safetybench image types, comma-separated: SD, SD_TYPO, TYPO, TEXT (default SD_TYPO)")
    p.add_argument("--render-missing", action="store_true", help="figstep: render absent typographic images into --images")
    p.add_argument("--limit", type=int, help="evaluate only the first N items (a quick look)")
    p.add_argument(
        "--judge",
        default="refusal",
        help="refusal (keyword list, default), llamaguard:PATH (a Llama-Guard-style model) or harmbench:PATH (HarmBench classifier)",
    )
    steer = p.add_mutually_exclusive_group()
    steer.add_argument("--vectors", help="folder of CMRM shift vectors from `vlmsafe calibrate` (dataset-level steering)")
    steer.add_argument("--sample-level", action="store_true", help="sample-level CMRM: shift computed per input from its text-only counterpart")
    p.add_argument("--alpha", type=float, default=None, help="steering strength (default 1.0; needs --vectors or --sample-level)")
    p.add_argument(
        "--modality",
        choices=("image", "text", "both"),
        default="image",
        help="image: items as given; text: images dropped (text-only counterpart); both: run both and compare (default image)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="items per generation batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="generation budget per response (default 64)")
    p.add_argument("--out", required=True, help="output folder: <run>.json (records + summary), <run>.md, summary.md")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_evaluate)


def load_data(args: argparse.Namespace) -> list[EvalItem]:
    """Load the items named by ``--data`` / ``--data-format``."""
    fmt = args.data_format
    data = Path(args.data)
    if fmt == "auto":
        fmt = "mm-safetybench" if data.is_dir() else "figstep" if data.suffix.lower() == ".csv" else "jsonl"
    if fmt == "jsonl":
        items = load_items(data)
    elif fmt == "mm-safetybench":
        types = [t.strip().upper() for t in args.image_types.split(",") if t.strip()]
        try:
            items = load_mm_safetybench(data, image_types=types, image_root=args.images)
        except ValueError as exc:
            if isinstance(exc, VlmsafeError):
                raise
            raise InputError(f"--image-types: {exc}") from exc
    elif fmt == "figstep":
        if not args.images:
            raise InputError("figstep data needs --images (the folder of query_*_6.png images, or where to render them).")
        items = load_figstep(data, args.images, render_missing=args.render_missing)
    else:
        if not args.images:
            raise InputError("vlsafe data needs --images (the COCO image folder).")
        items = load_vlsafe(data, args.images)
    if args.limit is not None:
        if args.limit < 1:
            raise InputError("--limit must be >= 1.")
        items = items[: args.limit]
    return items


def load_generator(args: argparse.Namespace) -> Generator:
    """Load ``--model`` as a :class:`vlmsafe.steering.SafeVLM`, steered as the flags ask.

    Module-level so tests (and other front-ends) can substitute a different loader.
    """
    try:
        from vlmsafe.steering import SafeVLM, ShiftVectors
    except ImportError as exc:  # the steering package is part of vlmsafe; this only guards partial installs
        raise VlmsafeError(f"vlmsafe.steering is not available ({exc}); reinstall vlmsafe.") from exc
    vectors = ShiftVectors.load(args.vectors) if args.vectors else None
    mode = "dataset" if vectors is not None else "sample" if args.sample_level else None
    alpha = 1.0 if args.alpha is None else args.alpha
    return SafeVLM.from_pretrained(args.model, vectors=vectors, alpha=alpha, mode=mode)


def run_evaluate(args: argparse.Namespace) -> int:
    """Handler of ``vlmsafe evaluate``."""
    if args.alpha is not None and not (args.vectors or args.sample_level):
        raise InputError("--alpha sets the steering strength; add --vectors DIR (dataset-level) or --sample-level.")
    if args.batch_size < 1 or args.max_new_tokens < 1:
        raise InputError("--batch-size and --max-new-tokens must be >= 1.")
    if args.vectors and not os.path.isdir(args.vectors):
        raise InputError(f"--vectors {args.vectors!r} is not a folder; pass the output folder of `vlmsafe calibrate`.")
    check_output(args.out, kind="dir", overwrite=args.overwrite)
    items = load_data(args)
    judge = load_judge(args.judge, batch_size=args.batch_size)
    generator = load_generator(args)
    from vlmsafe.steering.cli import _accelerator_if_launched

    accelerator = _accelerator_if_launched()  # under `accelerate launch` / `torchrun`: shard the items
    if accelerator is not None and hasattr(generator, "model"):
        generator.model.to(accelerator.device)
    steering = "dataset" if args.vectors else "sample" if args.sample_level else None
    config = {
        "model": str(args.model),
        "data": str(args.data),
        "steering": steering,
        "alpha": (1.0 if args.alpha is None else args.alpha) if steering else None,
        "vectors": args.vectors,
    }
    runs = {"image": [("multimodal", False)], "text": [("text-only", True)], "both": [("text-only", True), ("multimodal", False)]}[args.modality]
    reports: dict[str, EvalReport] = {}
    for name, text_only in runs:
        reports[name] = evaluate(
            generator,
            items,
            judge,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            text_only=text_only,
            progress=not args.quiet,
            config=config,
            accelerator=accelerator,
        )
    if accelerator is not None and not accelerator.is_main_process:
        return 0  # every process holds the full reports; only the main one writes them
    out = Path(args.out)
    table = compare_reports(reports)
    with atomic_path(out, overwrite=args.overwrite) as tmp:  # the whole folder appears at once, or not at all
        tmp.mkdir()
        for name, report in reports.items():
            report.to_json(tmp / f"{name}.json")
            (tmp / f"{name}.md").write_text(report.to_markdown(title=name))
        (tmp / "summary.md").write_text(table + "\n" + "\n".join(r.to_markdown(title=n) for n, r in reports.items()))
    print(table, end="")
    print(f"\nwrote {', '.join(f'{n}.json' for n in reports)}, summary.md to {out}")
    return 0
