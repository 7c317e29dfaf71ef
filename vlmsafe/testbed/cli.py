"""``vlmsafe demo``: run the bundled testbed end to end and print the results table."""

from __future__ import annotations

import argparse
from typing import Any

DEMO_HELP = """\
Loads the bundled tiny LLaVA testbed (assets/testbed: a real LlavaForConditionalGeneration trained
by `python -m vlmsafe.testbed.build` on synthetic data; no downloads, CPU only) and prints one table,
measured on the held-out test split:

  text-only (image removed)     harmful prompts without their image: the text-only safety alignment
                                at work (the unsafe rate should be near 0)
  multimodal (image + text)     the same prompts with an image: VL adaptation (trained on benign image
                                data only) broke the refusals (the safety degradation vlmsafe fixes)
  multimodal + CMRM dataset     CMRM with one calibrated shift vector per layer (calibration split),
                                h <- h - alpha * shift; alpha chosen on the calibration split
  multimodal + CMRM sample      CMRM with each input's own shift from its text-only counterpart
  CMRM dataset, safety comp.    dataset-level vectors reduced to their component along the layer's
                                safety direction (mean harmful minus mean benign text-only state)
  safety merge                  the VLM's language model merged with the aligned text-only LM
                                (when vlmsafe.merge is installed)

Columns: unsafe rate = share of harmful prompts answered instead of refused (refusal judge);
benign image-question accuracy = share of benign image questions answered correctly (utility);
over-refusal = share of benign prompts refused. Safe-CLIP retrieval before/after follows the table
when its testbed (assets/safeclip) is present.

Writes report.json (every figure, the full alpha sweeps), table.md and cmrm_sweep.png (unsafe rate
and accuracy vs alpha) to --out.
"""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo",
        help="show the safety degradation and the fixes on the bundled tiny LLaVA (no downloads)",
        description=DEMO_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="vlmsafe-demo", help="output folder for report.json, table.md, cmrm_sweep.png (default: ./vlmsafe-demo)")
    p.add_argument("--testbed", default=None, help="testbed folder (default: the bundled assets/testbed, or $VLMSAFE_TESTBED)")
    p.add_argument("--alphas", default=None, help="comma-separated alphas to sweep (default: 0,0.25,...,1.5)")
    p.add_argument("--positions", default=None, choices=["last", "prompt", "text", "image"], help="override the steered positions")
    p.add_argument("--decode", action="store_true", default=None, help="also steer generated tokens")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlmsafe.demo import DEFAULT_ALPHAS, format_table, run_demo
    from vlmsafe.errors import InputError

    alphas = DEFAULT_ALPHAS
    if args.alphas:
        try:
            alphas = tuple(float(a) for a in args.alphas.split(","))
        except ValueError:
            raise InputError(f"--alphas must be comma-separated numbers, got {args.alphas!r}") from None
    settings = {k: v for k, v in (("positions", args.positions), ("decode", args.decode)) if v is not None}
    report = run_demo(args.out, testbed=args.testbed, alphas=alphas, progress=not args.quiet, settings=settings,
                      overwrite=args.overwrite)
    print()
    print(f"vlmsafe demo — bundled tiny LLaVA testbed, held-out test split ({report['n_test_items']} items)")
    print(format_table(report["rows"]))
    if "safe_clip" in report:
        from vlmsafe.safeclip import format_table as format_retrieval

        print("\nSafe-CLIP on its tiny CLIP testbed (assets/safeclip, held-out split): retrieval before/after;")
        print("safe@1 = share of unsafe-text queries whose top-1 image is safe")
        print(format_retrieval(report["safe_clip"]))
    print(f"\nalpha sweep (test split): {args.out}/cmrm_sweep.png; all figures: {args.out}/report.json "
          f"({report['seconds']} s)")
    return 0
