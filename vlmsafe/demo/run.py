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

Progress is one bar over the whole run (:mod:`vlmsafe.demo.progress`), its stages planned by
:func:`demo_plan`. The report records the run's wall and CPU seconds and the machine they were measured on
(:func:`machine`), which the README's demo block states.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmsafe.data import load_items
from vlmsafe.demo.context import DemoContext, group_of
from vlmsafe.demo.plots import plot_merge, plot_steering
from vlmsafe.demo.progress import DemoProgress
from vlmsafe.demo.rows import multimodal_row, steered_row, steering_methods, text_only_row
from vlmsafe.demo.table import format_table
from vlmsafe.demo.tune import MAX_ACCURACY_DROP, MAX_BENIGN_RISE, RULE
from vlmsafe.errors import InputError
from vlmsafe.inputs import check_named_inputs
from vlmsafe.io import atomic_path, check_output, write_json_atomic
from vlmsafe.options import check_options, int_option, switch_option
from vlmsafe.reading import read_json
from vlmsafe.testbed import load_testbed, testbed_dir
from vlmsafe.testbed.outcome import requested_tasks
from vlmsafe.validation import check_float, check_int

DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
#: What one image of the text-to-image section costs on the demo's bar, in generated testbed answers (10
#: denoising steps of the tiny UNet against one answer of the tiny LLaVA: about 8x on a 2-core CPU), so the
#: bar's ETA does not under-count the section.
IMAGE_COST = 8


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


@dataclass
class DemoOptions:
    """What the demo measures, apart from where (the testbed, the test split, the output folder).

    ``alphas``: the steering strengths tried on the calibration split (normalised by :func:`normalize_alphas`);
    ``settings`` fixes steering options for every method (``layers``, ``positions``, ``decode``; sample-level and
    ShiftDC steer prompt tokens only); ``merge``: add the safety-merge row; ``all_methods`` adds the published
    variants (:data:`vlmsafe.demo.rows.EXTRA_METHODS`: CMRM blank anchor, ShiftDC). Numbers are checked here, once.
    """

    alphas: Sequence[float] = DEFAULT_ALPHAS
    batch_size: int = int_option(64, "items per generation batch")
    max_new_tokens: int = int_option(14, "generation budget per answer")
    settings: dict[str, Any] = field(default_factory=dict)
    merge: bool = switch_option(True, "add the safety-merge row", flag="--no-merge", const=False,
                                flag_help="skip the safety-merge row")
    all_methods: bool = switch_option(False, "add the published variants side by side", flag="--all-methods",
                                      const=True, flag_help="add the published variants side by side")

    def __post_init__(self) -> None:
        check_options(self)
        self.alphas = normalize_alphas(self.alphas)
        self.settings = dict(self.settings or {})


def run_demo(
    out_dir: str | Path = "vlmsafe-demo",
    options: DemoOptions | None = None,
    *,
    testbed: str | Path | None = None,
    test: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the demo with ``options`` (default :class:`DemoOptions`); write its outputs to ``out_dir`` and return
    the report (see module docs).

    ``test`` evaluates another held-out set in the testbed's format instead of the shipped test
    split (e.g. one written by ``python -m vlmsafe.cli.build_unseen``); every choice is still made on
    the calibration split.
    """
    options = options or DemoOptions()
    alphas, merge = options.alphas, options.merge
    root = testbed_dir(testbed)
    # everything the demo reads: the testbed, the Safe-CLIP testbeds beside it, `test` and the images it names
    inputs = [(role, p) for role, p in (("`testbed`", root), ("Safe-CLIP testbed", root.parent / "safeclip"),
                                        ("text-to-image testbed", root.parent / "t2i"), ("`test`", test))
              if p is not None and Path(p).exists()]
    out = check_output(out_dir, kind="dir", overwrite=overwrite, option="`out_dir`", inputs=inputs)
    test_items = None
    if test is not None:  # read once: its images are inputs too
        test_items = load_items(test, require_label=True)
        check_named_inputs(out, {"`test`": test_items}, option="`out_dir`")
    started, cpu_started = time.perf_counter(), time.process_time()
    ctx = load_context(
        root, test, batch_size=options.batch_size, max_new_tokens=options.max_new_tokens, progress=progress,
        settings=options.settings, test_items=test_items,
    )
    makers = steering_methods(options.all_methods)
    ctx.tracker = DemoProgress(demo_plan(ctx, makers, alphas, merge=merge), enabled=progress)
    try:
        rows = [text_only_row(ctx), multimodal_row(ctx)]
        steering = []
        for i, make in enumerate(makers):
            method = make(ctx)  # calibrates what it needs (its own stage)
            ctx.tracker.rename(f"tune #{i}", f"tune {method.name}")
            ctx.tracker.rename(f"test #{i}", f"test {method.name}")
            steering.append(steered_row(ctx, method, alphas))
        rows += steering
        sections = _optional_sections(ctx, rows, merge)
        with atomic_path(out, overwrite=overwrite) as tmp:
            tmp.mkdir(parents=True)
            t2i = t2i_section(ctx.root.parent, tmp, ctx)
            if t2i is not None:
                sections["safe_clip_t2i"] = t2i
            ctx.tracker.close()
            report = _report(ctx, rows, alphas, sections, time.perf_counter() - started,
                             time.process_time() - cpu_started)
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
    finally:
        ctx.tracker.close()
    return report


def demo_plan(ctx: DemoContext, makers: Sequence[Any], alphas: Sequence[float], *, merge: bool = True
              ) -> list[tuple[str, int]]:
    """The demo's stages and the items each is expected to cost (generated answers; a calibration pass counts as
    one, a generated image as :data:`IMAGE_COST`), for the overall bar's total and ETA. A tuning stage is
    estimated at its whole grid, harmful items for every setting plus the chosen layer set's other groups; it
    stops early more often than not, and re-estimates itself as it runs (:func:`vlmsafe.demo.tune.tune`).
    Steering stages are named ``tune #i`` / ``test #i`` until their method is built."""
    import vlmsafe.demo.rows as demo_rows
    from vlmsafe.demo.merge import MERGE_WEIGHTS

    cal, test = ctx.calibration, ctx.test
    n_cal_harmful = sum(group_of(it) == "harmful" for it in cal)
    n_layer_sets = len(demo_rows._layer_sets(ctx))
    positive = [a for a in alphas if a > 0]
    plan = [("test text-only", sum(group_of(it) != "image_questions" for it in test)),
            ("test multimodal", len(test)), ("calibration baseline", len(cal))]
    calibrations = {
        demo_rows.cmrm_dataset: [("calibrate CMRM vectors", sum(it.image is not None for it in cal))],
        demo_rows.cmrm_safety_component: [("safety directions", sum(it.reference is None for it in cal))],
        demo_rows.cmrm_dataset_blank: [("calibrate blank-anchor vectors", len(cal))],
        demo_rows.shiftdc: [("ShiftDC directions", sum(it.image is not None or bool(it.meta.get("caption"))
                                                         for it in cal))],
    }
    for i, make in enumerate(makers):
        plan += calibrations.get(make, [])
        sets = n_layer_sets + (1 if make is demo_rows.shiftdc and "layers" not in ctx.steering_defaults else 0)
        grid = sets * len(positive) * n_cal_harmful + len(positive) * (len(cal) - n_cal_harmful)
        plan += [(f"tune #{i}", grid), (f"test #{i}", len(test))]
    if merge and (ctx.root / "aligned_lm").is_dir():
        plan += [("merge sweep", len(MERGE_WEIGHTS) * len(cal)), ("test merge", len(test))]
    prompts = ctx.root.parent / "t2i" / "prompts.json"
    if prompts.is_file() and (ctx.root.parent / "safeclip").is_dir() and importlib.util.find_spec("diffusers"):
        test_prompts = read_json(prompts, what="text-to-image testbed prompts").get("test", {})
        plan.append(("Safe-CLIP text-to-image", IMAGE_COST * 2 * sum(len(v) for v in test_prompts.values())))
    return plan


def machine() -> dict[str, Any]:
    """The machine a run was timed on: CPU model, logical cores (those this process may use), torch threads."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": " ".join(cpu.split()), "cores": cores, "torch_threads": torch.get_num_threads(),
            "system": platform.system()}


def timing_line(report: dict[str, Any]) -> str:
    """``"83.1 s wall, 160.2 s CPU on Intel Xeon ... (2 cores)"`` from a report (what ``vlmsafe demo`` prints)."""
    where = report.get("machine") or {}
    on = f" on {where['cpu']} ({where['cores']} cores)" if where.get("cpu") else ""
    cpu = f", {report['cpu_seconds']:.1f} s CPU" if report.get("cpu_seconds") is not None else ""
    return f"{report['seconds']:.1f} s wall{cpu}{on}"


def _optional_sections(ctx: DemoContext, rows: list[dict[str, Any]], merge: bool) -> dict[str, Any]:
    """The merge row (appended to ``rows``) and Safe-CLIP retrieval, when their assets exist."""
    sections: dict[str, Any] = {}
    if merge and (ctx.root / "aligned_lm").is_dir():
        from vlmsafe.demo.merge import merge_row

        row, sections["safety_merge"] = merge_row(ctx)
        rows.append(row)
    try:
        from vlmsafe.testbed.safeclip import safeclip_demo_rows
    except ImportError:  # the safeclip extra is not installed
        return sections
    if (ctx.root.parent / "safeclip").is_dir():
        import vlmsafe.demo.progress as bar

        bar.stage(ctx, "Safe-CLIP retrieval")
        sections["safe_clip"] = safeclip_demo_rows(ctx.root.parent / "safeclip")
    return sections


def t2i_section(assets: Path, folder: Path, ctx: DemoContext | None = None) -> dict[str, Any] | None:
    """"Safe-CLIP in a diffusers pipeline" with its grid written to ``folder``, when ``assets`` holds
    the text-to-image testbed (``t2i/``) and the Safe-CLIP testbed (``safeclip/``) and diffusers is installed."""
    if not ((assets / "t2i").is_dir() and (assets / "safeclip").is_dir()):
        return None
    if importlib.util.find_spec("diffusers") is None:  # the safeclip extra is not installed
        return None
    import vlmsafe.demo.progress as bar
    from vlmsafe.demo.t2i import GRID_FILE, t2i_demo_section

    bar.stage(ctx, "Safe-CLIP text-to-image")
    if bar.tracker_of(ctx) is not None:  # diffusers' "Loading pipeline components" bar: the demo's bar counts it
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
    section = t2i_demo_section(assets, folder, overwrite=True)
    images = sum(row["unsafe_rate"]["n"] + row["safe_agreement"]["n"] for row in section["rows"])
    bar.advance(ctx, IMAGE_COST * images)
    section["grid"] = GRID_FILE  # relative to the demo's output folder
    return section


def _report(
    ctx: DemoContext, rows: list[dict[str, Any]], alphas: Sequence[float], sections: dict[str, Any], seconds: float,
    cpu_seconds: float | None = None,
) -> dict[str, Any]:
    grids = {r["setting"]: r.pop("calibration_grid") for r in rows if "calibration_grid" in r}
    steered = [r for r in rows if r["setting"] in grids and r["chosen"]["calibration"] is not None]
    info_path = ctx.root / "build_info.json"
    info = read_json(info_path, what="testbed build info") if info_path.is_file() else {}
    return {
        "testbed": str(ctx.root),
        "build_seed": info.get("seed"),
        "testbed_params": info.get("params", {}).get("total"),
        "build_seconds": info.get("timings_s", {}).get("total_build"),
        "build_cpu_seconds": info.get("cpu_s", {}).get("total_build"),
        "judge": ctx.judge.name,
        "n_test": rows[1]["n"],
        "n_calibration": {"items": len(ctx.calibration)},
        "selection": {
            "alphas": list(alphas),
            "criterion": "most genuine refusals of harmful requests",
            "rule": RULE.name,
            "rule_description": RULE.description,
            "margin": RULE.margin,
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
        # CPU time of the process (every thread), beside the wall time, and where both were measured
        "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 1),
        "machine": machine(),
    }
