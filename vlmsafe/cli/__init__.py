"""The ``vlmsafe`` command line.

All argparse code lives in this package: this router, :mod:`vlmsafe.cli.options` (the flags shared by
several commands, and the engine that turns dataclass fields into flags) and one module per command
(``vlmsafe.cli.steering``: calibrate, generate; ``.eval``; ``.merge``; ``.convert``; ``.safeclip``;
``.demo``; ``.probe``), each registering its subcommands through ``register(subparsers)`` (see
``_SUBCOMMAND_MODULES``). The library below never parses arguments; its errors name parameters
(in backticks: ```text_encoder_2```) and :func:`flags_for_parameters` names the command's flag instead.
User errors (:class:`vlmsafe.errors.VlmsafeError`) are printed as one clear message, exit code 2; so is a
full disk or quota. SIGTERM and SIGHUP end a command like Ctrl-C does (``finally`` blocks run, so a
half-written output's temporary is removed), with exit code 128 + the signal's number
(:func:`vlmsafe.cli.parsing.run_guarded`, which the ``python -m vlmsafe.cli.X`` scripts share).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vlmsafe import __version__
from vlmsafe.cli.parsing import ArgumentParser, run_guarded
from vlmsafe.cli.parsing import Terminated as Terminated  # re-exported
from vlmsafe.cli.parsing import flags_for_parameters as flags_for_parameters  # re-exported

#: Modules that contribute subcommands, in --help order. Each defines ``register(subparsers)``.
_SUBCOMMAND_MODULES = (
    "vlmsafe.cli.demo",  # demo
    "vlmsafe.cli.steering",  # calibrate, generate
    "vlmsafe.cli.eval",  # evaluate
    "vlmsafe.cli.merge",  # merge
    "vlmsafe.cli.convert",  # convert-llava
    "vlmsafe.cli.safeclip",  # safeclip train|eval|pairs
    "vlmsafe.cli.probe",  # probe layers|shift|weights
)

#: The capability package each command module needs: a build without it has no such subcommand.
_CAPABILITIES = {
    "vlmsafe.cli.demo": "vlmsafe.demo",
    "vlmsafe.cli.steering": "vlmsafe.steering",
    "vlmsafe.cli.eval": "vlmsafe.eval",
    "vlmsafe.cli.merge": "vlmsafe.merge",
    "vlmsafe.cli.convert": "vlmsafe.convert",
    "vlmsafe.cli.safeclip": "vlmsafe.safeclip",
    "vlmsafe.cli.probe": "probes",
}


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
            if exc.name and (name.startswith(exc.name) or _CAPABILITIES.get(name, name).startswith(exc.name)):
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
    code = 1
    command = _command_parser(parser, argv)  # the parser whose flags the command's messages name
    try:
        code = run_guarded(f"vlmsafe {args.command}", command, lambda: args.func(args))
        return code
    finally:
        if "torch" in sys.modules:  # under torchrun / accelerate launch: leave the process group cleanly
            from vlmsafe.distributed import shutdown

            shutdown(barrier=code == 0)
