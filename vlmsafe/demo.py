"""``vlmsafe demo``: the problem and the fixes, measured on the bundled testbed (no downloads).

Steps (all on CPU, well under two minutes):

1. load the bundled tiny LLaVA (``assets/testbed``) and its held-out splits;
2. evaluate the *test* split text-only and with images (the safety degradation);
3. calibrate CMRM vectors on the *calibration* split; on that split, sweep alpha for every layer
   together and for each single layer, and choose (layers, alpha) there: lowest unsafe rate with
   benign accuracy within 5 points and over-refusal up by at most 5 points; then report the test
   split at that choice, dataset-level and sample-level, plus the full test alpha sweep;
4. add the safety-merge and Safe-CLIP rows when those testbed assets are present;
5. print one table; write ``report.json``, ``table.md`` and ``cmrm_sweep.png`` to the output folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vlmsafe.errors import FileFormatError

DEFAULT_ALPHAS = (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def _row(name: str, report: Any, note: str = "", with_image: bool = True) -> dict[str, Any]:
    # Without images, benign image questions cannot be answered (declining them is right), so the
    # text-only row shows neither accuracy nor over-refusal.
    s = report.summary()
    return {"setting": name, "unsafe_rate": s["unsafe_rate"], "utility": s["utility"] if with_image else None,
            "over_refusal_rate": s["over_refusal_rate"] if with_image else None, "n_harmful": s["n_harmful"], "n_with_reference": s["n_with_reference"],
            "note": note}


def format_table(rows: list[dict[str, Any]]) -> str:
    head = "| setting | unsafe rate (harmful) | benign image-question accuracy | over-refusal (benign) | note |"
    lines = [head, "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {_pct(r['unsafe_rate'])} | {_pct(r['utility'])} | {_pct(r['over_refusal_rate'])} | {r['note']} |")
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "vlmsafe-demo",
    *,
    testbed: str | Path | None = None,
    alphas: tuple[float, ...] = DEFAULT_ALPHAS,
    batch_size: int = 32,
    max_new_tokens: int = 12,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    import torch

    from vlmsafe.eval import RefusalJudge, evaluate, load_items
    from vlmsafe.io import check_output, write_json_atomic
    from vlmsafe.steering import SafeVLM, calibrate, safety_directions
    from vlmsafe.steering.sweep import alpha_sweep, choose_alpha, plot_sweep
    from vlmsafe.testbed import load_testbed, testbed_dir

    from transformers.utils import logging as hf_logging

    check_output(out_dir, kind="dir", overwrite=overwrite)
    started = time.perf_counter()
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()  # per-checkpoint "Loading weights" bars drown the demo's own
    root = testbed_dir(testbed)
    model, processor = load_testbed(root)
    data = root / "data"
    test = load_items(data / "test.jsonl")
    calib = load_items(data / "calibration.jsonl")
    info = _build_info(root)
    cmrm = {"layers": None, "positions": "last", "decode": False, **info.get("cmrm_defaults", {}), **(settings or {})}
    judge = RefusalJudge()
    ev = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    base = SafeVLM(model, processor, max_new_tokens=max_new_tokens, batch_size=batch_size)

    text_only = evaluate(base, test, judge, text_only=True, **ev)
    multimodal = evaluate(base, test, judge, **ev)

    calib_images = [it for it in calib if it.image is not None]
    vectors = calibrate(model, processor, calib_images, layers=None, positions="last", batch_size=batch_size, progress=progress)
    n_layers = vectors.meta["num_layers"]
    layer_sets: list[list[int] | None] = [None] + [[l] for l in range(n_layers)] if cmrm["layers"] is None else [cmrm["layers"]]
    sweep_kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens)
    base_cal = alpha_sweep(base, calib, judge, [0.0], **sweep_kw)[0]

    # ShiftDC-style variant: keep only the component of each shift along the layer's safety
    # direction (mean harmful minus mean benign text-only state of the calibration instructions).
    directions = safety_directions(model, processor, [it for it in calib if it.reference is None], batch_size=batch_size)
    variants = {"dataset": vectors, "sample": None, "safety-projected": vectors.project_onto(directions)}

    def make(mode: str, layers: list[int] | None) -> SafeVLM:
        return SafeVLM(model, processor, variants[mode], mode="sample" if mode == "sample" else "dataset", layers=layers,
                       positions=cmrm["positions"], decode=cmrm["decode"], max_new_tokens=max_new_tokens, batch_size=batch_size)

    chosen: dict[str, dict[str, Any]] = {}
    sweeps_cal: dict[str, list[dict[str, Any]]] = {}
    sweeps_test: dict[str, list[dict[str, Any]]] = {}
    for mode in variants:
        name = {"dataset": "dataset-level", "sample": "sample-level", "safety-projected": "dataset-level, safety component"}[mode]
        grid = []
        for layers in layer_sets:  # selection grid: every layer together, or one layer at a time
            for row in alpha_sweep(make(mode, layers), calib, judge, [a for a in alphas if a > 0], **sweep_kw):
                grid.append({**row, "layers": "all" if layers is None else layers})
        sweeps_cal[name] = grid
        best = choose_alpha([{**base_cal, "layers": "all"}, *grid], base=base_cal)
        layers = None if best["layers"] == "all" else best["layers"]
        chosen[name] = {"alpha": best["alpha"], "layers": best["layers"]}
        sweeps_test[name] = alpha_sweep(make(mode, layers), test, judge, alphas, **sweep_kw)

    rows = [
        _row("text-only (image removed)", text_only, "the aligned behaviour", with_image=False),
        _row("multimodal (image + text)", multimodal, "VL adaptation broke refusals"),
    ]
    for name, pick in chosen.items():
        at = next(r for r in sweeps_test[name] if r["alpha"] == pick["alpha"])
        where = "all layers" if pick["layers"] == "all" else f"layer {','.join(map(str, pick['layers']))}"
        rows.append({"setting": f"multimodal + CMRM {name}", "unsafe_rate": at["unsafe_rate"], "utility": at["utility"],
                     "over_refusal_rate": at["over_refusal_rate"], "n_harmful": at["n_harmful"],
                     "n_with_reference": at["n_with_reference"],
                     "note": f"alpha={pick['alpha']:g}, {where} (chosen on calibration split)"})

    out = Path(out_dir)
    if overwrite and out.exists() and not out.is_dir():
        out.unlink()  # the user asked to replace this file with the demo's folder
    out.mkdir(parents=True, exist_ok=True)
    extra_rows, extra_sections = _optional_rows(root, out, calib, test, judge, ev)
    rows.extend(extra_rows)

    plot_sweep({f"{name} ({'all layers' if c['layers'] == 'all' else 'layer ' + ','.join(map(str, c['layers']))})": sweeps_test[name]
                for name, c in chosen.items()}, out / "cmrm_sweep.png",
               title="CMRM on the testbed's held-out test split (last prompt token)", overwrite=True)
    table = format_table(rows)
    report = {
        "testbed": str(root),
        "n_test_items": len(test),
        "n_calibration_items": len(calib),
        "cmrm_settings": {**cmrm, "read_positions": "last", "chosen": chosen,
                          "chosen_alpha": {name: c["alpha"] for name, c in chosen.items()}},
        "rows": rows,
        "sweep_test": sweeps_test,
        "sweep_calibration": sweeps_cal,
        "vector_norms": {str(l): s["shift_norm"] for l, s in vectors.stats.items()},
        **extra_sections,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json_atomic(out / "report.json", report, overwrite=True)
    (out / "table.md").write_text(table + "\n")
    return report


def _build_info(root: Path) -> dict[str, Any]:
    path = root / "build_info.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{path} is not valid JSON ({exc}); rebuild the testbed") from None


MERGE_WEIGHTS = (0.2, 0.4, 0.6, 0.8)


def _merge_section(root: Path, out: Path, calib: list, test: list, judge: Any, ev: dict) -> tuple[dict[str, Any], dict[str, Any]]:
    """Safety merge of the VLM's language model with the aligned LM (linear; weight = aligned share).

    The weight is chosen on the calibration split with the same rule as alpha (lowest unsafe rate
    with benign accuracy within 5 points of the unmerged VLM), then the test split is reported.
    """
    from vlmsafe.eval import evaluate
    from vlmsafe.merge import merge_sweep
    from vlmsafe.steering import SafeVLM, load_model
    from vlmsafe.steering.sweep import choose_alpha

    def metrics(items):
        def evaluate_fn(model_dir):
            model, processor = load_model(model_dir)
            vlm = SafeVLM(model, processor, max_new_tokens=ev["max_new_tokens"], batch_size=ev["batch_size"])
            s = evaluate(vlm, items, judge, **{**ev, "progress": False}).summary()
            return {"unsafe_rate": s["unsafe_rate"], "utility": s["utility"], "over_refusal_rate": s["over_refusal_rate"],
                    "n_harmful": s["n_harmful"], "n_with_reference": s["n_with_reference"]}
        return evaluate_fn

    merged_root = out / "merged"
    cal_rows = merge_sweep(root, root / "aligned_lm", MERGE_WEIGHTS, merged_root, metrics(calib), progress=False,
                           vocab_rows="shared")
    base = metrics(calib)(root)
    candidates = [{"alpha": 0.0, **base}] + [{"alpha": r["weight"], **{k: r[k] for k in base}} for r in cal_rows]
    weight = choose_alpha(candidates)["alpha"]
    test_metrics = metrics(test)(merged_root / f"weight_{weight:g}") if weight else metrics(test)(root)
    row = {"setting": "safety merge (linear, LM only)", **{k: test_metrics[k] for k in ("unsafe_rate", "utility", "over_refusal_rate", "n_harmful", "n_with_reference")},
           "note": f"weight={weight:g} on the aligned LM (chosen on calibration split)"}
    section = {"weights": list(MERGE_WEIGHTS), "chosen_weight": weight, "calibration_sweep": candidates, "test": test_metrics}
    return row, section


def _optional_rows(root: Path, out: Path, calib: list, test: list, judge: Any, ev: dict) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows for capabilities whose testbed assets exist (safety merge, Safe-CLIP)."""
    rows: list[dict[str, Any]] = []
    sections: dict[str, Any] = {}
    if (root / "aligned_lm").is_dir():
        row, sections["safety_merge"] = _merge_section(root, out, calib, test, judge, ev)
        rows.append(row)
    try:
        from vlmsafe.safeclip import safeclip_demo_rows
    except ImportError:
        safeclip_demo_rows = None
    safeclip_dir = root.parent / "safeclip"
    if safeclip_demo_rows is not None and safeclip_dir.is_dir():
        sections["safe_clip"] = safeclip_demo_rows(safeclip_dir)
    return rows, sections
