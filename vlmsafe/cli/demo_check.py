"""``python -m vlmsafe.cli.demo_check``: the command line of :mod:`vlmsafe.demo.check`.

The work is there; this module only reads the flags (all argparse code lives in :mod:`vlmsafe.cli`).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from vlmsafe.cli.parsing import run_script, script_parser
from vlmsafe.demo import check as _module
from vlmsafe.demo.check import measure_testbed, record, weight_changes
from vlmsafe.demo.table import format_table, update_readme
from vlmsafe.testbed import testbed_dir


def main(argv: Sequence[str] | None = None) -> int:
    ap = script_parser("vlmsafe.cli.demo_check", _module.__doc__)
    ap.add_argument("--testbed", default=None, help="testbed folder (default: the bundled assets/testbed)")
    ap.add_argument("--unseen", default=None, metavar="JSONL", help="also measure this independent check set")
    ap.add_argument(
        "--write", action="store_true", help="record the figures in the testbed's build_info.json and README.md"
    )
    ap.add_argument(
        "--readme", default=None, metavar="README", help="regenerate the demo block of this README and its figures"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return run_script(ap, argv, _run)


def _run(args: argparse.Namespace) -> None:
    root = testbed_dir(args.testbed)
    figures = Path(args.readme).resolve().parent / "assets" / "readme" if args.readme else None
    report = measure_testbed(root, figures=figures, progress=not args.quiet)
    unseen = measure_testbed(root, test=args.unseen, progress=not args.quiet) if args.unseen else None
    if args.write:
        record(root, report, unseen)
    if args.readme:
        update_readme(args.readme, report, weight_changes(root))
    print(format_table(report["rows"]))
    if unseen is not None:
        print("\nindependent check set:\n" + format_table(unseen["rows"]))
    print(json.dumps({"seconds": report["seconds"]}))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
