"""``python -m vlmsafe.cli.build_t2i_testbed``: the command line of :mod:`vlmsafe.testbed.t2i`.

The work is there; this module only reads the flags (all argparse code lives in :mod:`vlmsafe.cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from vlmsafe.cli.options import add_progress_option, add_seed_option
from vlmsafe.cli.parsing import add_parameter_flags, run_script, script_parser
from vlmsafe.cli.types import float_arg, int_arg
from vlmsafe.resources import bundled_asset
from vlmsafe.testbed import safeclip as tb
from vlmsafe.testbed.t2i import COND_NOISE, UNET_STEPS, T2IBuildConfig, build_t2i_testbed


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlmsafe.cli.build_t2i_testbed``: build the testbed (one torch thread, so a seed reproduces it)."""

    parser = script_parser(
        "vlmsafe.cli.build_t2i_testbed",
        "Build the bundled text-to-image testbed (tiny Stable Diffusion + scene classifier).",
    )
    parser.add_argument(
        "--out",
        default=str(bundled_asset("t2i")),
        help="where to write it (default: assets/t2i)",
    )
    parser.add_argument(
        "--clip",
        default=str(tb.default_assets_dir()),
        help="the Safe-CLIP testbed whose original text tower conditions the UNet (default: assets/safeclip)",
    )
    add_seed_option(parser, default=0)
    parser.add_argument("--renders", type=int_arg(low=1), default=8, help="random renders per training combination")
    parser.add_argument("--vae-steps", type=int_arg(low=1), default=300)
    parser.add_argument("--unet-steps", type=int_arg(low=1), default=UNET_STEPS)
    parser.add_argument("--classifier-steps", type=int_arg(low=1), default=400)
    parser.add_argument(
        "--cond-noise",
        type=float_arg(low=0, high=1),
        default=COND_NOISE,
        help="conditioning augmentation: noise on the text states, share of their RMS",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_progress_option(parser)
    add_parameter_flags(parser, {"out_dir": "--out"})  # build_t2i_testbed(out_dir)
    return run_script(parser, argv, _run)


def _run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    config = T2IBuildConfig(seed=args.seed, renders=args.renders, vae_steps=args.vae_steps,
                            unet_steps=args.unet_steps, classifier_steps=args.classifier_steps,
                            cond_noise=args.cond_noise)
    info = build_t2i_testbed(args.out, config, clip_dir=args.clip, overwrite=args.overwrite,
                             progress=not args.no_progress)
    print(f"built in {info['seconds']['total']} s wall, {info['cpu_seconds']} s CPU -> {args.out}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
