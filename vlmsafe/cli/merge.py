"""``vlmsafe merge`` and ``vlmsafe merge-mask``: the safety merge from the command line."""

from __future__ import annotations

import argparse
import json

from vlmsafe.cli.options import (
    add_dtype_option,
    add_input,
    add_output_options,
    add_progress_option,
    add_push_options,
    add_seed_option,
    check_command_output,
    check_push_args,
    push_from_args,
)
from vlmsafe.cli.parsing import add_command
from vlmsafe.cli.types import float_arg, size_arg
from vlmsafe.merge.choices import METHODS

_MERGE_EPILOG = """\
examples:
  # the LLaVA recipe: 40% aligned LLM, 60% the VLM's language model
  vlmsafe merge --vlm llava-7b --aligned llama-2-7b-chat --method linear --weight 0.4 --out llava-7b-safe

  # everything in a YAML file (models, method, per-layer weights, masks, output); flags override it
  vlmsafe merge merge.yaml --out other-dir

  # LLaVA adds tokens (e.g. <image>): merge the shared vocabulary rows, keep the VLM's extra rows
  vlmsafe merge --vlm llava --aligned llama-chat --weight 0.4 --vocab-rows shared --out safe

The vision tower, projector and stored buffers (rotary inv_freq) are copied unchanged. Inputs may
be safetensors or PyTorch .bin checkpoints (sharded or not; .bin files are read with
torch.load(weights_only=True), tensors only). The output is a normal Hugging Face checkpoint
(sharded safetensors + index + the VLM's config/tokenizer files) plus vlmsafe_merge.json with the
recipe and the sha256 of every input. It appears only when complete: an interrupted merge leaves
the destination untouched, and an existing output is refused unless --overwrite is given. See
`python -c "import vlmsafe.merge.config as c; print(c.__doc__)"` for every YAML key. A mergekit-style
YAML (models: / merge_method: / base_model: / parameters:) is read too, for linear, slerp,
task_arithmetic, ties, dare_linear and dare_ties with two models (the VLM is the one whose config.json
has a vision_config); the output then comes from --out.
"""



def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "merge", _merge,
        help="recover a VLM's safety by merging its language model with the aligned text-only LLM",
        description=(
            "Merge the language model inside a VLM (LLaVA-style checkpoint) with the safety-aligned LLM it "
            "was built from, streaming tensor by tensor with bounded memory. --weight is the aligned "
            "LLM's share: 0 keeps the VLM, 1 takes the aligned LLM."
        ),
        epilog=_MERGE_EPILOG,
    )
    add_input(p, "config", nargs="?", label="merge config",
              help="YAML merge config, vlmsafe's or mergekit's form (optional if --vlm/--aligned/--out are given)")
    add_input(p, "--vlm", help="VL-adapted model directory, its layout kept (default: the YAML's vlm)")
    add_input(p, "--aligned", help="safety-aligned text-only LLM directory (default: the YAML's aligned)")
    add_input(p, "--base", help="common base model for task-vector methods (default: the aligned LLM)")
    p.add_argument("--method", choices=METHODS, help="merge method (default linear)")
    p.add_argument("--weight", type=float_arg(low=-1.0, high=2.0), metavar="LAMBDA",
                   help="aligned LLM's share (default 0.5): in [0, 1] (0 keeps the VLM, 1 takes the aligned LLM); "
                        "task_arithmetic also accepts [-1, 2] (extrapolation, task negation); per-layer in YAML")
    p.add_argument("--density", type=float_arg(low=0.0, high=1.0, low_open=True),
                   help="ties/dare only: fraction of each task vector kept, in (0, 1] (default 1.0)")
    p.add_argument("--convention", choices=("mergekit", "peft"), help="ties/dare numerics (default mergekit)")
    add_input(p, "--mask", help="safetensors mask file (from `vlmsafe merge-mask`): merge only masked entries "
                               "(default: none, every entry)")
    p.add_argument("--vocab-rows", choices=("error", "shared"),
                   help="vocabulary-size mismatch: error, or shared (merge the shared token rows, copy the rest) "
                        "(default: error)")
    p.add_argument("--allow-passthrough", action="store_true", default=None,
                   help="copy the VLM tensor where a counterpart is missing or mismatched instead of failing")
    p.add_argument("--cast-dtype", action="store_true", default=None, help="merge inputs of different dtypes")
    add_dtype_option(p, help="output dtype (default: the VLM's)")
    p.add_argument("--max-shard-size", type=size_arg, help="output shard size, e.g. 2GB (default 2GB)")
    add_seed_option(p, default=None, help="seed for DARE's random drop (default 0)")
    p.add_argument("--no-hash", dest="hash_inputs", action="store_false", default=None,
                   help="skip sha256 of the inputs in the recipe (hashing costs CPU, not an extra read)")
    add_output_options(p, dest="output", required=False, help="output directory, created atomically "
                       "(default: the YAML's output)")
    add_push_options(p, what="the merged model")
    add_progress_option(p)

    m = add_command(
        subparsers, "merge-mask", _merge_mask,
        help="write a top-k%% safety mask from the weight difference between the aligned LLM and the VLM",
        description=(
            "Score every decoder-layer weight by |W_aligned - W_vlm| (how far VL adaptation moved it) and "
            "write a safetensors mask of the top fraction, for `vlmsafe merge --mask`. For activation-based "
            "(Wanda / Antidote) scores use vlmsafe.merge.collect_input_norms + wanda_scores in Python."
        ),
    )
    add_input(m, "--vlm", required=True, help="VL-adapted model directory")
    add_input(m, "--aligned", required=True, help="safety-aligned LLM directory")
    m.add_argument("--top", type=float_arg(low=0.0, high=1.0, low_open=True), default=0.2,
                   help="fraction of entries to select, in (0, 1] (default 0.2)")
    m.add_argument("--scope", choices=("row", "tensor"), default="row", help="top-k per output row or per tensor")
    m.add_argument("--include", help="regex of tensor names to score (default: decoder-layer weights)")
    add_output_options(m, help="output .safetensors mask file")
    add_progress_option(m)


def _merge(args: argparse.Namespace) -> int:
    from vlmsafe.merge.config import MergeConfig
    from vlmsafe.merge.streaming import merge_checkpoints

    check_push_args(args)
    overrides = {
        k: getattr(args, k)
        for k in ("vlm", "aligned", "base", "output", "method", "weight", "density", "convention", "mask",
                  "vocab_rows", "allow_passthrough", "cast_dtype", "dtype", "max_shard_size", "seed",
                  "hash_inputs")
    }
    overrides["overwrite"] = True if args.overwrite else None  # else the YAML's value (default false)
    cfg = MergeConfig.from_yaml(args.config, **overrides) if args.config else MergeConfig.from_dict({}, **overrides)
    # the paths the YAML names are inputs too (the flags' own are found by check_command_output)
    named = f" (named in {args.config})" if args.config else ""
    check_command_output(args, cfg.output, kind="dir", overwrite=cfg.overwrite,
                         inputs=[(key + named, getattr(cfg, key)) for key in ("vlm", "aligned", "base", "mask")])
    result = merge_checkpoints(cfg, progress=not args.no_progress)
    t = result.recipe["tensors"]
    print(f"merged {t['merged']} tensors, copied {t['copied']} ({json.dumps(t['copied_by_reason'])}) "
          f"in {result.seconds:.1f}s -> {result.output}")
    push_from_args(args, result.output)
    return 0


def _merge_mask(args: argparse.Namespace) -> int:
    from vlmsafe.merge.localise import DEFAULT_INCLUDE, weight_difference_mask

    check_command_output(args, args.out, kind="file", file_example="mask.safetensors")
    summary = weight_difference_mask(args.vlm, args.aligned, args.out, fraction=args.top, scope=args.scope,
                                     include=args.include or DEFAULT_INCLUDE, progress=not args.no_progress,
                                     overwrite=args.overwrite)
    print(f"wrote {summary['tensors']} masks selecting {summary['selected_fraction']:.1%} -> {summary['path']}")
    return 0
