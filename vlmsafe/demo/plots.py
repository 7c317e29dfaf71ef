"""Figures of the demo: outcomes vs steering strength, and outcomes vs merge weight."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from vlmsafe.demo.context import value
from vlmsafe.io import atomic_path

SERIES = (
    ("genuine refusals (harmful)", ("harmful", "refusal"), "tab:green"),
    ("compliance with the task (harmful)", ("harmful", "compliance"), "tab:red"),
    ("deflections (harmful)", ("harmful", "deflection"), "tab:orange"),
    ("benign instructions refused", ("benign", "refusal"), "tab:purple"),
    ("image-question accuracy", ("accuracy",), "tab:blue"),
)


def _pct(row: dict[str, Any], path: tuple[str, ...]) -> float:
    out: Any = row
    for k in path:
        out = out.get(k) if isinstance(out, dict) else None
    v = value(out)
    return float("nan") if v is None else 100 * v


def _figure(n: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 4.0), constrained_layout=True, squeeze=False)
    return plt, fig, axes[0]


def _save(plt, fig, path: str | os.PathLike[str]) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def plot_steering(
    rows: Sequence[dict[str, Any]], grids: dict[str, Sequence[dict[str, Any]]], path: str | os.PathLike[str]
) -> None:
    """One panel per steering row: its calibration sweep (``grids[row["setting"]]``) at the chosen
    layers, and the test result."""
    plt, fig, axes = _figure(len(rows))
    for ax, row in zip(axes, rows):
        chosen = row["chosen"]
        layers = None if chosen["layers"] == "all" else chosen["layers"]
        curve = sorted([r for r in grids[row["setting"]] if r["layers"] == layers], key=lambda r: r["alpha"])
        for label, key, colour in SERIES:
            ax.plot(
                [r["alpha"] for r in curve], [_pct(r, key) for r in curve], marker="o", ms=3, color=colour, label=label
            )
            if chosen["alpha"]:
                y, (lo, hi) = _pct(row, key), _ci(row, key)
                ax.errorbar(
                    [chosen["alpha"]],
                    [y],
                    yerr=[[y - 100 * lo], [100 * hi - y]],
                    marker="*",
                    ms=12,
                    color=colour,
                    linestyle="none",
                )
        where = "all layers" if layers is None else f"layer {','.join(map(str, layers))}"
        ax.set_title(
            f"{row['setting'].replace('multimodal + ', '')}\n({where}; lines: calibration split, "
            "stars: test split, 95% CI)",
            fontsize=9,
        )
        ax.set_xlabel("alpha (steering strength)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("% of items")
    axes[0].legend(fontsize=7, loc="center left")
    _save(plt, fig, path)


def plot_merge(sweep: Sequence[dict[str, Any]], chosen: dict[str, Any] | None, path: str | os.PathLike[str]) -> None:
    """Outcomes on the calibration split against the merge weight (0 = the VLM as built, 1 = the
    aligned LM inside it), with the test split at the chosen weight (stars, 95% intervals). ``chosen``
    is the merge row (its test-split rates, and the weight at ``chosen["chosen"]["weight"]``), or
    ``None`` for no stars."""
    weight = (chosen or {}).get("chosen", {}).get("weight")
    plt, fig, axes = _figure(1)
    ax = axes[0]
    xs = [r["weight"] for r in sweep]
    for label, key, colour in SERIES:
        ax.plot(xs, [_pct(r["calibration"], key) for r in sweep], marker="o", color=colour, label=label)
        if weight:
            lo, hi = _ci(chosen, key)
            ax.errorbar(
                [weight],
                [_pct(chosen, key)],
                yerr=[[_pct(chosen, key) - 100 * lo], [100 * hi - _pct(chosen, key)]],
                marker="*",
                ms=12,
                color=colour,
                linestyle="none",
            )
    ax.set_xlabel("merge weight (share of the aligned LM)")
    ax.set_ylabel("% of items (lines: calibration split; stars: test split)")
    ax.set_title("Safety merge: linear merge of the VLM's LM with the aligned LM", fontsize=9)
    ax.set_ylim(-3, 103)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def _ci(row: dict[str, Any], path: tuple[str, ...]) -> tuple[float, float]:
    out: Any = row
    for k in path:
        out = out.get(k) if isinstance(out, dict) else None
    if isinstance(out, dict) and out.get("ci95"):
        return tuple(out["ci95"])  # type: ignore[return-value]
    return (float("nan"), float("nan"))
