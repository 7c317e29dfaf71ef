"""Merge at several weights and evaluate each, so the weight can be picked from a table / plot.

The LLaVA safety-merge recipe picks lam from {0.2, 0.4, 0.6, 0.8} on a validation set: the
multimodal unsafe rate falls as lam (the aligned LLM's share) grows, and benign accuracy
eventually drops. :func:`merge_sweep` automates that: it merges once per weight, calls the
caller's ``evaluate_fn(model_dir) -> {metric: value}`` (e.g. vlmsafe's evaluation harness), and
writes ``sweep.json``, ``sweep.csv`` and, when asked, ``sweep.png`` under ``out_root``.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmsafe.errors import InputError, VlmsafeError
from vlmsafe.io import atomic_path, write_json_atomic
from vlmsafe.merge.config import MergeConfig
from vlmsafe.merge.streaming import RECIPE_NAME, merge_checkpoints
from vlmsafe.reading import read_json
from vlmsafe.validation import check_float

EvaluateFn = Callable[[Path], Mapping[str, Any]]


def merge_sweep(
    vlm: str | os.PathLike[str],
    aligned: str | os.PathLike[str],
    weights: Sequence[float],
    out_root: str | os.PathLike[str],
    evaluate_fn: EvaluateFn | None = None,
    *,
    keep_models: bool = True,
    plot_metrics: Sequence[str] | None = None,
    progress: bool = True,
    **options: Any,
) -> list[dict[str, Any]]:
    """Merge ``vlm`` with ``aligned`` at each weight under ``out_root/weight_<w>`` and evaluate it.

    ``options`` are further :class:`~vlmsafe.merge.config.MergeConfig` fields (``method``, default
    ``linear``; ``mask``, ``vocab_rows``, ``density`` ...), checked by the config as in a single merge. A merged
    directory that already holds a recipe for the same settings is reused, so an interrupted sweep resumes.
    With ``keep_models=False`` each merged model is deleted after evaluation (disk-friendly for 7B models).
    Returns one row per weight:
    ``{"weight": w, "model_dir": ..., **metrics}``, also written to ``sweep.json`` / ``sweep.csv``.
    """
    if not weights:
        raise InputError("merge_sweep needs at least one weight, e.g. [0.2, 0.4, 0.6, 0.8].")
    root = Path(out_root)
    # Every config is built (and its numbers checked) before the first merge: a bad weight fails now, not later.
    configs = [MergeConfig(vlm=Path(vlm), aligned=Path(aligned), output=root / f"weight_{check_float(w, 'weight'):g}",
                           weight=float(w), overwrite=True, **options) for w in weights]
    root.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for w, cfg in zip(weights, configs):
        out = cfg.output
        if not _reusable(out, cfg):
            merge_checkpoints(cfg, progress=progress)
        row: dict[str, Any] = {"weight": float(w), "model_dir": str(out)}
        if evaluate_fn is not None:
            metrics = dict(evaluate_fn(out))
            clash = set(metrics) & {"weight", "model_dir"}
            if clash:
                raise InputError(f"evaluate_fn returned reserved metric names {sorted(clash)}; rename them.")
            row.update(metrics)
        if not keep_models:
            shutil.rmtree(out, ignore_errors=True)
            row["model_dir"] = None
        rows.append(row)
        write_json_atomic(root / "sweep.json", rows, overwrite=True)  # after every weight: partial results survive
    _write_csv(root / "sweep.csv", rows)
    if plot_metrics:
        plot_sweep(rows, plot_metrics, root / "sweep.png")
    return rows


def _reusable(out: Path, cfg: MergeConfig) -> bool:
    recipe = out / RECIPE_NAME
    if not recipe.is_file():
        return False
    try:
        old = read_json(recipe, what="merge recipe")["config"]
    except (VlmsafeError, KeyError, TypeError):
        return False
    new = cfg.to_json()
    ignore = {"overwrite"}
    return {k: v for k, v in old.items() if k not in ignore} == {k: v for k, v in new.items() if k not in ignore}


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(buf.getvalue())


def plot_sweep(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Line plot of ``metrics`` against the merge weight (e.g. unsafe rate and benign accuracy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    missing = [m for m in metrics if any(m not in r for r in rows)]
    if missing:
        raise InputError(f"metrics {missing} are not in every sweep row; choose from {sorted(rows[0])}.")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = [r["weight"] for r in rows]
    for m in metrics:
        ax.plot(xs, [r[m] for r in rows], marker="o", label=m)
    ax.set_xlabel("merge weight (aligned LLM share)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = Path(path)
    with atomic_path(p, overwrite=True) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return p
