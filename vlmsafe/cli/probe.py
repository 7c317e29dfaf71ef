"""``vlmsafe probe layers|shift|weights``: the analysis reports."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from vlmsafe.cli.options import (
    add_data_options,
    add_input,
    add_model_options,
    add_output_options,
    add_progress_option,
    add_seed_option,
    add_steering_options,
    check_command_output,
    check_named_inputs,
    load_model_from_args,
)
from vlmsafe.cli.parsing import add_command, add_parameter_flags
from vlmsafe.cli.types import float_arg, int_arg, layer_spec_arg
from vlmsafe.errors import InputError

_DATA_HELP = (
    "JSONL items, one per line: "
    "{\"id\": \"1\", \"prompt\": \"...\", \"image\": \"img/1.png\", \"label\": \"harmful\"} "
    "(label 'harmful' or 'benign'; image paths relative to the file)"
)


def _add_model_args(p: argparse.ArgumentParser, *, probes: bool) -> None:
    add_model_options(p, help="VLM folder written by save_pretrained (model + processor)")
    add_data_options(p, help=_DATA_HELP)
    add_output_options(p, help="output folder: <analysis>.json (all figures) + <analysis>.png")
    add_parameter_flags(p, {"out_dir": "--out", "image=blank_image()": "--blank-image"})  # write_report, ReadOptions
    p.add_argument("--layers", type=layer_spec_arg, default=None,
                   help="decoder layers to analyse, e.g. '8-15' or '0,4,8' (default: all)")
    p.add_argument("--positions", default="last", choices=["last", "prompt", "text"],
                   help="hidden states read per prompt: the last prompt token (default) "
                        "or the mean over all prompt/text tokens")
    p.add_argument("--blank-image", action="store_true",
                   help="use one blank white image for every prompt instead of the item's own "
                        "(the CMRM paper's setting)")
    add_seed_option(p, default=0, help="seed of the train/test split and CV folds")
    p.add_argument("--cv", type=int_arg(low=2), default=None,
                   help="cross-validation folds for the probes' regularisation (default 5, fewer when a class has "
                        "fewer training items; a larger value given here is refused)")
    add_progress_option(p)
    add_steering_options(p, layers_flag="--steer-layers", positions_flag="--steer-positions",
                         title="CMRM steering (default: dataset-level, vectors calibrated on the fly)")
    add_input(p, "--calibration", metavar="JSONL",
              help="calibrate CMRM vectors on these items (with images) instead of "
              + ("the probes' training split" if probes else "the analysed items") + " (default: none)")


def register(subparsers: Any) -> None:
    probe = add_command(
        subparsers, "probe",
        help="analyse where safety lives in a VLM: layer probes, multimodal shift, weight change",
        description=(
            "Analysis reports run before choosing an intervention. Each writes DIR/<name>.json and DIR/<name>.png "
            "and prints a summary table.\n\n"
            "  layers   per-layer harmful/benign probes trained on text-only inputs, tested text-only, with\n"
            "           images, and with images + CMRM steering\n"
            "  shift    per-layer distance (cosine, L2, linear CKA) between image+text and text-only states of\n"
            "           the same prompts, the CMRM shift and its component along the probe's harmful direction\n"
            "  weights  per-layer, per-module relative weight change between two checkpoints"
        ),
    )
    sub = probe.add_subparsers(dest="probe_command", metavar="ANALYSIS")

    layers = add_command(
        sub, "layers", run_layers,
        help="layer-wise safety probes (text-only vs +image vs +image+CMRM)",
        description=(
            "Split --data (stratified) into train/test. For each layer, fit a standardised logistic-regression probe "
            "on the text-only hidden states of the training prompts (C chosen by cross-validation) and report its "
            "held-out accuracy (a) text-only, (b) with each prompt's image, (c) with the image under CMRM steering. "
            "The drop (a)->(b) is the safety-relevant representation shift; (c) shows how much CMRM recovers."
        ),
        epilog="example:\n  vlmsafe probe layers --model assets/testbed --data assets/testbed/data/test.jsonl "
               "--calibration assets/testbed/data/calibration.jsonl --out reports/",
    )
    _add_model_args(layers, probes=True)
    layers.add_argument("--test-size", type=float_arg(low=0, high=1, low_open=True, high_open=True), default=0.3,
                        help="held-out share of the items (default 0.3)")
    layers.add_argument("--no-steering", action="store_true", help="skip condition (c)")

    shift = add_command(
        sub, "shift", run_shift,
        help="how far images move each layer's representation (cosine, L2, CKA, CMRM shift)",
        description=(
            "Run every prompt of --data with its image and as its text-only counterpart and report, per layer: "
            "cosine distance, L2 distance and linear CKA between the two; the norm of the CMRM shift vector; its "
            "projection onto the harmful direction of a text-only probe (as a fraction of the harmful-benign gap; "
            "< 0 means images push prompts towards 'benign'); and the distances left after CMRM steering."
        ),
        epilog="example:\n"
               "  vlmsafe probe shift --model assets/testbed --data assets/testbed/data/test.jsonl --out reports/",
    )
    _add_model_args(shift, probes=False)

    weights = add_command(
        sub, "weights", run_weights,
        help="per-layer, per-module relative weight change between two checkpoints",
        description=(
            "Stream two safetensors checkpoints tensor by tensor and report ||after - before|| / ||before|| "
            "per tensor, per decoder layer, per module type (q_proj, mlp.down_proj, ...) and per layer x module. "
            "LLaVA names (model.language_model.layers.N.*) are mapped onto LLM names (model.layers.N.*), so an "
            "aligned LLM and a VLM's language model compare directly; the vision tower and projector are listed "
            "as unmatched."
        ),
        epilog="example:\n"
               "  vlmsafe probe weights --before assets/testbed/aligned_lm --after assets/testbed --out reports/",
    )
    add_input(weights, "--before", required=True,
              help="reference checkpoint (file or folder), e.g. the aligned LLM")
    add_input(weights, "--after", required=True,
              help="changed checkpoint, e.g. the VLM whose language model was adapted")
    add_output_options(weights, help="output folder: weights.json + weights.png")
    add_parameter_flags(weights, {"out_dir": "--out"})  # write_report(report, out_dir)
    add_progress_option(weights)


# --------------------------------------------------------------------------- handlers
def _steering(args: argparse.Namespace, *, enabled: bool) -> Any:
    """The probes' steering: dataset-level by default (vectors from --vectors, --calibration or on the fly)."""
    from vlmsafe.steering import ShiftVectors, SteeringConfig

    alpha = 1.0 if args.alpha is None else args.alpha
    if not enabled:  # --no-steering: a steering flag given with it would be silently ignored
        given = [flag for flag, value in (("--alpha", args.alpha), ("--vectors", args.vectors),
                                          ("--calibration", args.calibration), ("--sample-level", args.sample_level),
                                          ("--steer-layers", args.steer_layers)) if value not in (None, False)]
        if given:
            raise InputError(f"{', '.join(given)} only apply to the steered condition, which --no-steering skips; "
                             "drop one or the other")
        return None
    if alpha == 0:
        return None
    if args.vectors and args.calibration:
        raise InputError("pass either --vectors (ready vectors) or --calibration (items to calibrate on), not both")
    if args.sample_level and args.calibration:
        raise InputError("--sample-level measures each prompt's own shift; drop --calibration")
    return SteeringConfig(
        mode="sample" if args.sample_level else "dataset",
        vectors=ShiftVectors.load(args.vectors) if args.vectors else None,
        alpha=alpha,
        layers=args.steer_layers,
        positions=args.steer_positions or "last",
        decode=bool(args.decode),
    )


DEFAULT_CV = 5


def _check_split_and_folds(args: argparse.Namespace, items: list) -> None:
    """Refuse a --test-size or --cv the items cannot support, before the model is loaded.

    ``probe layers`` trains its probes on the training split, ``probe shift`` on all items (and
    skips the probes, with a note, when the items lack two labelled classes). An explicit ``--cv``
    above the smaller class's count there is refused; the default of 5 shrinks to fit instead.
    """
    from probes.analysis import split_items
    from probes.linear import HARMFUL, labels_from_items

    if args.probe_command == "layers":
        y, train_idx, _ = split_items(items, args.test_size, args.seed, name="--test-size")
        y, where = y[train_idx], "the training split"
    else:
        try:
            y, where = labels_from_items(items), "--data"
        except InputError:
            return
    harmful, benign = int((y == HARMFUL).sum()), int((y != HARMFUL).sum())
    fewest, label = min((harmful, "harmful"), (benign, "benign"))
    if args.cv is not None and fewest >= 2 and args.cv > fewest:
        raise InputError(f"--cv {args.cv} asks for more folds than the {fewest} {label} items in {where} "
                         f"({harmful} harmful, {benign} benign); pass --cv {fewest} or less, or add labelled items")


def _report_files(args: argparse.Namespace, name: str) -> tuple[Any, Any]:
    """``--out/<name>.json`` and ``--out/<name>.png``, checked against every input of the command before any work.

    A probe writes only these two files into its (shared) folder, so each of them -- not the folder -- must not
    be, hold or lie in an input: ``--out`` may hold the data file, but ``--data R/shift.json --out R`` (the report
    would replace the data) and ``--after B --out B`` (files written into a model folder) are refused.
    """
    from probes.report import check_report_paths

    files = tuple(Path(args.out) / f"{name}{suffix}" for suffix in (".json", ".png"))
    for path in files:
        check_command_output(args, path, kind="file")
    return check_report_paths(name, args.out, overwrite=args.overwrite)


def _load(args: argparse.Namespace, *, steering_enabled: bool = True) -> tuple[Any, Any, list, dict]:
    """Model, processor, items and the shared keyword arguments of the model-level analyses."""
    from vlmsafe.extras import require_extra  # a missing optional dependency: one line, before the work
    require_extra("probes", "sklearn", "matplotlib", feature=f"vlmsafe probe {args.probe_command}")
    from vlmsafe.data import load_items
    from vlmsafe.images import blank_image

    files = _report_files(args, args.probe_command)
    steering = _steering(args, enabled=steering_enabled)
    check = False if args.blank_image else "verify"
    items = load_items(args.data, check_images=check)
    calibration = load_items(args.calibration, check_images=check) if args.calibration else None
    for path in files:  # every image the data files name, used or beyond --limit
        check_named_inputs(path, {"--data": items, "--calibration": calibration or []})
    items = items[: args.limit]
    _check_split_and_folds(args, items)
    model, processor = load_model_from_args(args, kind="vlm")
    from vlmsafe.adapters import check_prompt_lengths  # a prompt the model cannot hold: refused before the work
    check_prompt_lengths(model, processor, items)
    if steering is not None:
        steering.check_model(model)
    from probes.collect import ReadOptions
    from probes.linear import ProbeFit

    read = ReadOptions(layers=args.layers, positions=args.positions, image=blank_image() if args.blank_image else None,
                       batch_size=args.batch_size, progress=not args.no_progress)
    fit = ProbeFit(cv=DEFAULT_CV if args.cv is None else args.cv, seed=args.seed,
                   **({"test_size": args.test_size} if args.probe_command == "layers" else {}))
    kwargs: dict[str, Any] = dict(steering=steering, calibration_items=calibration, read=read, fit=fit)
    return model, processor, items, kwargs


def _finish(report: Any, args: argparse.Namespace, started: float, **plot_kwargs: Any) -> int:
    from probes.report import summary_table, write_report

    json_path, png_path = write_report(report, args.out, overwrite=args.overwrite, **plot_kwargs)
    print(summary_table(report))
    print(f"\nwrote {json_path} and {png_path} ({time.perf_counter() - started:.1f} s)")
    return 0


def run_layers(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model, processor, items, kwargs = _load(args, steering_enabled=not args.no_steering)
    from probes.analysis import probe_layers  # after _load, which names a missing scikit-learn in one line
    report = probe_layers(model, processor, items, **kwargs)
    return _finish(report, args, started)


def run_shift(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    model, processor, items, kwargs = _load(args)
    from probes.analysis import analyze_shift  # after _load, which names a missing scikit-learn in one line
    report = analyze_shift(model, processor, items, **kwargs)
    return _finish(report, args, started)


def run_weights(args: argparse.Namespace) -> int:
    from vlmsafe.extras import require_extra  # a missing optional dependency: one line, before the work
    require_extra("probes", "matplotlib", feature="vlmsafe probe weights (it draws weights.png)")
    from probes.weights import weight_change

    started = time.perf_counter()
    _report_files(args, "weights")
    report = weight_change(args.before, args.after, progress=not args.no_progress)
    return _finish(report, args, started)
