"""The safety-merge row: the VLM's language model merged with the aligned text-only LM.

``LM = w * aligned + (1 - w) * VLM's LM`` (linear, decoder layers, final norm, shared vocabulary
rows; :mod:`vlmsafe.merge`), at the recipe's weights 0.2-0.8 plus 1.0 (the aligned LM itself
inside the VLM). Each merged model is measured on the calibration split, where the weight is
chosen by the same genuine-refusal rule as the steering rows (the sweep plotted in
``merge_sweep.png``); the test split is measured at the chosen weight only. When no weight
qualifies, the row carries no rates (its cells print "-") and says so, as a steering row does: the
unmerged model's numbers are never printed under the merge's name.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import vlmsafe.demo.progress as bar
from vlmsafe.demo.context import DemoContext
from vlmsafe.demo.rows import baseline_calibration
from vlmsafe.demo.tune import RULE, baseline, choose, scorer
from vlmsafe.eval.sweep import Setting, measure
from vlmsafe.loading import load_model
from vlmsafe.merge import merge_sweep

MERGE_WEIGHTS = (0.2, 0.4, 0.6, 0.8, 1.0)
_GROUPS = ("harmful", "benign", "accuracy", "n")


def merge_row(ctx: DemoContext) -> tuple[dict[str, Any], dict[str, Any]]:
    """The merge row (test split at the weight chosen on calibration) and the sweep section."""

    def generator(model_dir: Path):
        model, processor = load_model(model_dir)
        return ctx.generator(model=model.eval(), processor=processor)

    settings: list[Setting] = []

    def measure_weight(model_dir: Path) -> dict[str, Any]:
        """Calibration rates of one merged model, per item (for the paired choice) and summarised."""
        bar.describe(ctx, f"merge sweep, {Path(model_dir).name.replace('_', ' ')}")
        setting = measure(generator(model_dir), scorer(ctx), RULE.groups, Setting(None, 0.0))
        settings.append(setting)
        return {"calibration": setting.row()}

    base = baseline_calibration(ctx)
    bar.stage(ctx, "merge sweep")
    with tempfile.TemporaryDirectory(prefix="vlmsafe-merge-") as tmp:
        rows = merge_sweep(
            ctx.root, ctx.root / "aligned_lm", MERGE_WEIGHTS, tmp, measure_weight, progress=False,
            vocab_rows="shared",
        )  # fmt: skip
        for setting, r in zip(settings, rows):
            setting.alpha = float(r["weight"])  # the merge weight plays alpha's part in the choice
        pick = choose(settings, baseline(ctx))
        weight = pick.alpha if pick is not None else 0.0
        bar.stage(ctx, "test merge")
        test = ctx.measure(generator(Path(tmp) / f"weight_{weight:g}"), "test") if weight else None
    rates = test if test is not None else {k: None for k in _GROUPS}
    row = {
        "setting": "safety merge (linear, LM only)",
        **rates,
        "note": f"weight={weight:g} on the aligned LM" if weight else "no weight qualified on calibration",
        "chosen": {"weight": weight},
    }
    sweep = [{"weight": 0.0, "calibration": base}] + [
        {"weight": r["weight"], "calibration": r["calibration"]} for r in rows
    ]
    return row, {"weights": list(MERGE_WEIGHTS), "chosen_weight": weight, "sweep": sweep}
