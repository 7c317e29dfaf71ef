"""The command line's parsers: vlmsafe's error format and help, subcommands and scripts, errors named as flags.

* :class:`ArgumentParser` / :class:`HelpFormatter` -- one line naming the problem and the fix on a usage error (exit
  code 2); every option's help states its default;
* :func:`add_command` -- one ``vlmsafe`` subcommand: its parser and the function that runs it;
* :func:`script_parser` / :func:`run_script` -- the ``python -m vlmsafe.cli.X`` maintainer scripts (testbed
  builders, checks): their parser, and their one-line errors with exit code 2;
* :func:`run_guarded` -- how every command and script runs: outputs held for the run
  (:func:`vlmsafe.output_locks.hold_outputs`), SIGTERM / SIGHUP ending it like Ctrl-C (:class:`Terminated`: the
  ``finally`` blocks remove a half-written output and its lock; exit code 128 + the signal's number), and a user
  error, an interrupt or a full disk as one line on stderr, never a traceback;
* :func:`flags_for_parameters` / :func:`add_parameter_flags` -- a library error names a parameter (```out_dir```),
  the command line names the flag that sets it (``--out``); :func:`flags_in_warnings` does the same for warnings.

The flags themselves are declared in :mod:`vlmsafe.cli.options`.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import re
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from vlmsafe.errors import VlmsafeError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help states its default: an option that takes a value and has a default its help does not
    already mention gets `` (default: VALUE)`` appended (argparse's ``ArgumentDefaultsHelpFormatter`` rule, minus
    its ``(default: None)`` / ``(default: False)`` noise: an option without a default says in its own help what
    happens without it, and a flag is off unless given). Descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.option_strings and action.nargs != 0 and not action.required
                and action.default not in (None, argparse.SUPPRESS) and "default" not in text.lower()):
            text += " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with vlmsafe's error format (one line naming the problem and the fix, exit code 2) and help
    that states every option's default (:class:`HelpFormatter`, also for subcommands that ask for argparse's
    plain or raw-description formatter)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("formatter_class") in (None, argparse.HelpFormatter, argparse.RawDescriptionHelpFormatter):
            kwargs["formatter_class"] = HelpFormatter
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def add_command(
    subparsers: Any, name: str, run: Callable[[argparse.Namespace], int | None] | None = None, *, help: str,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (``description``, ``epilog``... in ``kwargs``), run by ``run(args)``;
    ``run=None`` for a group of subcommands (``vlmsafe probe``). Its help keeps the description's line breaks and
    states every option's default (:class:`ArgumentParser`, the class argparse gives subparsers)."""
    parser = subparsers.add_parser(name, help=help, **kwargs)
    if run is not None:
        parser.set_defaults(func=run)
    return parser


def script_parser(module: str, description: str | None) -> argparse.ArgumentParser:
    """The parser of the ``python -m MODULE`` script: named as it is run, its description's line breaks kept."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


_PARAMETER = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`\s]+))?`")


def flags_for_parameters(message: str, parser: argparse.ArgumentParser) -> str:
    """A library error message as the command line says it: a backticked parameter of the library
    (```text_encoder_2```) becomes the flag that sets it (``--text-encoder-2``).

    A backticked setting (```overwrite=True```, ```resume_from='latest'```) becomes the flag alone where the flag
    stores that value (``--overwrite``), else the flag and the value (``--resume latest``). The flag is found
    from the command's own parser (the option whose ``dest`` is the parameter, or the one a command maps it, or a
    whole setting such as ``"image=blank_image()"``, to with ``set_defaults(parameter_flags={...})``); a
    backticked name no flag sets is left as it is.
    """
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    flags = {dest: next((o for o in a.option_strings if o.startswith("--")), a.option_strings[0])
             for dest, a in actions.items()}
    flags.update(parser.get_default("parameter_flags") or {})
    by_flag = {o: a for a in actions.values() for o in a.option_strings}

    def flag(m: re.Match[str]) -> str:
        name, value = m[1], m[2]
        if value is not None and f"{name}={value}" in flags:  # a setting the command maps as a whole
            return flags[f"{name}={value}"]
        if name not in flags:
            return m[0]
        if value is None:
            return flags[name]
        action = by_flag.get(flags[name])
        if action is not None and action.nargs == 0:  # a switch: it says the value by being there, or cannot
            return flags[name] if value == repr(action.const) else m[0]
        value = value.strip("'\"")  # `resume_from='latest'`: the shell's word is latest
        return f"{flags[name]} {value}"

    return _PARAMETER.sub(flag, message)


@contextlib.contextmanager
def flags_in_warnings(parser: argparse.ArgumentParser) -> Iterator[None]:
    """While a command runs, a warning is one stderr line, ``PROG: warning: MESSAGE`` (Python's display is two, with
    a source path and line of code the user did not write), a library warning that names a parameter
    (```max_length```) showing the flag that sets it (``--max-length``), as errors do (:func:`flags_for_parameters`);
    a warning of another kind than ``UserWarning`` (PIL's ``DecompressionBombWarning``) keeps its kind's name. The
    message is translated before it reaches the display, so a recorder (``warnings.catch_warnings``, pytest) sees
    it too; only the text format is replaced. Both are restored afterwards."""
    previous, previous_format = warnings.showwarning, warnings.formatwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        previous(flags_for_parameters(str(message), parser), category, filename, lineno, file, line)

    def one_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 line: str | None = None) -> str:
        kind = "" if category is UserWarning else f"({category.__name__}) "
        return f"{parser.prog}: warning: {kind}{' '.join(str(message).split())}\n"

    warnings.showwarning, warnings.formatwarning = show, one_line
    try:
        yield
    finally:
        warnings.showwarning, warnings.formatwarning = previous, previous_format


def add_parameter_flags(parser: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    """Name ``parser``'s flag for library parameters whose name is not the flag's ``dest`` (``{"out_dir": "--out"}``,
    or a whole setting: ``{"image=blank_image()": "--blank-image"}``), added to those already mapped: how
    :func:`flags_for_parameters` translates a library error for this command."""
    parser.set_defaults(parameter_flags={**(parser.get_default("parameter_flags") or {}), **flags})


def run_script(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, work: Callable[[argparse.Namespace], int | None]
) -> int:
    """A script's ``main``: parse ``argv`` and run ``work(args)`` as the ``vlmsafe`` command runs its commands
    (:func:`run_guarded`): a user error is one line ``PROG: error: MESSAGE`` on stderr and exit code 2, with the
    library's parameters named as the script's flags (:func:`flags_for_parameters`); outputs stay locked for the
    run; SIGTERM, SIGHUP and Ctrl-C remove a half-written output and exit with 128 + the signal's number."""
    args = parser.parse_args(argv)
    return run_guarded(parser.prog, parser, lambda: work(args))


# --------------------------------------------------------------------------- running a command
class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: raised like Ctrl-C's KeyboardInterrupt, so the same clean-up runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once (the clean-up is cut short)
    raise Terminated(signum)


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into :class:`Terminated` while a command runs (main thread only; a signal that is
    ignored, e.g. SIGHUP under nohup, stays ignored); the previous handlers are put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is signal.SIG_DFL:
            previous[signum] = signal.signal(signum, _terminate)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_guarded(prefix: str, parser: argparse.ArgumentParser, work: Callable[[], int | None]) -> int:
    """Run ``work()`` as one command and return its exit code; ``prefix`` starts its error lines (``vlmsafe merge``,
    ``python -m vlmsafe.cli.build_unseen``), ``parser`` names the flags that library errors and warnings mean."""
    from vlmsafe.output_locks import hold_outputs

    try:
        with terminate_cleanly(), hold_outputs(), flags_in_warnings(parser):  # outputs stay the command's own
            return int(work() or 0)
    except VlmsafeError as exc:
        message = flags_for_parameters(" ".join(str(exc).split()), parser)  # one line
        print(f"{prefix}: error: {message}", file=sys.stderr)
        return 2
    except Terminated as exc:
        print(f"terminated ({signal.Signals(exc.signum).name})", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(f"{prefix}: error: {exc.strerror or exc}{where}; free space (or quota) there, or choose an output "
              "location with room", file=sys.stderr)
        return 2
