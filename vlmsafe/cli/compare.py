"""``python -m vlmsafe.cli.compare --out DIR``: the command line of :mod:`vlmsafe.experiments.compare`.

The work is there; this module only reads the flags (all argparse code lives in :mod:`vlmsafe.cli`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from vlmsafe.experiments.compare import BATCH_SIZE, MAX_NEW_TOKENS, compare_methods, format_rows, method_specs
from vlmsafe.steering import SafeVLM, SteeringConfig


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vlmsafe.cli.compare --out DIR``: the comparison on the bundled testbed."""
    import json
    import time

    import torch

    from vlmsafe.data import load_items
    from vlmsafe.eval import RefusalJudge
    from vlmsafe.experiments.compounding import compounding_table, gap_profile
    from vlmsafe.io import atomic_path, check_output
    from vlmsafe.testbed import load_testbed, testbed_dir
    from vlmsafe.testbed.prompts import REFUSAL

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--testbed", default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    check_output(args.out, kind="dir", overwrite=args.overwrite)
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
    print(table, compounding, sep="\n\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
