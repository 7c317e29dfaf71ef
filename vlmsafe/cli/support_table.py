"""``python -m vlmsafe.cli.support_table [--write README.md]``: print the README's support block, or write it
between the SUPPORT-TABLE markers of a README (the work is in :mod:`vlmsafe.testing.coverage`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmsafe.cli.support_table", description=__doc__)
    ap.add_argument("--write", default=None, metavar="README",
                    help="replace the block between this README's SUPPORT-TABLE markers (default: print the block)")
    args = ap.parse_args(argv)
    from vlmsafe.testing.coverage import readme_block, write_readme

    if args.write:
        try:
            write_readme(args.write)
        except (OSError, ValueError) as exc:  # no such file, or no SUPPORT-TABLE markers in it
            print(f"{ap.prog}: error: cannot write the block into {args.write} ({exc}); give a README with "
                  "<!-- SUPPORT-TABLE-START --> and <!-- SUPPORT-TABLE-END --> lines", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(readme_block())
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
