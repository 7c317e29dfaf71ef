"""Write an analysis to ``DIR/<name>.json`` + ``DIR/<name>.png`` and format its summary table.

Each file is written atomically on its own, so the three reports can share one ``--out`` folder
and an interrupted run never leaves a half-written file behind. Existing report files are replaced
only with ``overwrite=True`` (checked by :func:`check_report_paths` before any work).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmsafe.errors import OutputExistsError
from vlmsafe.io import check_output, write_json_atomic
from vlmsafe.tables import text_table

if TYPE_CHECKING:  # probes.analysis imports scikit-learn, which `probe weights` does not need
    from probes.analysis import LayerProbeReport, ShiftReport
    from probes.weights import WeightChangeReport

    Report = LayerProbeReport | ShiftReport | WeightChangeReport
#: Report class name -> report name (by name: importing the classes would import scikit-learn).
NAMES = {"LayerProbeReport": "layers", "ShiftReport": "shift", "WeightChangeReport": "weights"}


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def check_report_paths(name: str, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> tuple[Path, Path]:
    """The ``<name>.json`` / ``<name>.png`` paths in ``out_dir``, refused if they exist (unless ``overwrite``).
    ``~`` is expanded here as by every writer (a folder literally named ``~`` was made in the current one)."""
    out = Path(os.path.expanduser(os.fspath(out_dir)))
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"`out_dir` {out} is a file; pass a folder for the {name} report")
    paths = out / f"{name}.json", out / f"{name}.png"
    for path in paths:
        check_output(path, kind="file", overwrite=overwrite, option="`out_dir`")
    return paths


def write_report(report: Report, out_dir: str | os.PathLike[str], *, overwrite: bool = False,
                 **plot_kwargs: Any) -> tuple[Path, Path]:
    """Write ``<name>.png`` and then ``<name>.json`` (every figure) into ``out_dir``; return both paths.

    Each file is written atomically, and the JSON last: a run stopped between the two leaves a figure without its
    numbers, never numbers that look like a finished report without their figure."""
    from probes.plots import plot_layer_probes, plot_shift, plot_weight_change

    name = NAMES[type(report).__name__]
    json_path, png_path = check_report_paths(name, out_dir, overwrite=overwrite)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    plot = {"layers": plot_layer_probes, "shift": plot_shift, "weights": plot_weight_change}[name]
    plot(report, png_path, **plot_kwargs)
    write_json_atomic(json_path, _clean(report.to_dict()), overwrite=overwrite)
    return json_path, png_path


# --------------------------------------------------------------------------- tables
def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """:func:`vlmsafe.tables.text_table` of the values as :func:`_fmt` writes them."""
    return text_table(header, [[_fmt(v) for v in row] for row in rows])


def summary_table(report: Report, *, top: int = 12) -> str:
    """A short, fixed-width table of the headline figures of ``report``."""
    if NAMES.get(type(report).__name__) == "layers":
        def acc(row: dict, cond: str, key: str = "accuracy") -> Any:
            return (row.get(cond) or {}).get(key)

        return format_table(
            ["layer", "cv_acc", "text_acc", "image_acc", "cmrm_acc", "drop", "harm_recall_img", "harm_recall_cmrm"],
            [[r["layer"], r["cv_accuracy"], acc(r, "text"), acc(r, "image"), acc(r, "steered"), r["accuracy_drop"],
              acc(r, "image", "harmful_recall"), acc(r, "steered", "harmful_recall")] for r in report.rows],
        )
    if NAMES.get(type(report).__name__) == "shift":
        return format_table(
            ["layer", "cos_dist", "rel_l2", "cka", "shift_norm", "proj/gap", "cos_dist_cmrm", "cka_cmrm"],
            [[r["layer"], r["cosine_distance"], r["relative_l2"], r["cka"], r["shift_norm"],
              r.get("shift_probe_gap_ratio"), r.get("steered_cosine_distance"), r.get("steered_cka")]
             for r in report.rows],
        )
    rows = sorted(report.layers, key=lambda r: -(r["relative_change"] or 0.0))[:top]
    table = format_table(["layer", "rel_change", "diff_norm", "tensors"],
                         [[r["layer"], r["relative_change"], r["diff_norm"], r["tensors"]] for r in rows])
    modules = format_table(["module", "rel_change", "tensors"],
                           [[r["module"], r["relative_change"], r["tensors"]] for r in report.module_types]
                           + [[t["module"], t["relative_change"], 1] for t in report.other[:top]])
    return f"layers by relative change (top {len(rows)}):\n{table}\n\nper module type:\n{modules}"
