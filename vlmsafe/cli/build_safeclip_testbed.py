"""``python -m vlmsafe.cli.build_safeclip_testbed``: the command line of :mod:`vlmsafe.testbed.safeclip`.

The work is there; this module only reads the flags (all argparse code lives in :mod:`vlmsafe.cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from vlmsafe.cli.options import add_seed_option
from vlmsafe.cli.parsing import add_parameter_flags, run_script, script_parser
from vlmsafe.cli.types import float_arg
from vlmsafe.testbed.safeclip import TOKEN_WEIGHT, build_testbed, default_assets_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = script_parser(
        "vlmsafe.cli.build_safeclip_testbed",
        "Build the bundled Safe-CLIP testbed (tiny CLIP + Safe-CLIP fine-tune) from synthetic scenes.",
    )
    parser.add_argument(
        "out_dir", nargs="?", default=str(default_assets_dir()), help="where to write it (default: assets/safeclip)"
    )
    add_seed_option(parser, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=1000)
    parser.add_argument("--train-renders", type=int, default=10, help="random renders per training combination")
    parser.add_argument("--token-weight", type=float_arg(low=0), default=TOKEN_WEIGHT, metavar="X",
                        help=f"text_safe_tokens loss weight (default {TOKEN_WEIGHT:g}; 0: only the paper's 8 terms)")
    parser.add_argument("--reuse-original", action="store_true",
                        help="keep OUT_DIR/original byte for byte and redo only the Safe-CLIP stage from it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing non-empty OUT_DIR (rebuilding the bundled testbed needs it)")
    add_parameter_flags(parser, {"out_dir": "OUT_DIR"})  # build_testbed(out_dir)
    return run_script(parser, argv, _run)


def _run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)  # tiny matrices: one thread is faster than two on a shared machine
    info = build_testbed(
        args.out_dir, seed=args.seed, pretrain_steps=args.pretrain_steps, train_renders=args.train_renders,
        token_weight=args.token_weight, reuse_original=args.reuse_original, overwrite=args.overwrite,
    )
    print(f"built in {info['total_seconds']} s -> {args.out_dir}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
