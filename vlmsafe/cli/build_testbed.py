"""``python -m vlmsafe.cli.build_testbed``: the command line of :mod:`vlmsafe.testbed.build`.

The work is there; this module only reads the flags (all argparse code lives in :mod:`vlmsafe.cli`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vlmsafe.cli.options import add_seed_option
from vlmsafe.errors import VlmsafeError
from vlmsafe.testbed import build as _module
from vlmsafe.testbed.build import BuildConfig, build_testbed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m vlmsafe.cli.build_testbed",
        description=_module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default="assets/testbed", help="output folder (written atomically)")
    add_seed_option(ap, default=0, help="seed of data, splits and training")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    args = ap.parse_args(argv)
    try:
        info = build_testbed(
            args.out,
            BuildConfig(seed=args.seed),
            overwrite=args.overwrite,
            log=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except VlmsafeError as exc:
        print(f"{ap.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: info[k] for k in ("timings_s", "final_losses", "total_size_bytes")}, indent=1))
    print(f"measure it: python -m vlmsafe.demo.check --testbed {args.out} --write")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
