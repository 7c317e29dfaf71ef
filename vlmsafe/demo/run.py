"""``run_demo``: the safety degradation and the remedies, measured on the bundled testbed.

Steps (CPU, no downloads):

1. load the bundled tiny LLaVA (``assets/testbed``) with its calibration and test splits;
2. measure the test split text-only and with images (the degradation);
3. for each steering method (:data:`vlmsafe.demo.rows.STEERING_METHODS`), choose layers and alpha
   on the calibration split by genuine refusals (:mod:`vlmsafe.demo.tune`), then measure the
   test split at that choice;
4. the safety merge at several weights (:mod:`vlmsafe.demo.merge`), Safe-CLIP retrieval when
   its testbed is present, and Safe-CLIP in a diffusers pipeline when the text-to-image testbed
   (``assets/t2i``, :mod:`vlmsafe.demo.t2i`) is present;
5. write ``report.json``, ``table.md``, ``cmrm_sweep.png``, ``merge_sweep.png`` (and
   ``safeclip_t2i_grid.png``) to the output folder (refused if it exists and is not empty, unless
   ``overwrite``).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmsafe.data import load_items
from vlmsafe.demo.context import DemoContext
from vlmsafe.demo.plots import plot_merge, plot_steering
from vlmsafe.demo.rows import multimodal_row, steered_row, steering_methods, text_only_row
from vlmsafe.demo.table import format_table
from vlmsafe.demo.tune import MAX_ACCURACY_DROP, MAX_BENIGN_RISE
from vlmsafe.errors import InputError
from vlmsafe.inputs import check_named_inputs
from vlmsafe.io import atomic_path, check_output, read_json, write_json_atomic
from vlmsafe.testbed import load_testbed, testbed_dir
from vlmsafe.testbed.outcome import requested_tasks
from vlmsafe.validation import check_float, check_int

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)


def normalize_alphas(alphas: Sequence[float]) -> tuple[float, ...]:
    """Sorted, de-duplicated, finite, non-negative alphas that always include the baseline 0."""
    if not alphas:
        raise InputError("alphas: empty; pass e.g. 0,0.5,1")
    values = {check_float(a, "alpha", low=0.0) for a in alphas}
    return tuple(sorted(values | {0.0}))


def load_context(
    testbed: str | Path | None = None,
    test: str | Path | None = None,
    *,
    batch_size: int = 64,
    max_new_tokens: int = 14,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
    test_items: list[Any] | None = None,
) -> DemoContext:
    """The testbed, its calibration split and a test split (the shipped one, or ``test``; ``test_items``: its
    items, already read)."""
    import torch
    from transformers.utils import logging as hf_logging

    torch.manual_seed(0)
    hf_logging.disable_progress_bar()
    root = testbed_dir(testbed)
    test_path = Path(test) if test is not None else root / "data" / "test.jsonl"
    calibration = load_items(root / "data" / "calibration.jsonl", require_label=True)
    if test_items is None:
        test_items = load_items(test_path, require_label=True)
    labels = {item.label for item in test_items}
    missing = [label for label in ("harmful", "benign") if label not in labels]
    if missing:  # every row's rates would be empty: refuse now, not after the run
        raise InputError(f"{test_path} has no {' and no '.join(missing)} items; the demo's rates need both "
                         "harmful and benign items (labels 'harmful' / 'benign')")
    for path, items in ((root / "data" / "calibration.jsonl", calibration), (test_path, test_items)):
        requested_tasks(items, source=path)  # every instruction's task is known, or refuse now (not "complied 0/N")
    model, processor = load_testbed(root)
    return DemoContext(
        root=root,
        model=model,
        processor=processor,
        calibration=calibration,
        test=test_items,
        batch_size=check_int(batch_size, "batch_size", low=1),
        max_new_tokens=check_int(max_new_tokens, "max_new_tokens", low=1),
        progress=progress,
        steering_defaults=dict(settings or {}),
    )


def run_demo(
    out_dir: str | Path = "vlmsafe-demo",
    *,
    testbed: str | Path | None = None,
    test: str | Path | None = None,
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    batch_size: int = 64,
    max_new_tokens: int = 14,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    merge: bool = True,
    all_methods: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the demo; write its outputs to ``out_dir`` and return the report (see module docs).

    ``test`` evaluates another held-out set in the testbed's format instead of the shipped test
    split (e.g. one written by ``python -m vlmsafe.cli.build_unseen``); every choice is still made on
    the calibration split. ``settings`` fixes steering options for every method (``layers``,
    ``positions``, ``decode``; sample-level and ShiftDC steer prompt tokens only). ``all_methods`` adds
    the published variants (:data:`vlmsafe.demo.rows.EXTRA_METHODS`: CMRM blank anchor, ShiftDC).
    """
    root = testbed_dir(testbed)
    # everything the demo reads: the testbed, the Safe-CLIP testbeds beside it, --test and the images it names
    inputs = [(role, p) for role, p in (("--testbed", root), ("Safe-CLIP testbed", root.parent / "safeclip"),
                                        ("text-to-image testbed", root.parent / "t2i"), ("--test", test))
              if p is not None and Path(p).exists()]
    out = check_output(out_dir, kind="dir", overwrite=overwrite, inputs=inputs)
    test_items = None
    if test is not None:  # read once: its images are inputs too
        test_items = load_items(test, require_label=True)
        check_named_inputs(out, {"--test": test_items})
    alphas = normalize_alphas(alphas)
    started = time.perf_counter()
    ctx = load_context(
        root, test, batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress, settings=settings,
        test_items=test_items,
    )
    rows = [text_only_row(ctx), multimodal_row(ctx)]
    steering = [steered_row(ctx, make(ctx), alphas) for make in steering_methods(all_methods)]
    rows += steering
    sections = _optional_sections(ctx, rows, merge)
    with atomic_path(out, overwrite=overwrite) as tmp:
        tmp.mkdir(parents=True)
        t2i = t2i_section(ctx.root.parent, tmp)
        if t2i is not None:
            sections["safe_clip_t2i"] = t2i
        report = _report(ctx, rows, alphas, sections, time.perf_counter() - started)
        write_json_atomic(tmp / "report.json", report)
        (tmp / "table.md").write_text(format_table(report["rows"]) + "\n")
        plot_steering(steering, report["calibration_grids"], tmp / "cmrm_sweep.png")
        if "safety_merge" in sections:
            merge = next(r for r in rows if r["setting"].startswith("safety merge"))
            plot_merge(
                sections["safety_merge"]["sweep"],
                merge if merge["chosen"]["weight"] else None,
                tmp / "merge_sweep.png",
            )
    return report


def _optional_sections(ctx: DemoContext, rows: list[dict[str, Any]], merge: bool) -> dict[str, Any]:
    """The merge row (appended to ``rows``) and Safe-CLIP retrieval, when their assets exist."""
    sections: dict[str, Any] = {}
    if merge and (ctx.root / "aligned_lm").is_dir():
        from vlmsafe.demo.merge import merge_row

        row, sections["safety_merge"] = merge_row(ctx, rows[1])
        rows.append(row)
    try:
        from vlmsafe.testbed.safeclip import safeclip_demo_rows
    except ImportError:  # the safeclip extra is not installed
        return sections
    if (ctx.root.parent / "safeclip").is_dir():
        sections["safe_clip"] = safeclip_demo_rows(ctx.root.parent / "safeclip")
    return sections


def t2i_section(assets: Path, folder: Path) -> dict[str, Any] | None:
    """"Safe-CLIP in a diffusers pipeline" with its grid written to ``folder``, when ``assets`` holds
    the text-to-image testbed (``t2i/``) and the Safe-CLIP testbed (``safeclip/``) and diffusers is installed."""
    if not ((assets / "t2i").is_dir() and (assets / "safeclip").is_dir()):
        return None
    if importlib.util.find_spec("diffusers") is None:  # the safeclip extra is not installed
        return None
    from vlmsafe.demo.t2i import GRID_FILE, t2i_demo_section

    section = t2i_demo_section(assets, folder, overwrite=True)
    section["grid"] = GRID_FILE  # relative to the demo's output folder
    return section


def _report(
    ctx: DemoContext, rows: list[dict[str, Any]], alphas: Sequence[float], sections: dict[str, Any], seconds: float
) -> dict[str, Any]:
    grids = {r["setting"]: r.pop("calibration_grid") for r in rows if "calibration_grid" in r}
    steered = [r for r in rows if r["setting"] in grids]
    info_path = ctx.root / "build_info.json"
    info = read_json(info_path, what="testbed build info") if info_path.is_file() else {}
    return {
        "testbed": str(ctx.root),
        "build_seed": info.get("seed"),
        "testbed_params": info.get("params", {}).get("total"),
        "build_seconds": info.get("timings_s", {}).get("total_build"),
        "judge": ctx.judge.name,
        "n_test": rows[1]["n"],
        "n_calibration": {"items": len(ctx.calibration)},
        "selection": {
            "alphas": list(alphas),
            "criterion": "most genuine refusals of harmful requests",
            "max_accuracy_drop": MAX_ACCURACY_DROP,
            "max_benign_rise": MAX_BENIGN_RISE,
            "split": "calibration",
            "max_new_tokens": ctx.max_new_tokens,
        },
        "rows": rows,
        # the steering row whose chosen setting refused most on the calibration split (never the test split)
        "best_steering": max(steered, key=lambda r: r["chosen"]["calibration"]["harmful"]["refusal"])["setting"]
        if steered
        else None,
        "calibration_grids": grids,
        "calibration_baseline": ctx.cache.get("base_calibration"),
        **sections,
        "seconds": round(seconds, 1),
    }
