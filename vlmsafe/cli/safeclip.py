"""``vlmsafe safeclip train | eval | pairs | generate`` — Safe-CLIP from the command line.

Every check that needs no model runs first (options, output folder, data files, images), so a bad
input costs no model loading and leaves nothing behind. The training flags are built from
:class:`~vlmsafe.safeclip.config.SafeCLIPTrainingConfig`'s field metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vlmsafe.cli.options import (
    add_batch_size_option,
    add_device_option,
    add_dtype_option,
    add_input,
    add_max_new_tokens,
    add_model_options,
    add_output_options,
    add_progress_option,
    add_push_options,
    add_seed_option,
    check_command_output,
    check_named_inputs,
    check_push_args,
    command_inputs,
    load_model_from_args,
    push_from_args,
)
from vlmsafe.cli.parsing import add_command
from vlmsafe.cli.types import float_arg, int_arg
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.io import check_no_overlap
from vlmsafe.reading import json_text

_TRAIN_EPILOG = """\
data formats:
  JSONL quadruplets   {"safe": "...", "unsafe": "...", "safe_image": "img/1.jpg", "unsafe_image": "img/1u.jpg"}
                      (images optional, relative to --image-root or the file's folder)
  ViSU-Text           records with "safe", "nsfw", "coco_id" (+ --coco-dir holding train2017/ val2017/)
  Items without images train the text terms only; data with no images at all trains the text
  tower only (text-only mode, e.g. ViSU-Text, whose unsafe images are not public).

examples:
  vlmsafe safeclip train --model openai/clip-vit-large-patch14 --data visu_train.json \\
      --coco-dir coco --val-data visu_val.json --output-dir runs/safeclip --epochs 2
  vlmsafe safeclip train ... --resume latest          # continue an interrupted run
  torchrun --nproc_per_node 2 -m vlmsafe.cli safeclip train ...   # several processes/GPUs

For a text encoder that will condition an image generator (Stable Diffusion), add a weight for
text_safe_tokens (not in the paper, default 0): the paper's eight terms only hold the pooled text
embedding, while the UNet reads every token state; the term keeps safe captions' token states at
the original's (--token-layer picks last_hidden_state, SD 1.x/2.x, or hidden_states[-2], SDXL):
  vlmsafe safeclip train ... --weights text_safe_tokens=2

The fine-tuned model (best validation weights, LoRA merged) is written to OUTPUT_DIR/model:
an HF CLIPModel folder (or open_clip safetensors + JSON). Checkpoints (OUTPUT_DIR/checkpoint-*)
hold safetensors + JSON only; no pickle is ever loaded. An existing non-empty OUTPUT_DIR is
refused unless --resume continues the run in it or --overwrite replaces it (the old folder stays
untouched until the new run has finished).
"""

_EVAL_EPILOG = """\
Without --safe/--data it evaluates the bundled testbed (assets/safeclip): a tiny CLIP trained on
synthetic scenes where blood, knives and fire play the unsafe concepts, before and after Safe-CLIP,
on held-out scenes. safe@1 = share of unsafe text queries whose top-1 image is a safe image.
--gallery original (default) embeds the gallery with the original model, i.e. each Safe-CLIP
tower is used as a drop-in replacement (as in diffusers / LLaVA); --gallery self uses both
Safe-CLIP towers.
"""


def register(subparsers: Any) -> None:
    p = add_command(
        subparsers, "safeclip",
        help="Safe-CLIP: fine-tune CLIP so unsafe text/images embed like safe ones (train, eval, pairs)",
        description="Safe-CLIP (Poppi et al., ECCV 2024): fine-tune CLIP text/vision encoders so unsafe inputs "
        "are redirected to safe embeddings while safe ones are preserved.",
    )
    sub = p.add_subparsers(dest="safeclip_command")
    _register_train(sub)
    _register_eval(sub)
    _register_pairs(sub)
    _register_generate(sub)


# ------------------------------------------------------------------------------------ train


def _register_train(sub: Any) -> None:
    from vlmsafe.cli.options import add_options
    from vlmsafe.safeclip.config import SafeCLIPTrainingConfig

    t = add_command(sub, "train", _train, help="fine-tune a CLIP model with the Safe-CLIP losses",
                    description="Fine-tune a CLIP model with the eight Safe-CLIP losses (LoRA by default).",
                    epilog=_TRAIN_EPILOG)
    add_input(t, "--model", required=True,
              help="HF CLIP folder or hub id, an open_clip checkpoint folder, or open_clip:NAME[@PRETRAINED]")
    add_input(t, "--data", required=True, help="training data: JSONL quadruplets or a ViSU-Text JSON/JSONL file")
    add_input(t, "--val-data", help="validation data (same formats); default: hold out --val-fraction of --data")
    t.add_argument("--val-fraction", type=float_arg(low=0, high=1, high_open=True), default=0.05, metavar="X",
                   help="share of --data held out for validation when --val-data is not given, in [0, 1) "
                   "(0 disables validation; default 0.05)")
    add_input(t, "--image-root", help="folder that relative image paths in JSONL data are relative to "
                                      "(default: the data file's folder)")
    add_input(t, "--coco-dir", help="COCO folder (train2017/, val2017/) for ViSU data (default: none, text-only)")
    add_output_options(t, flag="--output-dir", dest="output_dir",
                       help="where checkpoints and the final model (OUTPUT_DIR/model) go")
    t.add_argument("--resume", help="checkpoint folder or 'latest' (in --output-dir) to continue from "
                                   "(default: none, a new run)")
    t.set_defaults(parameter_flags={"resume_from": "--resume"})  # check_run_output's parameter
    add_input(t, "--config", help="JSON or YAML file of SafeCLIPTrainingConfig fields; the flags below override it "
                                  "(default: none, the field defaults)")
    group = t.add_argument_group("training options (SafeCLIPTrainingConfig fields)")
    add_options(group, SafeCLIPTrainingConfig, types={"weights": _weights_arg})
    add_push_options(t, what="the final model (OUTPUT_DIR/model)")


def _weights_arg(text: str) -> dict[str, float]:
    """``NAME=W,NAME=W`` loss weights: known term names, finite weights >= 0 (checked at parse time)."""
    from vlmsafe.safeclip.terms import ALL_LOSS_NAMES

    one = float_arg(low=0)
    out = {}
    for part in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in ALL_LOSS_NAMES:
            raise argparse.ArgumentTypeError(
                f"expected NAME=WEIGHT pairs with NAME in {', '.join(ALL_LOSS_NAMES)}, got {part!r}")
        out[key] = one(value)
    if not out:
        raise argparse.ArgumentTypeError(f"expected NAME=WEIGHT pairs, got {text!r}")
    return out


def _load_config_file(path: str) -> dict[str, Any]:
    """``--config``: a JSON (:func:`vlmsafe.reading.read_json`) or YAML mapping of config fields."""
    from vlmsafe.reading import read_json

    p = Path(path)
    fix = "write a mapping of SafeCLIPTrainingConfig fields (JSON, or YAML with a .yaml/.yml name)"
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        if not p.is_file():
            raise FileFormatError(f"{p}: no such config file; {fix}")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise FileFormatError(f"{p}: invalid YAML ({' '.join(str(exc).split())}); {fix}") from None
    else:
        data = read_json(p, what="config file", fix=fix)
    if not isinstance(data, dict):
        raise FileFormatError(f"{p}: holds a {type(data).__name__}, not a mapping; {fix}")
    return data


def _train(args: argparse.Namespace) -> int:
    from vlmsafe.safeclip.backends import load_backend
    from vlmsafe.safeclip.checkpoint import check_run_output, run_directory
    from vlmsafe.safeclip.trainer import SafeCLIPTrainer

    config = _training_config(args)
    check_push_args(args)
    from vlmsafe.extras import require_extra  # a missing optional dependency: one line, before the work
    require_extra("safeclip", *(("peft",) if config.use_lora else ()), feature="safeclip train with LoRA")
    check_no_overlap(args.output_dir, command_inputs(args), option="--output-dir")  # even with --overwrite / --resume
    out, replace = check_run_output(args.output_dir, resume_from=args.resume, overwrite=args.overwrite,
                                    option="--output-dir")
    data, val = _training_data(args, config)
    _quiet_weight_loading()
    backend = load_backend(args.model)
    with run_directory(out, replace=replace) as run_dir:
        trainer = SafeCLIPTrainer(backend, config, data, val, output_dir=run_dir)
        if trainer.accelerator.is_main_process:
            mode = "LoRA" if config.use_lora else "full fine-tuning"
            print(f"Safe-CLIP: {len(data)} training items, {0 if val is None else len(val)} validation; towers "
                  f"{', '.join(trainer.towers)}; {mode}; {trainer.total_steps} steps", file=sys.stderr)
        result = trainer.train(resume_from=args.resume)
        model_dir = trainer.save_pretrained(run_dir / "model", overwrite=bool(args.resume))
    if trainer.accelerator.is_main_process:
        summary = {"model_dir": str(out / model_dir.relative_to(run_dir)), "global_step": result.global_step,
                   "stopped_early": result.stopped_early, "best_step": result.best_step,
                   "best_metrics": result.best_metrics}
        print(json_text(summary))
        push_from_args(args, out / model_dir.relative_to(run_dir))
    return 0


def _quiet_weight_loading() -> None:
    """transformers' per-tensor "Loading weights" bars are noise next to the command's own output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _training_config(args: argparse.Namespace) -> Any:
    """``--config`` file, then the flags given (validated by the dataclass)."""
    from vlmsafe.cli.options import options_from_args
    from vlmsafe.safeclip.config import SafeCLIPTrainingConfig

    fields = _load_config_file(args.config) if args.config else {}
    given = options_from_args(args, SafeCLIPTrainingConfig)
    if "weights" in given:
        base = fields.get("weights") or {}
        if not isinstance(base, dict):
            raise FileFormatError(f"{args.config}: 'weights' must be a mapping of loss term names to weights")
        given["weights"] = {**base, **given["weights"]}
    fields.update(given)
    return SafeCLIPTrainingConfig.from_dict(fields)


def _training_data(args: argparse.Namespace, config: Any) -> tuple[Any, Any]:
    """Training and validation quadruplets, images verified, trainable terms checked (no model needed)."""
    from vlmsafe.safeclip.data import load_dataset
    from vlmsafe.safeclip.trainer import check_training_data

    data = load_dataset(args.data, image_root=args.image_root, coco_dir=args.coco_dir)
    val = None
    if args.val_data:
        val = load_dataset(args.val_data, image_root=args.image_root, coco_dir=args.coco_dir)
    # the images the data name are inputs too (even those --text-only will not read)
    check_named_inputs(args.output_dir, {"--data": data.items, "--val-data": val.items if val is not None else []},
                       option="--output-dir")
    if config.train_vision is False:  # --text-only: the images are not even read
        data = data.text_only()
        val = val.text_only() if val is not None else None
    if val is None and args.val_fraction > 0:
        data, val = data.split(args.val_fraction, seed=config.seed)
    check_training_data(config, data)
    for ds in (data, val):
        if ds is not None:
            ds.verify_images()
    return data, val


# ------------------------------------------------------------------------------------ eval


def _register_eval(sub: Any) -> None:
    e = add_command(sub, "eval", _eval,
                    help="retrieval Recall@K table, original vs Safe-CLIP (default: bundled testbed)",
                    description="Print Recall@1/5/10/20 for S→V, U→V, U→(V∪G), V→S and G→S, original vs "
                    "Safe-CLIP.", epilog=_EVAL_EPILOG)
    add_input(e, "--original", help="the original CLIP (folder, hub id, open_clip:NAME; default: the testbed's)")
    add_input(e, "--safe", help="the Safe-CLIP model (OUTPUT_DIR/model of `safeclip train`; default: the testbed's)")
    add_input(e, "--data", help="evaluation quadruplets with images, JSONL or ViSU + --coco-dir (default: the "
                                "testbed's held-out split)")
    add_input(e, "--image-root", help="folder that relative image paths in --data are relative to "
                                      "(default: the data file's folder)")
    add_input(e, "--coco-dir", help="COCO folder for ViSU-layout --data (default: none)")
    add_input(e, "--assets", help="testbed folder (default: the bundled assets/safeclip)")
    e.add_argument("--gallery", choices=("original", "self"), default="original",
                   help="which model embeds the retrieval gallery for the Safe-CLIP rows")
    add_batch_size_option(e, default=64, help="embedding batch size")
    add_output_options(e, flag="--json", dest="json", required=False,
                       help="also write the rows to this JSON file (default: none)")
    add_progress_option(e)


def _eval(args: argparse.Namespace) -> int:
    from vlmsafe.io import write_json_atomic
    from vlmsafe.safeclip.retrieval import format_table, retrieval_table

    if args.json:
        from vlmsafe.testbed.safeclip import default_assets_dir

        testbed = None if args.safe or args.data or args.original or args.assets else default_assets_dir()
        check_command_output(args, args.json, kind="file", option="--json", inputs=[("Safe-CLIP testbed", testbed)])
    if args.safe or args.data or args.original:
        if not (args.safe and args.data and args.original):
            raise InputError("evaluating your own model needs --original, --safe and --data together (or none of "
                             "them for the bundled testbed)")
        from vlmsafe.safeclip.backends import load_backend
        from vlmsafe.safeclip.data import load_dataset

        data = load_dataset(args.data, image_root=args.image_root, coco_dir=args.coco_dir)
        if args.json:
            check_named_inputs(args.json, {"--data": data.items}, option="--json")
        data.verify_images()
        _quiet_weight_loading()
        rows = retrieval_table(load_backend(args.original), data, load_backend(args.safe), gallery=args.gallery,
                               batch_size=args.batch_size, progress=not args.no_progress)
        title = f"Retrieval on {args.data} ({len(data)} items)"
    else:
        from vlmsafe.testbed.safeclip import default_assets_dir, heldout_rows, resolve_assets_dir

        d = resolve_assets_dir(args.assets or default_assets_dir())
        _quiet_weight_loading()
        rows = heldout_rows(d, gallery=args.gallery)
        title = f"Safe-CLIP testbed ({d}): held-out scenes, tiny CLIP before/after Safe-CLIP"
    print(title)
    print(format_table(rows))
    if args.json:
        write_json_atomic(args.json, rows, overwrite=args.overwrite)
    return 0


# ------------------------------------------------------------------------------------ pairs


def _register_pairs(sub: Any) -> None:
    from vlmsafe.cli.options import add_options
    from vlmsafe.safeclip.pairs import PairConverterConfig

    pr = add_command(sub, "pairs", help="safe→unsafe caption converter: fine-tune a causal LM on pairs, generate "
                     "unsafe captions", description="Build Safe-CLIP training text: fine-tune a causal LM on "
                     "(safe, unsafe) caption pairs, then generate unsafe versions of safe captions.")
    psub = pr.add_subparsers(dest="pairs_command")
    pt = add_command(psub, "train", _pairs_train, help="LoRA fine-tune a causal LM on (safe, unsafe) pairs",
                     description="LoRA (or full) fine-tuning of a transformers causal LM on a small file of "
                     "(safe, unsafe) caption pairs; the paper used ~100 curated pairs.")
    add_model_options(pt, help="transformers causal LM folder (or hub id)")
    add_input(pt, "--pairs", required=True,
              help="JSONL/JSON records with 'safe' and 'unsafe' (or 'nsfw'), or a CSV with those columns")
    add_output_options(pt, flag="--output-dir", dest="output_dir",
                       help="where the adapter (safetensors) and tokenizer are saved")
    add_options(pt.add_argument_group("training options (PairConverterConfig fields)"), PairConverterConfig)

    pg = add_command(psub, "generate", _pairs_generate,
                     help="write unsafe versions of safe captions (JSONL ready for `safeclip train`)",
                     description="Generate an unsafe version of each safe caption with a converter trained by "
                     "`pairs train`.")
    add_model_options(pg, help="the base causal LM folder (or hub id)")
    add_input(pg, "--adapter", help="folder written by `pairs train` (default: none, for a fully fine-tuned --model)")
    add_input(pg, "--captions", required=True,
              help="a .txt file (one caption per line) or JSON/JSONL with 'safe' or 'caption' fields")
    add_output_options(pg, flag="--output", dest="output",
                       help="JSONL output: {\"safe\": ..., \"unsafe\": ...} per line")
    add_batch_size_option(pg, default=16, help="captions per generate call")
    add_max_new_tokens(pg)
    pg.add_argument("--sample", action="store_true", help="sample (with --temperature/--top-p) instead of greedy")
    pg.add_argument("--temperature", type=float_arg(low=0, low_open=True), metavar="X",
                    help="sampling temperature, > 0 (default 1.0; needs --sample)")
    pg.add_argument("--top-p", type=float_arg(low=0, high=1, low_open=True), metavar="X",
                    help="nucleus sampling mass, in (0, 1] (default 0.9; needs --sample)")
    pg.add_argument("--template", help="prompt template with {safe} (default: the one `pairs train` used by default)")
    add_progress_option(pg)


def _load_lm(args: argparse.Namespace, adapter: str | None = None) -> tuple[Any, Any]:
    return load_model_from_args(args, kind="causal_lm", adapter=adapter)


def _pairs_train(args: argparse.Namespace) -> int:
    from vlmsafe.cli.options import options_from_args
    from vlmsafe.safeclip.pairs import PairConverterConfig, load_pairs, save_converter, train_pair_converter

    cfg = PairConverterConfig(**options_from_args(args, PairConverterConfig))
    from vlmsafe.extras import require_extra  # a missing optional dependency: one line, before the work
    require_extra("safeclip", *(("peft",) if cfg.use_lora else ()), feature="safeclip pairs train with LoRA")
    check_command_output(args, args.output_dir, kind="dir", option="--output-dir")
    pairs = load_pairs(args.pairs)
    lm, tok = _load_lm(args)
    result = train_pair_converter(lm, tok, pairs, cfg)
    save_converter(result.model, tok, args.output_dir, overwrite=args.overwrite)
    print(json_text({"output_dir": args.output_dir, "pairs": len(pairs), "truncated_pairs": result.truncated_pairs,
                 "first_loss": result.losses[0], "last_loss": result.losses[-1]}))
    return 0


def _pairs_generate(args: argparse.Namespace) -> int:
    from vlmsafe.extras import require_extra  # a missing optional dependency: one line, before the work
    from vlmsafe.io import atomic_path
    from vlmsafe.safeclip.pairs import DEFAULT_TEMPLATE, check_template, generate_unsafe, load_captions

    require_extra("safeclip", *(("peft",) if args.adapter else ()), feature="safeclip pairs generate --adapter")
    template = check_template(args.template or DEFAULT_TEMPLATE)
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise InputError("--temperature/--top-p only apply when sampling; add --sample (greedy decoding would "
                         "ignore them)")
    check_command_output(args, args.output, kind="file", option="--output", file_example="unsafe.jsonl")
    captions = load_captions(args.captions)
    lm, tok = _load_lm(args, args.adapter)
    kwargs: dict[str, Any] = {}
    if args.sample:
        kwargs = {"do_sample": True, "temperature": args.temperature or 1.0, "top_p": args.top_p or 0.9}
    unsafe = generate_unsafe(lm, tok, captions, prompt_template=template, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, progress=not args.no_progress, **kwargs)
    with atomic_path(args.output, overwrite=args.overwrite) as tmp:
        tmp.write_text("".join(json.dumps({"safe": s, "unsafe": u}) + "\n" for s, u in zip(captions, unsafe)))
    print(f"wrote {len(unsafe)} pairs to {args.output}")
    return 0


# ------------------------------------------------------------------------------------ generate

_GENERATE_EPILOG = """\
prompts: a .jsonl/.json file of records with a "prompt" field (optional "id"), or a text file with
one prompt per line.

examples:
  vlmsafe safeclip generate --pipeline sd-v1-4/ --text-encoder safe-clip/model --prompts prompts.txt --out gen/
  vlmsafe safeclip generate --pipeline sdxl/ --text-encoder safe-l/model --text-encoder-2 safe-bigg/model \\
      --prompts prompts.jsonl --out gen/ --also-original --steps 30 --guidance 7.0
  vlmsafe safeclip generate --pipeline assets/t2i/pipeline --text-encoder assets/safeclip/safe \\
      --prompts prompts.txt --out gen/ --also-original --steps 10 --guidance 4   # the bundled testbed

Output: OUT/safe/<k>.png (and OUT/original/<k>.png) and OUT/generations.json (prompt, seed and
text encoder of every image). Image k of the run starts from seed --seed + k.
"""


def _register_generate(sub: Any) -> None:
    from vlmsafe.safeclip.generate import GUIDANCE_MAX

    g = add_command(
        sub, "generate", _generate,
        help="text-to-image with a Safe-CLIP text encoder swapped into your diffusers pipeline (SD 1.x/2.x, SDXL)",
        description="Generate images from a diffusers text-to-image pipeline whose text encoder(s) are replaced by "
        "Safe-CLIP's.", epilog=_GENERATE_EPILOG,
    )  # fmt: skip
    add_input(g, "--pipeline", required=True, metavar="DIR",
              help="a diffusers pipeline folder (model_index.json), e.g. Stable Diffusion v1.4 or SDXL")
    add_input(g, "--text-encoder", required=True, metavar="SAFE_DIR",
              help="Safe-CLIP model folder (OUTPUT_DIR/model of `safeclip train`) replacing text_encoder")
    te2 = g.add_mutually_exclusive_group()
    add_input(te2, "--text-encoder-2", metavar="SAFE_DIR",
              help="SDXL: Safe-CLIP fine-tuned from the pipeline's second CLIP, replacing text_encoder_2 "
                   "(default: none)")
    te2.add_argument("--keep-text-encoder-2", action="store_true",
                     help="SDXL: replace text_encoder only and keep the original text_encoder_2 (it still carries "
                     "unsafe concepts)")
    add_input(g, "--prompts", required=True, metavar="FILE",
              help="JSONL/JSON records with 'prompt', or a text file with one prompt per line")
    add_output_options(g, help="output folder (images + generations.json)")
    g.add_argument("--also-original", action="store_true",
                   help="also generate every prompt with the pipeline's own text encoder(s), from the same noise")
    g.add_argument("--steps", type=int_arg(low=1), default=30, metavar="N", help="denoising steps (default 30)")
    g.add_argument("--guidance", type=float_arg(low=0, high=GUIDANCE_MAX), default=7.5, metavar="G",
                   help=f"classifier-free guidance scale, in [0, {GUIDANCE_MAX:g}] (default 7.5; <= 1 disables "
                   "guidance; useful values are about 1-20)")
    add_seed_option(g, default=0, help="seed of the first image; image k uses seed + k")
    g.add_argument("--images-per-prompt", type=int_arg(low=1), default=1, metavar="N",
                   help="images generated per prompt (image k overall starts from seed --seed + k)")
    g.add_argument("--height", type=int_arg(low=8), default=None,
                   help="image height in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--width", type=int_arg(low=8), default=None,
                   help="image width in pixels, a multiple of 8 (default: the pipeline's)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt for every image (default: none)")
    add_batch_size_option(g, default=4, help="prompts per pipeline call")
    add_dtype_option(g, help="weights dtype (default float32)")
    add_device_option(g)
    add_progress_option(g)
    g.set_defaults(parameter_flags={"prompts_file": "--prompts"})  # run_generate names it so


def _generate(args: argparse.Namespace) -> int:
    from vlmsafe.extras import require_extra  # a missing optional dependency: one line, before the work
    from vlmsafe.safeclip.generate import GenerateSettings, run_generate

    require_extra("safeclip", "diffusers", feature="safeclip generate")
    check_command_output(args, args.out, kind="dir")  # run_generate checks it again (its Python callers)
    settings = GenerateSettings(
        steps=args.steps, guidance=args.guidance, seed=args.seed, images_per_prompt=args.images_per_prompt,
        batch_size=args.batch_size, height=args.height, width=args.width, negative_prompt=args.negative_prompt,
        also_original=args.also_original, dtype=args.dtype, device=args.device, progress=not args.no_progress,
    )
    record = run_generate(args.pipeline, args.text_encoder, args.prompts, args.out, settings,
                          text_encoder_2=args.text_encoder_2, keep_text_encoder_2=args.keep_text_encoder_2,
                          overwrite=args.overwrite)
    counts = {}
    for img in record["images"]:
        counts[img["encoder"]] = counts.get(img["encoder"], 0) + 1
    print(f"wrote {len(record['images'])} images ({', '.join(f'{n} {k}' for k, n in counts.items())}) "
          f"and generations.json to {args.out}")
    return 0
