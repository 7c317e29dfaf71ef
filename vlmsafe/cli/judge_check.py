"""How far can a judge be trusted? Its agreement with responses labelled by hand.

``python -m vlmsafe.cli.judge_check FILE... [--match MODE] [--errors]``. The check itself is
:mod:`vlmsafe.eval.judge_check`; this module only reads the command line.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vlmsafe.cli.parsing import run_script, script_parser
from vlmsafe.eval.judge_check import judge_agreement, load_labelled_responses
from vlmsafe.eval.refusal import RefusalJudge


def main(argv: Sequence[str] | None = None) -> int:
    parser = script_parser("vlmsafe.cli.judge_check", __doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", help="labelled-response JSONL files")
    parser.add_argument("--match", choices=("opening", "anywhere", "prefix"), default="opening",
                        help="RefusalJudge mode (default: opening)")  # fmt: skip
    parser.add_argument("--errors", action="store_true", help="also list every disagreement")
    return run_script(parser, argv, _run)


def _run(args: argparse.Namespace) -> None:
    judge = RefusalJudge(match=args.match)
    for path in args.files:
        agreement = judge_agreement(judge, load_labelled_responses(path))
        print(agreement.to_markdown(title=f"{path} (RefusalJudge, match={args.match!r})"))
        if args.errors:
            for r, p in agreement.errors:
                print(f"- {r.id} [{r.style}] labelled {r.label}, judged {p}: {r.response[:100]!r}")
            print()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
