"""``vlmsafe calibrate`` and ``vlmsafe generate``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from vlmsafe.cli.options import (
    add_anchor_options,
    add_data_options,
    add_input,
    add_max_new_tokens,
    add_model_options,
    add_output_options,
    add_progress_option,
    add_push_options,
    add_steering_options,
    anchor_from_args,
    check_command_output,
    check_named_inputs,
    check_push_args,
    load_model_from_args,
    push_from_args,
    steering_from_args,
)
from vlmsafe.cli.parsing import add_command
from vlmsafe.cli.types import float_arg, int_arg, layer_spec_arg
from vlmsafe.errors import InputError

_CALIBRATE_EPILOG = """\
data file: JSONL, one object per line: {"id": "1", "prompt": "...", "image": "img/1.png"}
(image paths relative to the file; optional category, label, caption). Examples:
  vlmsafe calibrate --model llava-1.5-7b-hf --data calib.jsonl --out vectors/ --layers 8-31
  vlmsafe calibrate --model llava-1.5-7b-hf --data prompts.jsonl --anchor blank --out vectors-blank/   # as in CMRM
  vlmsafe calibrate --model llava-1.5-7b-hf --data labelled.jsonl --method shiftdc --out directions/
  accelerate launch --num_processes 4 -m vlmsafe.cli calibrate ...   # shard a large set over 4 GPUs (CMRM)
  torchrun --nproc_per_node 2 -m vlmsafe.cli calibrate ...           # several CPU processes (gloo)

--method shiftdc needs labelled items ("label": "harmful" | "benign"); each item's caption is its
"caption" field, else an entry of --captions, else written by the model from --caption-prompt.
"""

_GENERATE_EPILOG = """\
examples:
  vlmsafe generate --model DIR --image cat.png --prompt 'What is in the image?'
  vlmsafe generate --model DIR --vectors vectors/ --alpha 1.0 --image x.png --prompt '...'
  vlmsafe generate --model DIR --sample-level --image x.png --prompt '...'
  vlmsafe generate --model DIR --sample-level --anchor blank --image x.png --prompt '...'
  vlmsafe generate --model DIR --shiftdc directions/ --alpha 1.0 --image x.png --prompt '...'
"""


def register(subparsers: Any) -> None:
    from vlmsafe.steering.choices import CALIBRATION_POSITIONS

    cal = add_command(
        subparsers, "calibrate", run_calibrate,
        help="compute dataset-level CMRM shift vectors (or ShiftDC safety directions) for a VLM",
        description=(
            "CMRM (default): run every item of --data through the model twice, with an image (its own, or a "
            "blank / noise anchor) and as its text-only counterpart, and save the per-layer shift (multimodal "
            "minus text-only; mean or first principal component) to --out (vectors.safetensors + vectors.json). "
            "Use the vectors with `vlmsafe generate --vectors DIR`. ShiftDC (--method shiftdc): save per-layer "
            "safety directions (benign minus harmful [prompt + caption] states) and the captions used to --out; "
            "use them with `vlmsafe generate --shiftdc DIR`."
        ),
        epilog=_CALIBRATE_EPILOG,
    )
    add_model_options(cal)
    add_data_options(cal, help="JSONL calibration items (with an image each, unless --anchor blank/noise)")
    add_output_options(cal, help="output folder for the vectors / directions (written atomically)")
    cal.add_argument("--method", choices=("cmrm", "shiftdc"), default="cmrm",
                     help="cmrm: shift vectors (default); shiftdc: safety directions from labelled items")
    cal.add_argument("--layers", type=layer_spec_arg, default=None,
                     help="decoder layers to calibrate, e.g. '8-15' or 'middle-to-last' (default: all)")
    cal.add_argument("--tune-share", type=float_arg(low=0.0, high=0.9), default=0.25, metavar="FRACTION",
                     help="CMRM: share of the harmful and benign items held out to choose the recommended "
                          "layers and alpha, recorded with the vectors and used by generate / evaluate "
                          "(default 0.25; 0: no tuning, the vectors say they are untuned)")
    cal.add_argument("--positions", default=None, choices=CALIBRATION_POSITIONS,
                     help="token positions read per item: the last prompt token (default) or the mean over the "
                     "prompt's text tokens (image tokens have no text-only counterpart); ShiftDC reads the last only")
    g = cal.add_argument_group("CMRM")
    add_anchor_options(g, sample_level=False)
    g.add_argument("--aggregate", choices=("mean", "pca"), default=None,
                   help="mean of the per-item shifts (default), or their first principal component oriented and "
                        "scaled by the mean (keeps every item's shift in memory)")
    g = cal.add_argument_group("ShiftDC")
    g.add_argument("--caption-prompt", default=None, metavar="TEXT",
                   help="instruction the model captions an image from; {prompt} is the item's prompt "
                        "(default: ShiftDC's 'Based on the given Request, describe the image. Request: {prompt}')")
    g.add_argument("--caption-tokens", type=int_arg(low=1), default=None, metavar="N",
                   help="caption budget in tokens (default 128, as in ShiftDC's code)")
    add_input(g, "--captions", default=None, metavar="JSONL",
              help="reuse captions by item id, e.g. the captions.jsonl of an earlier --method shiftdc run "
                   "(default: none, captions from the data or the model)")
    add_push_options(cal, what="the vectors / directions folder")
    add_progress_option(cal)

    gen = add_command(
        subparsers, "generate", run_generate,
        help="generate with a VLM, optionally under CMRM or ShiftDC steering",
        description="Generate a response for one prompt (and image), unsteered or steered with CMRM or ShiftDC.",
        epilog=_GENERATE_EPILOG,
    )
    add_model_options(gen)
    gen.add_argument("--prompt", required=True,
                     help="the instruction (plain text; the chat template is applied for you)")
    add_input(gen, "--image", default=None, help="image file (default: none, a text-only prompt)")
    add_max_new_tokens(gen)
    add_steering_options(gen)


def run_calibrate(args: argparse.Namespace) -> int:
    check_push_args(args)
    check_command_output(args, args.out, kind="dir")  # the images --data names: once it is read, below
    if args.method == "shiftdc":
        return _calibrate_shiftdc(args)
    shiftdc_flags = [f for f, v in (("--caption-prompt", args.caption_prompt),
                                    ("--caption-tokens", args.caption_tokens), ("--captions", args.captions))
                     if v is not None]
    if shiftdc_flags:
        raise InputError(f"{', '.join(shiftdc_flags)}: ShiftDC options, which need --method shiftdc; add it or drop "
                         "them")
    return _calibrate_cmrm(args)


def _calibrate_cmrm(args: argparse.Namespace) -> int:
    from vlmsafe.data import load_items
    from vlmsafe.distributed import accelerator_if_launched, is_main_process, wait_for_everyone
    from vlmsafe.steering import calibrate

    anchor = anchor_from_args(args)
    real = anchor["anchor"] == "real"
    items = load_items(args.data, check_images="verify" if real else False)
    check_named_inputs(args.out, {"--data": items})  # every image the file names, used or beyond --limit
    items = items[: args.limit]
    missing = [it.id for it in items if it.image is None]
    if real and missing:
        raise InputError(f"{args.data}: items {missing[:5]} have no image; CMRM calibration on real images needs "
                         "an image per item (or calibrate on a fixed anchor: --anchor blank / noise, which needs "
                         "prompts only)")
    accelerator = accelerator_if_launched()
    model, processor = load_model_from_args(args, kind="vlm",
                                            device=accelerator.device if accelerator is not None else None)
    from vlmsafe.adapters import check_prompt_lengths  # a prompt the model cannot hold: refused before the work
    check_prompt_lengths(model, processor, items)
    from vlmsafe.steering import SafeVLM
    from vlmsafe.steering.recommend import RECOMMEND_TOKENS, recommend_setting, split_for_tuning, untuned

    keep, held, reason = split_for_tuning(items, args.tune_share)
    if accelerator is not None and held:
        keep, held, reason = items, [], "not tuned under a multi-process launch (run calibrate in one process)"
    vectors = calibrate(model, processor, keep, layers=args.layers, positions=args.positions or "last",
                        batch_size=args.batch_size, accelerator=accelerator, progress=not args.no_progress,
                        aggregate=args.aggregate or "mean", **anchor)
    vectors.meta["model_name"] = str(args.model)
    vectors.meta["calibration_data"] = str(Path(args.data).resolve())
    plain = SafeVLM(model, processor, batch_size=args.batch_size, max_new_tokens=RECOMMEND_TOKENS) if held else None
    vectors.meta["recommended"] = (recommend_setting(plain, vectors, held) if held
                                   else untuned(reason or "not tuned"))
    if is_main_process(accelerator):
        vectors.save(args.out, overwrite=args.overwrite)
        print(f"saved CMRM vectors ({vectors.meta['anchor']} anchor, {vectors.meta['aggregate']}) for "
              f"{len(vectors.layers)} layers from {vectors.meta['num_items']} items to {args.out}")
        print(json.dumps({str(l): round(s["shift_norm"], 4) for l, s in vectors.stats.items()}))
        rec = vectors.meta["recommended"]
        print("recommended setting: " + (f"alpha {rec['alpha']:g}, layers {rec['layers']} (chosen on "
                                         f"{rec['held_out_items']} held-out items; generate / evaluate use it)"
                                         if rec["status"] == "tuned" else rec["reason"]))
        push_from_args(args, args.out)
    wait_for_everyone(accelerator)
    return 0


def _calibrate_shiftdc(args: argparse.Namespace) -> int:
    from vlmsafe.data import load_items
    from vlmsafe.distributed import world_size
    from vlmsafe.steering import calibrate_shiftdc
    from vlmsafe.steering.shiftdc import (
        CAPTION_PROMPT,
        CAPTION_TOKENS,
        check_caption_prompt,
        labelled_rows,
        read_caption_cache,
    )

    cmrm_flags = [f for f, v in (("--anchor", args.anchor), ("--anchor-colour", args.anchor_colour),
                                 ("--anchor-seed", args.anchor_seed), ("--aggregate", args.aggregate))
                  if v is not None]
    if cmrm_flags:
        raise InputError(f"{', '.join(cmrm_flags)}: CMRM options, which --method shiftdc does not use; drop them")
    if args.positions not in (None, "last"):
        raise InputError(f"ShiftDC reads the last prompt token; drop --positions {args.positions}")
    if world_size() > 1:
        raise InputError("ShiftDC calibration runs in one process; run it without accelerate launch / torchrun")
    caption_prompt = check_caption_prompt(args.caption_prompt or CAPTION_PROMPT)
    cache = read_caption_cache(args.captions) if args.captions else {}
    items = load_items(args.data, check_images=False, require_label=True)
    check_named_inputs(args.out, {"--data": items})  # every image the file names, used or beyond --limit
    items = items[: args.limit]
    labelled_rows(items)  # both labels present: checked before the model loads
    uncaptioned = [it for it in items if not it.meta.get("caption") and it.id not in cache]
    missing = [it.id for it in uncaptioned if it.image is None]
    if missing:
        raise InputError(f"{args.data}: items {missing[:5]} have neither a caption nor an image; give each a "
                         "'caption' field or an image (the model captions it)")
    from vlmsafe.images import verify_image

    for it in uncaptioned:
        verify_image(it.image, context=f"{args.data}: item {it.id!r}")
    model, processor = load_model_from_args(args, kind="vlm")
    from vlmsafe.adapters import check_prompt_lengths  # a prompt the model cannot hold: refused before the work
    check_prompt_lengths(model, processor, items)
    directions = calibrate_shiftdc(model, processor, items, layers=args.layers, batch_size=args.batch_size,
                                   caption_prompt=caption_prompt, caption_tokens=args.caption_tokens or CAPTION_TOKENS,
                                   captions=cache, progress=not args.no_progress)
    directions.meta["model_name"] = str(args.model)
    directions.meta["calibration_data"] = str(Path(args.data).resolve())
    directions.save(args.out, overwrite=args.overwrite)
    src = directions.meta["caption_sources"]
    print(f"saved ShiftDC safety directions for {len(directions.layers)} layers from "
          f"{directions.meta['n_harmful']} harmful and {directions.meta['n_benign']} benign items to {args.out} "
          f"(captions: {src['data']} from the data, {src['cache']} from --captions, {src['generated']} generated; "
          "all in captions.jsonl)")
    push_from_args(args, args.out)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from vlmsafe.images import open_image
    from vlmsafe.steering import SafeVLM

    image = open_image(args.image, context="--image") if args.image else None
    steering = steering_from_args(args)  # flag and vectors errors before the model is loaded
    model, processor = load_model_from_args(args, kind="vlm")
    vlm = SafeVLM(model, processor, steering, max_new_tokens=args.max_new_tokens)  # checks vectors vs model
    print(vlm.generate(args.prompt, image))
    return 0
