"""``python -m vlmsafe.cli.build_unseen``: the command line of :mod:`vlmsafe.testbed.unseen`.

The work is there; this module only reads the flags (all argparse code lives in :mod:`vlmsafe.cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vlmsafe.cli.options import add_seed_option
from vlmsafe.cli.parsing import run_script, script_parser
from vlmsafe.cli.types import seed_arg
from vlmsafe.testbed import unseen as _module
from vlmsafe.testbed.unseen import make_unseen_set


def main(argv: Sequence[str] | None = None) -> int:
    ap = script_parser("vlmsafe.cli.build_unseen", _module.__doc__)
    ap.add_argument("--out", required=True, help="output folder")
    add_seed_option(ap, default=1, help="seed of templates, images and sampling")
    ap.add_argument("--build-seed", type=seed_arg(), default=0, help="the testbed's build seed")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    return run_script(ap, argv, _run)


def _run(args: argparse.Namespace) -> None:
    print(make_unseen_set(args.out, seed=args.seed, build_seed=args.build_seed, overwrite=args.overwrite))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
