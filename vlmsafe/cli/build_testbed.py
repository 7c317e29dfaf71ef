"""``python -m vlmsafe.cli.build_testbed``: the command line of :mod:`vlmsafe.testbed.build`.

The work is there; this module only reads the flags (all argparse code lives in :mod:`vlmsafe.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vlmsafe.cli.options import add_seed_option
from vlmsafe.cli.parsing import run_script, script_parser
from vlmsafe.testbed import build as _module
from vlmsafe.testbed.build import BuildConfig, build_testbed


def main(argv: Sequence[str] | None = None) -> int:
    ap = script_parser("vlmsafe.cli.build_testbed", _module.__doc__)
    ap.add_argument("--out", default="assets/testbed", help="output folder (written atomically)")
    add_seed_option(ap, default=0, help="seed of data, splits and training")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    return run_script(ap, argv, _run)


def _run(args: argparse.Namespace) -> None:
    info = build_testbed(
        args.out,
        BuildConfig(seed=args.seed),
        overwrite=args.overwrite,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(json.dumps({k: info[k] for k in ("timings_s", "final_losses", "total_size_bytes")}, indent=1))
    print(f"measure it: python -m vlmsafe.cli.demo_check --testbed {args.out} --write")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
