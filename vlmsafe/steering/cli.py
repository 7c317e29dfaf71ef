"""``vlmsafe calibrate`` and ``vlmsafe generate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vlmsafe.cli_options import (
    add_data_options,
    add_max_new_tokens,
    add_model_options,
    add_output_options,
    add_progress_option,
    add_steering_options,
    load_model_from_args,
    steering_from_args,
)
from vlmsafe.errors import InputError
from vlmsafe.validation import layer_spec_arg

_CALIBRATE_EPILOG = """\
data file: JSONL, one object per line: {"id": "1", "prompt": "...", "image": "img/1.png"}
(image paths relative to the file; optional category, label). Examples:
  vlmsafe calibrate --model llava-1.5-7b-hf --data calib.jsonl --out vectors/ --layers 8-31
  accelerate launch --num_processes 4 -m vlmsafe.cli calibrate ...   # shard a large set over 4 GPUs
  torchrun --nproc_per_node 2 -m vlmsafe.cli calibrate ...           # several CPU processes (gloo)
"""

_GENERATE_EPILOG = """\
examples:
  vlmsafe generate --model DIR --image cat.png --prompt 'What is in the image?'
  vlmsafe generate --model DIR --vectors vectors/ --alpha 1.0 --image x.png --prompt '...'
  vlmsafe generate --model DIR --sample-level --image x.png --prompt '...'
"""


def register(subparsers: Any) -> None:
    from vlmsafe.steering.cmrm import CALIBRATION_POSITIONS

    cal = subparsers.add_parser(
        "calibrate",
        help="compute dataset-level CMRM shift vectors for a VLM",
        description=(
            "Run every (prompt, image) item of --data through the model twice, with its image and as its "
            "text-only counterpart, and save the per-layer mean shift (multimodal minus text-only) to --out "
            "(vectors.safetensors + vectors.json). Use the vectors with `vlmsafe generate --vectors DIR`."
        ),
        epilog=_CALIBRATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(cal)
    add_data_options(cal, help="JSONL calibration items, each with an image")
    add_output_options(cal, help="output folder for vectors.safetensors + vectors.json (written atomically)")
    cal.add_argument("--layers", type=layer_spec_arg, default=None, help="decoder layers to calibrate, e.g. '8-15' (default: all)")
    cal.add_argument("--positions", default="last", choices=CALIBRATION_POSITIONS,
                     help="token positions read per item: the last prompt token (default) or the mean over the prompt's "
                     "text tokens (image tokens have no text-only counterpart)")
    add_progress_option(cal)
    cal.set_defaults(func=run_calibrate)

    gen = subparsers.add_parser(
        "generate",
        help="generate with a VLM, optionally under CMRM steering",
        description="Generate a response for one prompt (and image), unsteered or steered with CMRM.",
        epilog=_GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(gen)
    gen.add_argument("--prompt", required=True, help="the instruction (plain text; the chat template is applied for you)")
    gen.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    add_max_new_tokens(gen)
    add_steering_options(gen)
    gen.set_defaults(func=run_generate)


def run_calibrate(args: argparse.Namespace) -> int:
    from vlmsafe.data import load_items
    from vlmsafe.distributed import accelerator_if_launched, is_main_process, wait_for_everyone
    from vlmsafe.io import check_output
    from vlmsafe.steering import calibrate

    check_output(args.out, kind="dir", overwrite=args.overwrite)
    items = load_items(args.data, check_images="verify")[: args.limit]
    missing = [it.id for it in items if it.image is None]
    if missing:
        raise InputError(f"{args.data}: items {missing[:5]} have no image; CMRM calibration needs an image per item")
    accelerator = accelerator_if_launched()
    model, processor = load_model_from_args(args, kind="vlm", device=accelerator.device if accelerator is not None else None)
    vectors = calibrate(model, processor, items, layers=args.layers, positions=args.positions, batch_size=args.batch_size,
                        accelerator=accelerator, progress=not args.no_progress)
    vectors.meta["model_name"] = str(args.model)
    vectors.meta["calibration_data"] = str(Path(args.data).resolve())
    if is_main_process(accelerator):
        vectors.save(args.out, overwrite=args.overwrite)
        print(f"saved CMRM vectors for {len(vectors.layers)} layers from {vectors.meta['num_items']} items to {args.out}")
        print(json.dumps({str(l): round(s["shift_norm"], 4) for l, s in vectors.stats.items()}))
    wait_for_everyone(accelerator)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from vlmsafe.data import open_image
    from vlmsafe.steering import SafeVLM

    image = open_image(args.image, context="--image") if args.image else None
    steering = steering_from_args(args)  # flag and vectors errors before the model is loaded
    model, processor = load_model_from_args(args, kind="vlm")
    vlm = SafeVLM(model, processor, steering=steering, max_new_tokens=args.max_new_tokens)  # checks vectors vs model
    print(vlm.generate(args.prompt, image))
    return 0
