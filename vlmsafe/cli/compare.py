"""``python -m vlmsafe.cli.compare --out DIR [--docs docs/methods.md]``: the command line of
:mod:`vlmsafe.experiments.compare`.

The work is there; this module only reads the flags (all argparse code lives in :mod:`vlmsafe.cli`).
``--docs`` writes the comparison table between the ``COMPARE-TABLE`` markers of a document, so the
figures the method pages quote are the measured ones, never typed by hand.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vlmsafe.cli.parsing import HelpFormatter, run_script, script_parser
from vlmsafe.cli.types import int_arg
from vlmsafe.experiments.compare import (
    BATCH_SIZE,
    DOCS_END,
    DOCS_START,
    MAX_NEW_TOKENS,
    compare_methods,
    docs_block,
    format_rows,
    method_specs,
)
from vlmsafe.reading import marked_block, replace_marked_block
from vlmsafe.steering import SafeVLM, SteeringConfig


def main(argv: Sequence[str] | None = None) -> int:
    """CMRM (real, blank and noise anchors; dataset- and sample-level) and ShiftDC on the bundled testbed: each
    method's setting chosen on the calibration split by the demo's rule, the held-out test split measured there."""
    ap = script_parser("vlmsafe.cli.compare", main.__doc__)
    ap.formatter_class = HelpFormatter
    ap.add_argument("--out", required=True, help="output folder: report.json and table.md (written atomically)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    ap.add_argument("--testbed", default=None, help="testbed folder (default: the bundled assets/testbed)")
    ap.add_argument("--threads", type=int_arg(low=1), default=1, help="torch threads")
    ap.add_argument("--docs", default=None, metavar="MARKDOWN",
                    help=f"also write the table between the {DOCS_START} and {DOCS_END} lines of this document")
    return run_script(ap, argv, _run)


def _run(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from vlmsafe.data import load_items
    from vlmsafe.eval import RefusalJudge
    from vlmsafe.experiments.compounding import compounding_table, gap_profile
    from vlmsafe.io import atomic_path, check_output
    from vlmsafe.testbed import load_testbed, testbed_dir
    from vlmsafe.testbed.prompts import REFUSAL

    check_output(args.out, kind="dir", overwrite=args.overwrite)
    if args.docs:
        marked_block(args.docs, DOCS_START, DOCS_END)  # a document without the markers: refused before the work
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    root = testbed_dir(args.testbed)
    model, processor = load_testbed(root)
    calibration, test = (load_items(root / "data" / f"{s}.jsonl") for s in ("calibration", "test"))
    specs = method_specs(model, processor, calibration, caption_prompt="describe the image .", caption_tokens=8)
    result = compare_methods(
        specs,
        SafeVLM(model, processor, batch_size=BATCH_SIZE, max_new_tokens=MAX_NEW_TOKENS),
        calibration,
        test,
        RefusalJudge(),
        genuine_refusal=lambda text: text.strip().startswith(REFUSAL),
    )
    vectors = next(s for s in specs if s.name == "CMRM dataset-level, real image")
    probe = [it for it in test if it.image is not None and it.reference is None]
    settings = {
        "dataset-level, alpha 1, layer 1": vectors.config([1], 1.0),
        "dataset-level, alpha 1, layer 2": vectors.config([2], 1.0),
        "dataset-level, alpha 1, middle-to-last (2-3)": vectors.config("middle-to-last", 1.0),
        "dataset-level, alpha 1, all layers (paper)": vectors.config("all", 1.0),
        "dataset-level, alpha 0.25, all layers": vectors.config("all", 0.25),
        "sample-level (own image), alpha 1, all layers": SteeringConfig(mode="sample", alpha=1.0),
    }
    profiles = {name: gap_profile(model, processor, probe, cfg, batch_size=64) for name, cfg in settings.items()}
    table, compounding = format_rows(result["rows"]), compounding_table(profiles)
    report = {**result, "compounding": profiles, "seconds": round(time.perf_counter() - started, 1)}
    with atomic_path(args.out, overwrite=args.overwrite) as tmp:
        tmp.mkdir(parents=True)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
        (tmp / "table.md").write_text(
            table + "\n\nshare of the modality gap left (last prompt token)\n\n" + compounding + "\n"
        )
    if args.docs:
        replace_marked_block(args.docs, DOCS_START, DOCS_END, docs_block(result, report["seconds"]))
    print(table, compounding, sep="\n\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
