"""The ``vlmsafe`` command line.

Each capability registers its own subcommands through a ``register(subparsers)`` function in a
``cli`` module of its subpackage (see ``_SUBCOMMAND_MODULES``), so this file stays a thin router.
User errors (:class:`vlmsafe.errors.VlmsafeError`) are printed as one clear message, exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vlmsafe import __version__
from vlmsafe.cli_options import ArgumentParser
from vlmsafe.errors import VlmsafeError

#: Modules that contribute subcommands, in --help order. Each defines ``register(subparsers)``.
_SUBCOMMAND_MODULES = (
    "vlmsafe.demo.cli",  # demo
    "vlmsafe.steering.cli",  # calibrate, generate
    "vlmsafe.eval.cli",  # evaluate
    "vlmsafe.merge.cli",  # merge
    "vlmsafe.convert.cli",  # convert-llava
    "vlmsafe.safeclip.cli",  # safeclip train|eval|pairs
    "probes.cli",  # probe layers|shift|weights
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="vlmsafe",
        description=(
            "Make vision-language models safer. Start with `vlmsafe demo` (bundled tiny LLaVA, no "
            "downloads), then `vlmsafe calibrate` + `vlmsafe generate` on your own model."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"vlmsafe {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a capability not installed in this build
            if exc.name and name.startswith(exc.name):
                continue
            raise
        module.register(subparsers)
    return parser


def _command_parser(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.ArgumentParser:
    """The (sub)parser of the command ``argv`` names (``vlmsafe safeclip train ...`` -> the ``train`` one)."""
    for token in argv:
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions or token not in actions[0].choices:
            break
        parser = actions[0].choices[token]
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extras = parser.parse_known_args(argv)
        if extras:  # reported by the command's own parser, so the hint names its --help
            _command_parser(parser, argv).error(f"unrecognized arguments: {' '.join(extras)}")
    except SystemExit as exc:  # a usage error (already printed as one line): return its code; --help exits 0
        if exc.code in (0, None):
            raise
        return int(exc.code) if isinstance(exc.code, int) else 2
    if not getattr(args, "func", None):  # `vlmsafe`, `vlmsafe safeclip`, ...: a group without its command
        group = _command_parser(parser, argv)
        actions = [a for a in group._actions if isinstance(a, argparse._SubParsersAction)]
        choices = ", ".join(actions[0].choices) if actions else ""
        print(f"{group.prog}: error: name a command ({choices}); see `{group.prog} --help`", file=sys.stderr)
        return 2
    ok = False
    try:
        code = int(args.func(args) or 0)
        ok = code == 0
        return code
    except VlmsafeError as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"vlmsafe {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:  # under torchrun / accelerate launch: leave the process group cleanly
            from vlmsafe.distributed import shutdown

            shutdown(barrier=ok)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
