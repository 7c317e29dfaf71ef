"""Option groups shared by the ``vlmsafe`` commands, so each flag is defined once.

* :func:`add_model_options` / :func:`load_model_from_args` -- ``--model --dtype --device --device-map``
  (:func:`add_dtype_option` and :func:`add_device_option` are the only definitions of ``--dtype`` and ``--device``);
* :func:`add_steering_options` / :func:`steering_from_args` -- the CMRM and ShiftDC flags, built from
  :class:`vlmsafe.steering.SteeringConfig`'s field help;
* :func:`add_anchor_options` -- ``--anchor --anchor-colour --anchor-seed`` (CMRM's anchor image);
* :func:`add_output_options` -- ``--out`` and ``--overwrite``; :func:`add_input` marks an option as something the
  command reads, and :func:`check_command_output` checks an output against every input (marked options, paths
  named inside data and config files) before any work (see :func:`vlmsafe.io.check_output`);
* :func:`add_push_options` / :func:`check_push_args` / :func:`push_from_args` -- ``--push-to-hub REPO_ID``
  (``--hub-private``, ``--hub-token``) on the commands that write shareable artefacts;
* :func:`add_progress_option` -- ``--no-progress`` (``--quiet`` is kept as a hidden alias);
* :func:`add_data_options` -- ``--data --limit --batch-size``;
* :func:`add_options` / :func:`options_from_args` -- one flag per option field of a config dataclass
  (help, range and default declared once, in the field: :mod:`vlmsafe.options`);

The parsers themselves (vlmsafe's error format and help, subcommands, scripts, library errors named as flags) are
:mod:`vlmsafe.cli.parsing`.

Numbers are checked at parse time (:mod:`vlmsafe.validation`): ``--alpha nan`` or ``--limit -1``
never reach a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from vlmsafe.cli.parsing import add_parameter_flags
from vlmsafe.cli.types import colour_arg, csv_arg, float_arg, int_arg, layer_spec_arg, seed_arg, unit_pair_arg
from vlmsafe.errors import InputError
from vlmsafe.inputs import check_file_name
from vlmsafe.inputs import check_named_inputs as check_named_inputs  # re-exported: the commands' one import
from vlmsafe.options import option_fields


# --------------------------------------------------------------------------- model
def add_dtype_option(parser: Any, *, help: str, auto: bool = False) -> None:
    """``--dtype``: the names of the one dtype table (:mod:`vlmsafe.dtypes`); ``auto`` adds the checkpoint's own.

    The default is always "not given" (None): each command's help says what that means for it.
    """
    from vlmsafe.dtypes import DTYPE_NAMES

    parser.add_argument("--dtype", default=None, choices=(*DTYPE_NAMES, *(("auto",) if auto else ())), help=help)


def add_device_option(parser: Any) -> None:
    """``--device``: where the weights run (default None: the CPU, see :func:`vlmsafe.loading.resolve_device`)."""
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu, auto (default: cpu)")


def add_seed_option(parser: Any, *, default: int | None = 0, help: str | None = None) -> None:
    """``--seed``: an integer in ``[0, 2**32 - 1]`` (what every random generator vlmsafe seeds accepts)."""
    parser.add_argument("--seed", type=seed_arg(), default=default, help=help)


def add_batch_size_option(parser: Any, *, default: int | None, help: str) -> None:
    """``--batch-size N``: a positive count; the default and what is batched are the command's."""
    parser.add_argument("--batch-size", type=int_arg(low=1), default=default, metavar="N", help=help)


def add_model_options(parser: argparse.ArgumentParser, *, help: str | None = None) -> None:
    """``--model`` (required), ``--dtype``, ``--device``, ``--device-map``."""
    g = parser.add_argument_group("model")
    add_input(g, "--model", required=True, metavar="DIR",
              help=help or "model folder written by save_pretrained (model + processor)")
    add_dtype_option(g, auto=True, help="load the weights in this dtype (default float32; auto = the checkpoint's)")
    add_device_option(g)
    g.add_argument("--device-map", default=None, metavar="MAP",
                   help="dispatch a model too large for one device with accelerate: auto, balanced or sequential "
                        "(default: none, the whole model on --device)")


def load_model_from_args(args: argparse.Namespace, *, kind: str = "auto", device: Any = None,
                         adapter: str | None = None) -> tuple[Any, Any]:
    """Load ``--model`` with the shared loader, from the :class:`~vlmsafe.loading.ModelConfig` its flags make
    (``device`` overrides ``--device``, e.g. a process's GPU; ``adapter``: a peft adapter folder on top)."""
    from transformers.utils import logging as hf_logging

    from vlmsafe.loading import ModelConfig, load_model

    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars: noise next to vlmsafe's own progress
    config = ModelConfig(args.model, dtype=args.dtype, device=device if device is not None else args.device,
                         device_map=getattr(args, "device_map", None))
    return load_model(config, kind=kind, adapter=adapter)


# --------------------------------------------------------------------------- steering
#: ``--anchor`` for ``calibrate``: the anchor of the calibration passes (the config field's help is sample-level's).
CALIBRATE_ANCHOR_HELP = (
    "the image each item's shift is measured with: real (its own image), blank (a uniform image, as in the CMRM "
    "paper) or noise (seeded uniform noise); with blank/noise the items need no images, a list of prompts is a "
    "calibration set (default real)")


def add_anchor_options(group: Any, *, sample_level: bool = True) -> None:
    """``--anchor {real,blank,noise}``, ``--anchor-colour R,G,B`` and ``--anchor-seed N`` (defaults applied later).

    ``sample_level``: the anchor of sample-level steering (``generate``, ``evaluate``: "with --sample-level: ..."),
    else of calibration (``calibrate``), whose help says what the anchor does there."""
    from vlmsafe.steering.config import field_help

    anchor_help = ("with --sample-level: " + field_help("anchor").removeprefix("sample-level: ") + " (default real)"
                   if sample_level else CALIBRATE_ANCHOR_HELP)
    group.add_argument("--anchor", choices=("real", "blank", "noise"), default=None, help=anchor_help)
    group.add_argument("--anchor-colour", type=colour_arg, default=None, metavar="R,G,B",
                       help=field_help("anchor_colour"))
    group.add_argument("--anchor-seed", type=seed_arg(), default=None, metavar="N", help=field_help("anchor_seed"))


def anchor_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``anchor``, ``anchor_colour``, ``anchor_seed`` from the flags; a colour for a non-blank anchor (or a seed
    for a non-noise one) is an error, since it would be ignored."""
    from vlmsafe.images import BLANK_COLOUR, NOISE_SEED

    anchor = args.anchor or "real"
    if args.anchor_colour is not None and anchor != "blank":
        raise InputError(f"--anchor-colour applies to --anchor blank, but the anchor is {anchor}; "
                         "drop it or use --anchor blank")
    if args.anchor_seed is not None and anchor != "noise":
        raise InputError(f"--anchor-seed applies to --anchor noise, but the anchor is {anchor}; "
                         "drop it or use --anchor noise")
    return {"anchor": anchor, "anchor_colour": args.anchor_colour or BLANK_COLOUR,
            "anchor_seed": NOISE_SEED if args.anchor_seed is None else args.anchor_seed}


def add_steering_options(
    parser: argparse.ArgumentParser,
    *,
    layers_flag: str = "--layers",
    positions_flag: str = "--positions",
    title: str = "steering (CMRM / ShiftDC)",
) -> None:
    """The steering flags; defaults are applied by :func:`steering_from_args` so it can tell what was given."""
    from vlmsafe.steering.choices import DEFAULT_ALPHA, STEER_POSITIONS
    from vlmsafe.steering.config import MAX_ALPHA, field_help

    g = parser.add_argument_group(title)
    src = g.add_mutually_exclusive_group()
    add_input(src, "--vectors", metavar="DIR", help=field_help("vectors") + " (default: none, unsteered)")
    src.add_argument("--sample-level", action="store_true",
                     help="sample-level CMRM: each input's shift from its own text-only counterpart "
                          "(one extra text-only pass)")
    add_input(src, "--shiftdc", metavar="DIR", help=field_help("directions") + " (default: none)")
    g.add_argument("--alpha", type=float_arg(low=0.0, high=MAX_ALPHA), default=None,
                   help=field_help("alpha") + f" (default {DEFAULT_ALPHA})")
    g.add_argument(layers_flag, dest="steer_layers", type=layer_spec_arg, default=None, metavar="LAYERS",
                   help=field_help("layers"))
    g.add_argument(positions_flag, dest="steer_positions", choices=STEER_POSITIONS, default=None,
                   help=field_help("positions") + " (default last)")
    g.add_argument("--decode", action="store_true", default=None, help=field_help("decode"))
    g.add_argument("--strict-model", action="store_true", help=field_help("strict_model"))
    add_anchor_options(g)
    g.add_argument("--shift-from", choices=("unsteered", "running"), default=None,
                   help="with --shiftdc: " + field_help("shift_from").removeprefix("ShiftDC: ")
                   + " (default unsteered)")
    # SteeringConfig's fields, as this command's flags (probe keeps --layers for its own analysis)
    add_parameter_flags(parser, {"directions": "--shiftdc", **({"layers": layers_flag, "positions": positions_flag}
                                                               if layers_flag == "--layers" else {})})


def steering_from_args(args: argparse.Namespace, model: Any | None = None, *, flags: Sequence[str] = ()) -> Any:
    """The :class:`~vlmsafe.steering.SteeringConfig` the flags describe (inactive without a source).

    Steering flags given without ``--vectors`` / ``--sample-level`` are an error: they would be
    ignored silently. ``model`` validates the vectors against it when given.
    """
    from vlmsafe.steering import SafetyDirections, ShiftVectors, SteeringConfig

    vectors_dir = getattr(args, "vectors", None)
    shiftdc_dir = getattr(args, "shiftdc", None)
    sample = bool(getattr(args, "sample_level", False))
    given = [name for name, value in (("--alpha", args.alpha), (flags[0] if flags else "--layers", args.steer_layers),
                                      (flags[1] if len(flags) > 1 else "--positions", args.steer_positions),
                                      ("--decode", args.decode)) if value is not None]
    anchor_flags = [flag for flag, dest in (("--anchor", "anchor"), ("--anchor-colour", "anchor_colour"),
                                            ("--anchor-seed", "anchor_seed")) if getattr(args, dest, None) is not None]
    if anchor_flags and not sample:
        raise InputError(f"{', '.join(anchor_flags)} choose(s) the sample-level anchor image; add --sample-level, "
                         "or for dataset-level vectors calibrate with `vlmsafe calibrate --anchor`")
    if getattr(args, "shift_from", None) is not None and not shiftdc_dir:
        raise InputError("--shift-from applies to ShiftDC; add --shiftdc DIR or drop it")
    if getattr(args, "strict_model", False) and not vectors_dir and not shiftdc_dir:
        raise InputError("--strict-model checks calibrated --vectors or --shiftdc directions against the model; add "
                         "one of them or drop it")
    if not vectors_dir and not sample and not shiftdc_dir:
        if given:
            raise InputError(f"{', '.join(given)} set(s) steering, but no steering source was given; "
                             "add --vectors DIR (dataset-level), --sample-level or --shiftdc DIR")
        return SteeringConfig()
    vectors = ShiftVectors.load(vectors_dir, model=model) if vectors_dir else None
    directions = SafetyDirections.load(shiftdc_dir, model=model) if shiftdc_dir else None
    anchor = anchor_from_args(args) if sample and hasattr(args, "anchor") else {}
    alpha, layers = args.alpha, args.steer_layers
    rec = (vectors.meta.get("recommended") or {}) if vectors is not None else {}
    if rec.get("status") == "tuned" and (alpha is None or layers is None):  # the setting calibrate chose
        recorded = vectors.recorded_setting()
        alpha = recorded["alpha"] if alpha is None else alpha
        layers = recorded["layers"] if layers is None else layers
        print(f"vlmsafe: steering with the setting recommended at calibration (alpha {alpha:g}, layers "
              f"{'all' if layers is None else layers}); --alpha / --layers override it", file=sys.stderr)
    return SteeringConfig(
        mode="dataset" if vectors is not None else "shiftdc" if directions is not None else "sample",
        vectors=vectors,
        directions=directions,
        **({} if alpha is None else {"alpha": alpha}),  # the config's default otherwise
        layers=layers,
        positions=args.steer_positions or "last",
        decode=bool(args.decode),
        shift_from=getattr(args, "shift_from", None) or "unsteered",
        strict_model=bool(getattr(args, "strict_model", False)),
        **anchor,
    )


# --------------------------------------------------------------------------- output, progress, data
def add_output_options(
    parser: argparse.ArgumentParser, *, flag: str = "--out", dest: str | None = None, required: bool = True,
    default: str | None = None, help: str = "output folder",
) -> None:
    """The output path flag plus ``--overwrite`` (an existing non-empty output is refused without it)."""
    kwargs: dict[str, Any] = {"required": required, "help": help}
    if default is not None:
        kwargs = {"default": default, "help": help}
    if dest is not None:
        kwargs["dest"] = dest
    parser.add_argument(flag, **kwargs)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output "
                             "(by default an existing non-empty output is refused before any work)")


# --------------------------------------------------------------------------- inputs: the output policy's other half
#: Parser default under which :func:`add_input` records the options that name what a command reads.
INPUTS_KEY = "vlmsafe_inputs"


def add_input(container: Any, *names: str, path_of: Callable[[str], str | None] | None = None,
              label: str | None = None, **kwargs: Any) -> argparse.Action:
    """``container.add_argument(*names, **kwargs)`` for an option (or positional) that names something the command
    reads -- a model, a data file, a config, a folder of images -- recorded so that :func:`command_inputs` finds it.

    Inputs are marked where they are declared rather than listed by name elsewhere: a new input option cannot be
    forgotten by the output check. ``path_of`` maps a value to the path it names when the value is not a bare path
    (``--judge llamaguard:DIR`` -> ``DIR``; ``None``: the value names no local path). ``label`` names the input in
    messages (default: the longest flag, or a positional's metavar).
    """
    action = container.add_argument(*names, **kwargs)
    mark_input(container, action, path_of=path_of, label=label)
    return action


def mark_input(container: Any, action: argparse.Action, *, path_of: Callable[[str], str | None] | None = None,
               label: str | None = None) -> None:
    """Record an already added ``action`` as an input of ``container``'s command (see :func:`add_input`)."""
    if label is None:
        label = max(action.option_strings, key=len) if action.option_strings else (
            action.metavar if isinstance(action.metavar, str) else action.dest.upper())
    # an argument group shares its parser's defaults: the record lands on the command's parser
    marked = tuple(container.get_default(INPUTS_KEY) or ())
    container.set_defaults(**{INPUTS_KEY: (*marked, (action.dest, label, path_of))})


def command_inputs(args: argparse.Namespace) -> list[tuple[str, str]]:
    """The ``(--flag, path)`` inputs of a parsed command that exist on disk (every option declared with
    :func:`add_input`, positionals included), for :func:`vlmsafe.io.check_output`'s ``inputs``: an output there
    would replace or mix into them. A value that is no local path (a Hub id) is skipped."""
    out = []
    for dest, label, path_of in getattr(args, INPUTS_KEY, None) or ():
        value = getattr(args, dest, None)
        for v in value if isinstance(value, (list, tuple)) else (value,):
            if not isinstance(v, (str, os.PathLike)) or not os.fspath(v):
                continue
            path = path_of(os.fspath(v)) if path_of is not None else os.fspath(v)
            if path and os.path.lexists(os.path.expanduser(path)):
                out.append((label, path))
    return out



def check_command_output(
    args: argparse.Namespace,
    path: str | os.PathLike[str],
    *,
    kind: Literal["dir", "file"],
    option: str = "--out",
    overwrite: bool | None = None,
    inputs: Iterable[tuple[str, str | os.PathLike[str] | None]] = (),
    file_example: str = "out.json",
) -> Path:
    """The one output check of a command, before any work: :func:`vlmsafe.io.check_output` against *every* input.

    Inputs are the options marked with :func:`add_input` (:func:`command_inputs`) and the ``inputs`` the command
    resolved itself (a default testbed, the paths a config file names). An output that is, holds or lies in any of
    them is refused with or without ``--overwrite``; a file output named like a folder (``dir/``) is refused instead
    of becoming a file called ``dir``. ``overwrite`` defaults to ``args.overwrite``. The images a data file names
    are checked by :func:`check_named_inputs` once the command has read the file (no file is read twice).
    """
    from vlmsafe.io import check_output

    if kind == "file":
        check_file_name(path, option=option, example=file_example)
    every = [*command_inputs(args), *((r, p) for r, p in inputs if p is not None)]
    if overwrite is None:
        overwrite = bool(getattr(args, "overwrite", False))
    check_output(path, kind=kind, overwrite=overwrite, option=option, inputs=every)
    return Path(os.path.expanduser(os.fspath(path)))


# --------------------------------------------------------------------------- sharing: --push-to-hub
def add_push_options(parser: argparse.ArgumentParser, *, what: str) -> None:
    """``--push-to-hub REPO_ID``, ``--hub-private``, ``--hub-token TOKEN`` (:func:`vlmsafe.cards.push_to_hub`'s
    ``private`` and ``token``): upload ``what`` with its model card once it is written, as transformers'
    ``push_to_hub=True`` does. Checked by :func:`check_push_args` before the work, pushed by
    :func:`push_from_args` after the atomic write."""
    g = parser.add_argument_group("sharing on the Hugging Face Hub")
    g.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help=f"once {what} is written, upload it with its model card to this Hub repository "
                        "(user-or-org/name, created if missing; default: none, nothing is uploaded)")
    g.add_argument("--hub-private", action="store_true",
                   help="with --push-to-hub: create the repository private (an existing one keeps its visibility)")
    g.add_argument("--hub-token", metavar="TOKEN", default=None,
                   help="with --push-to-hub: a Hub token with write access (default: the one `hf auth login` "
                        "stored, or $HF_TOKEN)")


def check_push_args(args: argparse.Namespace) -> None:
    """Before the work: ``--hub-private`` / ``--hub-token`` need ``--push-to-hub`` (they would be ignored), and the
    repository id must be one and offline mode off (:func:`vlmsafe.cards.check_push_target`)."""
    if getattr(args, "push_to_hub", None) is None:
        given = [flag for flag, value in (("--hub-private", getattr(args, "hub_private", False)),
                                          ("--hub-token", getattr(args, "hub_token", None))) if value]
        if given:
            raise InputError(f"{', '.join(given)} set(s) how to upload, but nothing is uploaded; add --push-to-hub "
                             "REPO_ID or drop it")
        return
    from vlmsafe.cards import check_push_target

    try:
        check_push_target(args.push_to_hub)
    except InputError as exc:
        raise InputError(f"--push-to-hub: {exc}") from None


def push_from_args(args: argparse.Namespace, folder: str | os.PathLike[str]) -> str | None:
    """Upload the written ``folder`` when ``--push-to-hub`` was given; returns the commit URL, printed on stderr
    (stdout stays the command's own output, e.g. ``safeclip train``'s JSON summary).

    The output is already in place: a refused or failed upload is one line saying so and how to retry, the folder
    kept (exit code 2 through the CLI)."""
    repo_id = getattr(args, "push_to_hub", None)
    if repo_id is None:
        return None
    from vlmsafe.cards import push_to_hub
    from vlmsafe.errors import VlmsafeError

    try:
        url = push_to_hub(folder, repo_id, private=True if args.hub_private else None, token=args.hub_token)
    except VlmsafeError:
        raise
    except Exception as exc:  # the Hub's HTTP errors, a lost connection: the written output stays
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{folder} was written, but the upload to {repo_id} failed ({first}); retry with "
                         f"`hf upload {repo_id} {folder}` or vlmsafe.cards.push_to_hub") from None
    print(f"pushed {folder} to the Hub repository {repo_id}: {url}", file=sys.stderr)  # stdout: the command's own
    return url


def add_progress_option(parser: argparse.ArgumentParser) -> None:
    """``--no-progress`` hides progress bars (``--quiet`` is accepted as an alias)."""
    parser.add_argument("--no-progress", dest="no_progress", action="store_true", help="hide progress bars")
    parser.add_argument("--quiet", dest="no_progress", action="store_true", help=argparse.SUPPRESS)


def add_data_options(parser: argparse.ArgumentParser, *, help: str, batch_size: int = 8) -> None:
    """``--data`` (required), ``--limit N`` and ``--batch-size N`` (both positive integers)."""
    add_input(parser, "--data", required=True, help=help)
    add_limit_option(parser)
    add_batch_size_option(parser, default=batch_size, help=f"items per forward pass (default {batch_size})")


def add_limit_option(parser: Any, *, help: str = "use only the first N items (default: all)") -> None:
    """``--limit N``: only the first N items (a positive count; default: all)."""
    parser.add_argument("--limit", type=int_arg(low=1), default=None, metavar="N", help=help)


def add_max_new_tokens(parser: argparse.ArgumentParser, default: int = 64) -> None:
    parser.add_argument("--max-new-tokens", type=int_arg(low=1), default=default, metavar="N",
                        help=f"generation budget per response (default {default})")


# --------------------------------------------------------------------------- dataclass fields -> flags
_METAVARS = {"csv": "A,B,...", "floats2": "X,Y", "str": "NAME", "weights": "TERM=W,..."}


def add_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    types: dict[str, Callable[[str], Any]] | None = None,
    skip: Sequence[str] = (),
) -> None:
    """One flag per option field of ``cls`` (default ``None``: "not given"; the dataclass default applies).

    ``types`` maps extra ``kind`` names to ``argparse`` types; ``skip`` names fields to leave out.
    """
    types = {"str": str, "csv": csv_arg, "floats2": unit_pair_arg, **(types or {})}
    for f in option_fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": meta.get("flag_help") or meta["help"]}
        kind = meta["kind"]
        if kind == "switch":
            kw.update(action="store_const", const=meta["const"])
        elif kind == "int":
            kw.update(type=int_arg(low=meta["low"], high=meta.get("high")), metavar="N")
        elif kind == "float":
            kw.update(type=float_arg(low=meta["low"], high=meta["high"], low_open=meta["low_open"],
                                     high_open=meta["high_open"]), metavar="X")
        elif kind == "choice":
            kw.update(choices=meta["choices"])
        else:
            kw.update(type=types[kind], metavar=_METAVARS.get(kind, kind.upper()))
        if kind != "switch" and f.default is not None and f.default is not dataclasses.MISSING:
            kw["help"] += f" (default {_show(f.default)})"
        parser.add_argument(flag, **kw)


def _show(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def options_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The option fields of ``cls`` given on the command line (``None`` means "not given")."""
    return {f.name: getattr(args, f.name) for f in option_fields(cls) if getattr(args, f.name, None) is not None}
