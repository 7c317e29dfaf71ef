"""One PNG per analysis, drawn with matplotlib's object API on the Agg canvas.

Figures are built with ``matplotlib.figure.Figure`` rather than ``pyplot``: no global state, no
GUI backend, nothing to close, and the caller's own pyplot backend is left untouched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from vlmsafe.io import atomic_path

if TYPE_CHECKING:  # probes.analysis imports scikit-learn, which the weights plot does not need
    from probes.analysis import LayerProbeReport, ShiftReport
    from probes.weights import WeightChangeReport

_COLORS = {"text": "#1f77b4", "image": "#d62728", "steered": "#2ca02c"}
_MARKERS = {"text": "o", "image": "s", "steered": "^"}
_LABEL_COLORS = {"harmful": "#d62728", "benign": "#1f77b4"}


def _short(name: str) -> str:
    return Path(name).name if name else "model"


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    FigureCanvasAgg(fig)
    dest = Path(path)
    with atomic_path(dest, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    return dest


def _values(seq: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in seq], dtype=float)


def _layer_axis(ax: Any, layers: Sequence[int]) -> None:
    ax.set_xlabel("decoder layer")
    if len(layers) <= 16:
        ax.set_xticks(list(layers))
    ax.grid(alpha=0.3)


def _steering_note(steering: dict[str, Any] | None) -> str:
    if not steering:
        return "no CMRM steering"
    layers = steering.get("layers")
    if layers in (None, "all"):
        where = "all layers"
    else:
        where = f"layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))}"
    return (f"CMRM: {steering.get('mode', 'dataset-level')}, alpha={steering['alpha']:g}, {where}, "
            f"{steering['positions']} token(s)")


def plot_layer_probes(report: LayerProbeReport, path: str | os.PathLike[str]) -> Path:
    """Probe accuracy per layer under the three conditions, and a 2-D PCA at the worst layer."""
    from probes.analysis import CONDITION_LABELS
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    ax, ax_pca = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.35, 1]})
    layers = report.layers
    for cond in ("text", "image", "steered"):
        ys = _values(report.series(cond))
        if np.all(np.isnan(ys)):
            continue
        ax.plot(layers, ys, marker=_MARKERS[cond], color=_COLORS[cond], label=CONDITION_LABELS[cond])
    ax.plot(layers, _values([r["cv_accuracy"] for r in report.rows]), ls=":", color="grey",
            label="text-only, training CV")
    baseline = report.config.get("majority_baseline")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="black", lw=0.8, label=f"majority class ({baseline:.0%})")
    ax.set_ylim(-0.02, 1.05)
    ax.set_ylabel("probe accuracy on held-out prompts")
    ax.set_title("Harmful-vs-benign probe per layer (trained text-only)\n"
                 f"{_steering_note(report.config.get('steering'))}", fontsize=11)
    _layer_axis(ax, layers)
    ax.legend(loc="lower left", fontsize=8)

    pca = report.pca
    if pca:
        labels = np.array(pca["labels"])
        for cond in ("text", "image", "steered"):
            if cond not in pca:
                continue
            pts = np.asarray(pca[cond])
            for lab in ("harmful", "benign"):
                sel = labels == lab
                if sel.any():
                    ax_pca.scatter(pts[sel, 0], pts[sel, 1], marker=_MARKERS[cond], s=28, alpha=0.75,
                                   facecolors=_LABEL_COLORS[lab] if cond != "text" else "none",
                                   edgecolors=_LABEL_COLORS[lab],
                                   label=f"{lab}, {CONDITION_LABELS[cond].split(' (')[0]}")
        ev = pca["explained_variance_ratio"]
        ax_pca.set_xlabel(f"PC1 of text-only states ({ev[0]:.0%} var.)")
        ax_pca.set_ylabel(f"PC2 ({ev[1]:.0%} var.)")
        ax_pca.set_title(f"Layer {pca['layer']} (largest drop): held-out prompts")
        ax_pca.grid(alpha=0.3)
        ax_pca.legend(fontsize=7, loc="best")
    else:
        ax_pca.set_axis_off()
    fig.suptitle(f"Layer-wise safety probes - {_short(report.config.get('model_name', ''))}", fontsize=12)
    return _save(fig, path)


def plot_shift(report: ShiftReport, path: str | os.PathLike[str]) -> Path:
    """Drift of multimodal vs text-only states per layer, the CMRM shift, and its harmful component."""
    fig = Figure(figsize=(15, 4.6), layout="constrained")
    ax_geo, ax_len, ax_dir = fig.subplots(1, 3)
    layers = report.layers
    steered = any(r.get("steered_cka") is not None for r in report.rows)

    ax_geo.plot(layers, _values(report.series("cosine_distance")), marker="o", color="#d62728",
                label="cosine distance")
    ax_geo.plot(layers, 1 - _values(report.series("cka")), marker="s", color="#9467bd", label="1 - linear CKA")
    if steered:
        ax_geo.plot(layers, _values(report.series("steered_cosine_distance")), ls="--", marker="o", mfc="none",
                    color="#d62728", label="cosine distance, CMRM-steered")
        ax_geo.plot(layers, 1 - _values(report.series("steered_cka")), ls="--", marker="s", mfc="none",
                    color="#9467bd", label="1 - CKA, CMRM-steered")
    ax_geo.set_ylabel("distance (0 = identical)")
    ax_geo.set_title("Image+text vs text-only, same prompts")
    _layer_axis(ax_geo, layers)
    ax_geo.legend(fontsize=8)

    ax_len.plot(layers, _values(report.series("relative_l2")), marker="o", color="#ff7f0e",
                label="per-prompt L2 / ||h_text||")
    ax_len.plot(layers, _values(report.series("relative_shift_norm")), marker="D", color="#8c564b",
                label="CMRM shift ||mean diff|| / ||h_text||")
    if steered:
        ax_len.plot(layers, _values(report.series("steered_relative_l2")), ls="--", marker="o", mfc="none",
                    color="#ff7f0e", label="per-prompt L2, CMRM-steered")
    ax_len.set_ylabel("distance relative to text-only norm")
    ax_len.set_title("Size of the shift")
    _layer_axis(ax_len, layers)
    ax_len.legend(fontsize=8)

    gap = _values(report.series("shift_probe_gap_ratio"))
    if not np.all(np.isnan(gap)):
        colors = ["#1f77b4" if v < 0 else "#d62728" for v in np.nan_to_num(gap)]
        ax_dir.bar(layers, np.nan_to_num(gap), color=colors)
        ax_dir.axhline(0, color="black", lw=0.8)
        ax_dir.set_ylabel("projection / harmful-benign gap")
        ax_dir.set_title("CMRM shift along the probe's harmful direction")
        ax_dir.legend(handles=[Patch(color="#d62728", label="towards 'harmful' (> 0)"),
                               Patch(color="#1f77b4", label="towards 'benign' (< 0)")], fontsize=8)
        _layer_axis(ax_dir, layers)
    else:
        ax_dir.text(0.5, 0.5, report.config.get("note") or "no labelled items: no probe direction",
                    ha="center", va="center", wrap=True, transform=ax_dir.transAxes, fontsize=9)
        ax_dir.set_axis_off()
    note = f"\n(dashed: {_steering_note(report.config.get('steering'))})" if steered else ""
    fig.suptitle(f"Multimodal representation shift - {_short(report.config.get('model_name', ''))}{note}", fontsize=12)
    return _save(fig, path)


def plot_weight_change(report: WeightChangeReport, path: str | os.PathLike[str], *,
                       before_label: str | None = None, after_label: str | None = None) -> Path:
    """Heat map of relative change per (module type, layer) and the per-layer total."""
    fig = Figure(figsize=(14, 0.35 * max(len(report.matrix["modules"]), 4) + 2.6), layout="constrained")
    ax_map, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.6, 1]})
    layers, modules = report.matrix["layers"], report.matrix["modules"]
    before = before_label or _short(report.config.get("before", ""))
    after = after_label or _short(report.config.get("after", ""))
    if layers:
        grid = _values([v for row in report.matrix["relative_change"] for v in row]).reshape(len(modules), len(layers))
        im = ax_map.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax_map.set_yticks(range(len(modules)), modules, fontsize=8)
        step = max(1, len(layers) // 16)
        ax_map.set_xticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
        ax_map.set_xlabel("decoder layer")
        ax_map.set_ylabel("module type")
        cbar = fig.colorbar(im, ax=ax_map)
        cbar.set_label("relative change ||after - before|| / ||before||")
        ax_map.set_title("Relative weight change per layer and module")

        rel = _values([r["relative_change"] for r in report.layers])
        ax_bar.bar(layers, rel, color="#1f77b4", label="decoder layer (all weight matrices)")
        for t in report.other:
            if t["module"] in ("embed_tokens", "final_norm", "lm_head") and t["relative_change"] is not None:
                color = {"embed_tokens": "#2ca02c", "final_norm": "#9467bd", "lm_head": "#ff7f0e"}[t["module"]]
                ax_bar.axhline(t["relative_change"], ls="--", lw=0.9, color=color, label=t["module"])
        ax_bar.set_ylabel("relative change ||after - before|| / ||before||")
        ax_bar.set_title("Per-layer total")
        _layer_axis(ax_bar, layers)
        ax_bar.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    else:
        for ax in (ax_map, ax_bar):
            ax.set_axis_off()
        ax_map.text(0.5, 0.5, "no decoder-layer tensors matched", ha="center", va="center", transform=ax_map.transAxes)
    fig.suptitle(f"Weight change: {before} -> {after}", fontsize=12)
    return _save(fig, path)
