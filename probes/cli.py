"""``vlmsafe probe layers|shift|weights``: the analysis reports."""

from __future__ import annotations

import argparse
import time
from typing import Any

from vlmsafe.errors import InputError

_DATA_HELP = (
    "JSONL items, one per line: {\"id\": \"1\", \"prompt\": \"...\", \"image\": \"img/1.png\", \"label\": \"harmful\"} "
    "(label 'harmful' or 'benign'; image paths relative to the file)"
)


def _add_model_args(p: argparse.ArgumentParser, *, probes: bool) -> None:
    p.add_argument("--model", required=True, help="VLM folder written by save_pretrained (model + processor)")
    p.add_argument("--data", required=True, help=_DATA_HELP)
    p.add_argument("--out", required=True, help="output folder: <analysis>.json (all figures) + <analysis>.png")
    p.add_argument("--layers", default=None, help="decoder layers to analyse, e.g. '8-15' or '0,4,8' (default: all)")
    p.add_argument("--positions", default="last", choices=["last", "prompt", "text"],
                   help="hidden states read per prompt: the last prompt token (default) or the mean over all prompt/text tokens")
    p.add_argument("--blank-image", action="store_true",
                   help="use one blank white image for every prompt instead of the item's own (the CMRM paper's setting)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N items")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per forward pass (default 8)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="load the model in this dtype")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split and CV folds")
    p.add_argument("--cv", type=int, default=5, help="cross-validation folds for the probes' regularisation (default 5)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    g = p.add_argument_group("CMRM steering")
    g.add_argument("--vectors", metavar="DIR", help="CMRM vectors from `vlmsafe calibrate` (default: calibrated on the fly, see below)")
    g.add_argument("--calibration", metavar="JSONL",
                   help="calibrate CMRM vectors on these items (with images) instead of "
                   + ("the probes' training split" if probes else "the analysed items"))
    g.add_argument("--sample-level", action="store_true",
                   help="sample-level CMRM: each prompt's shift from its own text-only counterpart (no vectors needed)")
    g.add_argument("--alpha", type=float, default=1.0, help="steering strength, h <- h - alpha * shift (default 1.0; 0 disables steering)")
    g.add_argument("--steer-layers", default=None, help="layers steered (default: every layer the vectors hold)")
    g.add_argument("--steer-positions", default="last", choices=["last", "prompt", "text", "image"],
                   help="prompt tokens steered (default: last)")


def register(subparsers: Any) -> None:
    probe = subparsers.add_parser(
        "probe",
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = probe.add_subparsers(dest="probe_command", metavar="ANALYSIS")
    probe.set_defaults(func=lambda args: (probe.print_help(), 1)[1])

    layers = sub.add_parser(
        "layers",
        help="layer-wise safety probes (text-only vs +image vs +image+CMRM)",
        description=(
            "Split --data (stratified) into train/test. For each layer, fit a standardised logistic-regression probe "
            "on the text-only hidden states of the training prompts (C chosen by cross-validation) and report its "
            "held-out accuracy (a) text-only, (b) with each prompt's image, (c) with the image under CMRM steering. "
            "The drop (a)->(b) is the safety-relevant representation shift; (c) shows how much CMRM recovers."
        ),
        epilog="example:\n  vlmsafe probe layers --model assets/testbed --data assets/testbed/data/test.jsonl "
               "--calibration assets/testbed/data/calibration.jsonl --out reports/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(layers, probes=True)
    layers.add_argument("--test-size", type=float, default=0.3, help="held-out share of the items (default 0.3)")
    layers.add_argument("--no-steering", action="store_true", help="skip condition (c)")
    layers.set_defaults(func=run_layers)

    shift = sub.add_parser(
        "shift",
        help="how far images move each layer's representation (cosine, L2, CKA, CMRM shift)",
        description=(
            "Run every prompt of --data with its image and as its text-only counterpart and report, per layer: "
            "cosine distance, L2 distance and linear CKA between the two; the norm of the CMRM shift vector; its "
            "projection onto the harmful direction of a text-only probe (as a fraction of the harmful-benign gap; "
            "< 0 means images push prompts towards 'benign'); and the distances left after CMRM steering."
        ),
        epilog="example:\n  vlmsafe probe shift --model assets/testbed --data assets/testbed/data/test.jsonl --out reports/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(shift, probes=False)
    shift.set_defaults(func=run_shift)

    weights = sub.add_parser(
        "weights",
        help="per-layer, per-module relative weight change between two checkpoints",
        description=(
            "Stream two safetensors checkpoints tensor by tensor and report ||after - before|| / ||before|| per tensor, "
            "per decoder layer, per module type (q_proj, mlp.down_proj, ...) and per layer x module. LLaVA names "
            "(model.language_model.layers.N.*) are mapped onto LLM names (model.layers.N.*), so an aligned LLM and "
            "a VLM's language model compare directly; the vision tower and projector are listed as unmatched."
        ),
        epilog="example:\n  vlmsafe probe weights --before assets/testbed/aligned_lm --after assets/testbed --out reports/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    weights.add_argument("--before", required=True, help="reference checkpoint (file or folder), e.g. the aligned LLM")
    weights.add_argument("--after", required=True, help="changed checkpoint, e.g. the VLM whose language model was adapted")
    weights.add_argument("--out", required=True, help="output folder: weights.json + weights.png")
    weights.add_argument("--quiet", action="store_true", help="no progress bar")
    weights.set_defaults(func=run_weights)


# --------------------------------------------------------------------------- handlers
def _dtype(name: str | None) -> Any:
    import torch

    return None if name is None else getattr(torch, name)


def _load(args: argparse.Namespace) -> tuple[Any, Any, list, dict]:
    """Model, processor, items and the shared keyword arguments of the model-level analyses."""
    from vlmsafe.data import load_items
    from vlmsafe.steering import ShiftVectors, load_model

    from probes.collect import blank_image

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    items = load_items(args.data, check_images=not args.blank_image)
    if args.limit is not None:
        items = items[: args.limit]
    if args.vectors and args.calibration:
        raise InputError("pass either --vectors (ready vectors) or --calibration (items to calibrate on), not both")
    model, processor = load_model(args.model, torch_dtype=_dtype(args.dtype), device=args.device)
    kwargs: dict[str, Any] = dict(
        layers=args.layers,
        positions=args.positions,
        image=blank_image() if args.blank_image else None,
        vectors=ShiftVectors.load(args.vectors, model=model) if args.vectors else None,
        calibration_items=load_items(args.calibration, check_images=not args.blank_image) if args.calibration else None,
        sample_level=args.sample_level,
        alpha=args.alpha,
        steer_layers=args.steer_layers,
        steer_positions=args.steer_positions,
        cv=args.cv,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=not args.quiet,
    )
    return model, processor, items, kwargs


def _finish(report: Any, args: argparse.Namespace, started: float, **plot_kwargs: Any) -> int:
    from probes.report import summary_table, write_report

    json_path, png_path = write_report(report, args.out, **plot_kwargs)
    print(summary_table(report))
    print(f"\nwrote {json_path} and {png_path} ({time.perf_counter() - started:.1f} s)")
    return 0


def run_layers(args: argparse.Namespace) -> int:
    from probes.analysis import probe_layers

    started = time.perf_counter()
    if not 0 < args.test_size < 1:
        raise InputError(f"--test-size must be between 0 and 1 (a share of the items), got {args.test_size}")
    model, processor, items, kwargs = _load(args)
    report = probe_layers(model, processor, items, test_size=args.test_size,
                          steer_cmrm=not args.no_steering and args.alpha != 0, **kwargs)
    return _finish(report, args, started)


def run_shift(args: argparse.Namespace) -> int:
    from probes.analysis import analyze_shift

    started = time.perf_counter()
    model, processor, items, kwargs = _load(args)
    report = analyze_shift(model, processor, items, **kwargs)
    return _finish(report, args, started)


def run_weights(args: argparse.Namespace) -> int:
    from probes.weights import weight_change

    started = time.perf_counter()
    report = weight_change(args.before, args.after, progress=not args.quiet)
    return _finish(report, args, started)
