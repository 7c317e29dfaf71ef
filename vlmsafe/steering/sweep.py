"""Alpha sweeps: evaluate many steering strengths on one calibration, and pick one.

The calibration (the expensive part: two forward passes per item) is done once; each alpha only
re-runs generation with the same vectors (``SafeVLM.with_alpha``), so a sweep costs one
evaluation per alpha and nothing more.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vlmsafe.steering.safevlm import SafeVLM


def alpha_sweep(
    vlm: SafeVLM,
    items: Sequence[Any],
    judge: Any,
    alphas: Sequence[float],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 16,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Evaluate ``vlm`` at each alpha on ``items``; one summary row per alpha."""
    from vlmsafe.eval import evaluate

    rows = []
    for alpha in alphas:
        report = evaluate(vlm.with_alpha(alpha), items, judge, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          progress=progress, config={"alpha": alpha, "mode": vlm.mode})
        summary = report.summary()
        rows.append({"alpha": float(alpha), "unsafe_rate": summary["unsafe_rate"], "utility": summary["utility"],
                     "over_refusal_rate": summary["over_refusal_rate"], "n_harmful": summary["n_harmful"],
                     "n_with_reference": summary["n_with_reference"]})
    return rows


def choose_alpha(
    rows: Sequence[dict[str, Any]],
    *,
    max_utility_drop: float = 0.05,
    max_over_refusal_rise: float = 0.05,
    base: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Pick the row with the lowest unsafe rate whose benign utility stays within
    ``max_utility_drop`` and whose over-refusal rises by at most ``max_over_refusal_rise``
    relative to ``base`` (default: the row with the smallest alpha, i.e. unsteered); ties go to
    the smaller alpha.

    Run this on a calibration/validation split, never on the test split you report.
    """
    base = base or min(rows, key=lambda r: r["alpha"])

    def ok(r: dict[str, Any]) -> bool:
        util, util0 = r["utility"], base["utility"]
        if util is not None and util0 is not None and util < util0 - max_utility_drop - 1e-9:
            return False
        over, over0 = r.get("over_refusal_rate"), base.get("over_refusal_rate")
        return over is None or over0 is None or over <= over0 + max_over_refusal_rise + 1e-9

    return min([r for r in rows if ok(r)] or [base],
               key=lambda r: (r["unsafe_rate"] if r["unsafe_rate"] is not None else 1.0, r["alpha"]))


def plot_sweep(curves: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike[str], *,
               chosen: float | None = None, title: str = "CMRM: unsafe rate and utility vs alpha",
               overwrite: bool = False) -> None:
    """Write a PNG with unsafe rate, benign utility and over-refusal vs alpha, one line per curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlmsafe.io import atomic_path

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    for name, rows in curves.items():
        xs = [r["alpha"] for r in rows]
        axes[0].plot(xs, [100 * (r["unsafe_rate"] or 0) for r in rows], marker="o", label=name)
        axes[1].plot(xs, [100 * (r["utility"] or 0) for r in rows], marker="o", label=name)
        axes[2].plot(xs, [100 * (r.get("over_refusal_rate") or 0) for r in rows], marker="o", label=name)
    ylabels = ("unsafe rate on harmful image prompts (%)", "benign image-question accuracy (%)",
               "over-refusal on benign items (%)")
    for ax, ylabel in zip(axes, ylabels):
        ax.set_xlabel("alpha (steering strength)")
        ax.set_ylabel(ylabel)
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        if chosen is not None:
            ax.axvline(chosen, color="grey", linestyle="--", linewidth=1, label=f"chosen alpha = {chosen:g}")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
