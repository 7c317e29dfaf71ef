"""``vlmsafe calibrate`` and ``vlmsafe generate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vlmsafe.errors import FileFormatError, InputError

_STEER_HELP = """steering options:
  --positions last     steer only the last prompt token (default; cheapest, smallest utility cost)
  --positions prompt   steer every prompt token (text and image tokens)
  --positions text     steer the prompt's text tokens only
  --decode             also steer every generated token
"""


def _add_steer_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("steering")
    g.add_argument("--vectors", metavar="DIR", help="dataset-level CMRM: vectors written by `vlmsafe calibrate`")
    g.add_argument("--sample-level", action="store_true", help="sample-level CMRM: shift computed per input from its text-only counterpart (one extra text-only pass)")
    g.add_argument("--alpha", type=float, default=1.0, help="steering strength: h <- h - alpha * shift (default 1.0; 0 = unsteered)")
    g.add_argument("--layers", default=None, help="layers to steer, e.g. '8-15' or '4,8,12' (default: all calibrated layers)")
    g.add_argument("--positions", default="last", choices=["last", "prompt", "text", "image"], help="which prompt tokens are steered (default: last)")
    g.add_argument("--decode", action="store_true", help="also steer generated tokens")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local HF model directory (or hub id when online)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="load the model in this dtype")
    p.add_argument("--device", default=None, help="e.g. cuda:0 (default: CPU)")


def register(subparsers: Any) -> None:
    cal = subparsers.add_parser(
        "calibrate",
        help="compute dataset-level CMRM shift vectors for a VLM",
        description=(
            "Run every (prompt, image) item of --data through the model twice, with its image and as its "
            "text-only counterpart, and save the per-layer mean shift (multimodal minus text-only) to --out "
            "(vectors.safetensors + vectors.json). Use the vectors with `vlmsafe generate --vectors DIR`."
        ),
        epilog=(
            "data file: JSONL, one object per line: {\"id\": \"1\", \"prompt\": \"...\", \"image\": \"img/1.png\"} "
            "(image paths relative to the file; optional category, label). Examples:\n"
            "  vlmsafe calibrate --model llava-hf/llava-1.5-7b-hf --data calib.jsonl --out vectors/ --layers 8-31\n"
            "  accelerate launch --num_processes 4 -m vlmsafe.cli calibrate ...   # shard a large set over 4 GPUs\n"
            "  torchrun --nproc_per_node 2 -m vlmsafe.cli calibrate ...           # several CPU processes (gloo)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(cal)
    cal.add_argument("--data", required=True, help="JSONL calibration items with images")
    cal.add_argument("--out", required=True, help="output directory for the vectors (written atomically)")
    cal.add_argument("--layers", default=None, help="decoder layers to calibrate, e.g. '8-15' (default: all)")
    cal.add_argument("--positions", default="last", choices=["last", "prompt", "text"], help="token positions read per item (default: last prompt token)")
    cal.add_argument("--batch-size", type=int, default=8)
    cal.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    cal.add_argument("--limit", type=int, default=None, help="use only the first N items")
    cal.set_defaults(func=run_calibrate)

    gen = subparsers.add_parser(
        "generate",
        help="generate with a VLM, optionally under CMRM steering",
        description="Generate a response for one prompt (and image), unsteered or steered with CMRM.",
        epilog=_STEER_HELP + (
            "\nexamples:\n"
            "  vlmsafe generate --model DIR --image cat.png --prompt 'What is in the image?'\n"
            "  vlmsafe generate --model DIR --vectors vectors/ --alpha 1.0 --image x.png --prompt '...'\n"
            "  vlmsafe generate --model DIR --sample-level --image x.png --prompt '...'"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(gen)
    gen.add_argument("--prompt", required=True, help="the instruction (plain text; the chat template is applied for you)")
    gen.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    _add_steer_args(gen)
    gen.set_defaults(func=run_generate)


def _dtype(name: str | None):
    import torch

    return None if name is None else getattr(torch, name)


def _accelerator_if_launched():
    """An ``accelerate.Accelerator`` when started by ``accelerate launch`` / ``torchrun`` with
    several processes (gloo on CPU-only machines), else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def run_calibrate(args: argparse.Namespace) -> int:
    from vlmsafe.data import load_items
    from vlmsafe.steering import calibrate, load_model

    from vlmsafe.io import check_output

    check_output(args.out, kind="dir", overwrite=args.overwrite)
    items = load_items(args.data)
    if args.limit is not None:
        items = items[: args.limit]
    missing = [it.id for it in items if it.image is None]
    if missing:
        raise InputError(f"{args.data}: items {missing[:5]} have no image; CMRM calibration needs an image per item")
    accelerator = _accelerator_if_launched()
    device = accelerator.device if accelerator is not None else args.device
    model, processor = load_model(args.model, torch_dtype=_dtype(args.dtype), device=device)
    vectors = calibrate(model, processor, items, layers=args.layers, positions=args.positions, batch_size=args.batch_size,
                        accelerator=accelerator)
    vectors.meta["model_name"] = str(args.model)
    vectors.meta["calibration_data"] = str(Path(args.data).resolve())
    if accelerator is None or accelerator.is_main_process:
        vectors.save(args.out, overwrite=args.overwrite)
        print(f"saved CMRM vectors for {len(vectors.layers)} layers from {vectors.meta['num_items']} items to {args.out}")
        print(json.dumps({str(l): round(s["shift_norm"], 4) for l, s in vectors.stats.items()}))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return 0


def build_safevlm(args: argparse.Namespace, model: Any = None, processor: Any = None):
    from vlmsafe.steering import SafeVLM, ShiftVectors, load_model

    if args.vectors and args.sample_level:
        raise InputError("choose one of --vectors (dataset-level) and --sample-level, not both")
    if model is None:
        model, processor = load_model(args.model, torch_dtype=_dtype(getattr(args, "dtype", None)), device=getattr(args, "device", None))
    vectors = ShiftVectors.load(args.vectors, model=model) if args.vectors else None
    mode = "dataset" if vectors is not None else "sample" if args.sample_level else None
    return SafeVLM(model, processor, vectors, alpha=args.alpha, mode=mode, layers=args.layers, positions=args.positions,
                   decode=args.decode, max_new_tokens=getattr(args, "max_new_tokens", 64))


def run_generate(args: argparse.Namespace) -> int:
    from PIL import Image, UnidentifiedImageError

    image = None
    if args.image:
        path = Path(args.image)
        if not path.is_file():
            raise FileFormatError(f"image file {path} not found")
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except UnidentifiedImageError:
            raise FileFormatError(f"{path} is not an image PIL can read") from None
    vlm = build_safevlm(args)
    print(vlm.generate(args.prompt, image))
    return 0
