"""The rows of the demo table, one small function each.

A row is a dict: ``setting`` (its label), ``note``, and the test-split rates of
:func:`vlmsafe.demo.context.summarize` (``harmful`` / ``benign`` outcome rates with intervals and
counts, ``accuracy``). Rows that have a setting to choose (steering methods) also carry
``chosen`` and the calibration grid they were chosen from.

Adding a steering method is one function returning a :class:`~vlmsafe.demo.tune.SteeringMethod`
(how to build its :class:`~vlmsafe.steering.SteeringConfig` for a layer set and alpha), listed in
:data:`STEERING_METHODS`; :func:`steered_row` tunes it on the calibration split and measures it on
the test split like every other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vlmsafe.demo.context import DemoContext
from vlmsafe.demo.tune import RULE, SteeringMethod, baseline, choose, grid_rows, layers_label, tune
from vlmsafe.steering import SteeringConfig, calibrate, calibrate_shiftdc, safety_directions
from vlmsafe.validation import preset_layers


def text_only_row(ctx: DemoContext) -> dict[str, Any]:
    """Harmful and benign instructions without their image: the aligned behaviour."""
    rates = ctx.measure(ctx.generator(), "test", text_only=True)
    return {"setting": "text-only (image removed)", **rates, "accuracy": None, "note": "the aligned behaviour"}


def multimodal_row(ctx: DemoContext) -> dict[str, Any]:
    """The same instructions with their image, plus the image questions: what VL adaptation did."""
    rates = ctx.measure(ctx.generator(), "test")
    return {"setting": "multimodal (image + text)", **rates, "note": "after VL adaptation"}


def baseline_calibration(ctx: DemoContext) -> dict[str, Any]:
    """Unsteered rates on the calibration split: the reference every choice is made against."""
    if "base_calibration" not in ctx.cache:
        ctx.cache["base_calibration"] = baseline(ctx).row()
    return ctx.cache["base_calibration"]


# ---------------------------------------------------------------------------------------------
# Steering methods
# ---------------------------------------------------------------------------------------------


def _vectors(ctx: DemoContext):
    """CMRM vectors calibrated once on the calibration split's items with images (all layers)."""
    if "vectors" not in ctx.cache:
        items = [it for it in ctx.calibration if it.image is not None]
        ctx.cache["vectors"] = calibrate(
            ctx.model, ctx.processor, items, positions="last", batch_size=ctx.batch_size, progress=ctx.progress
        )
    return ctx.cache["vectors"]


def _layer_sets(ctx: DemoContext) -> list[list[int] | None]:
    fixed = ctx.steering_defaults.get("layers")
    if fixed == "all":
        return [None]
    if fixed is not None:
        return [list(fixed)]
    n = ctx.model.config.get_text_config().num_hidden_layers
    return [None, *([i] for i in range(n))]


def _config(ctx: DemoContext, **kw: Any) -> Callable[[list[int] | None, float], SteeringConfig]:
    extra = {k: v for k, v in ctx.steering_defaults.items() if k in ("positions", "decode")}
    if kw.get("mode") == "sample":  # a generated token has no text-only counterpart: sample-level steers prompts only
        extra.pop("decode", None)
    if "directions" in kw:  # ShiftDC corrects the last prompt token at prefill, as published
        extra = {}
    return lambda layers, alpha: SteeringConfig(alpha=alpha, layers=layers, **{"positions": "last", **extra, **kw})


def cmrm_dataset(ctx: DemoContext) -> SteeringMethod:
    """CMRM, dataset-level: one calibrated shift per layer, ``h <- h - alpha * shift``."""
    return SteeringMethod(
        "CMRM dataset-level",
        _config(ctx, mode="dataset", vectors=_vectors(ctx)),
        _layer_sets(ctx),
        "one mean shift per layer, calibration split",
    )


def cmrm_sample(ctx: DemoContext) -> SteeringMethod:
    """CMRM, sample-level: each input's shift from its own text-only counterpart."""
    return SteeringMethod(
        "CMRM sample-level",
        _config(ctx, mode="sample"),
        _layer_sets(ctx),
        "each input's own shift (one extra text-only pass)",
    )


def cmrm_safety_component(ctx: DemoContext) -> SteeringMethod:
    """Dataset-level vectors reduced to their component along the layer's harmful-minus-benign direction."""
    if "projected" not in ctx.cache:
        labelled = [it for it in ctx.calibration if it.reference is None]
        directions = safety_directions(ctx.model, ctx.processor, labelled, batch_size=ctx.batch_size)
        ctx.cache["projected"] = _vectors(ctx).project_onto(directions)
    return SteeringMethod(
        "CMRM dataset-level, safety component",
        _config(ctx, mode="dataset", vectors=ctx.cache["projected"]),
        _layer_sets(ctx),
        "shift projected on the safety direction",
    )


def cmrm_dataset_blank(ctx: DemoContext) -> SteeringMethod:
    """CMRM dataset-level with the paper's anchor: the shift a blank image causes (prompts only needed)."""
    if "vectors_blank" not in ctx.cache:
        ctx.cache["vectors_blank"] = calibrate(
            ctx.model, ctx.processor, ctx.calibration, anchor="blank", batch_size=ctx.batch_size, progress=ctx.progress
        )
    return SteeringMethod(
        "CMRM dataset-level, blank anchor (paper)",
        _config(ctx, mode="dataset", vectors=ctx.cache["vectors_blank"]),
        _layer_sets(ctx),
        "mean shift a blank image causes, calibration split",
    )


def cmrm_sample_blank(ctx: DemoContext) -> SteeringMethod:
    """CMRM sample-level with the paper's anchor: each input's shift measured with a blank image."""
    return SteeringMethod(
        "CMRM sample-level, blank anchor (paper)",
        _config(ctx, mode="sample", anchor="blank"),
        _layer_sets(ctx),
        "each input's shift with a blank image (two extra passes)",
    )


def shiftdc(ctx: DemoContext) -> SteeringMethod:
    """ShiftDC as published: per-input shift against the captioned counterpart, safety component removed.

    Captions are written by the testbed itself from its caption question (``describe the image .``);
    layer sets start with ShiftDC's default, middle-to-last.
    """
    if "directions" not in ctx.cache:
        labelled = [it for it in ctx.calibration if it.image is not None or it.meta.get("caption")]
        ctx.cache["directions"] = calibrate_shiftdc(
            ctx.model, ctx.processor, labelled, caption_prompt=TESTBED_CAPTION_PROMPT, caption_tokens=8,
            batch_size=ctx.batch_size, progress=ctx.progress,
        )  # fmt: skip
    n = ctx.model.config.get_text_config().num_hidden_layers
    fixed = ctx.steering_defaults.get("layers")
    sets = _layer_sets(ctx) if fixed is not None else [preset_layers("middle-to-last", n), *_layer_sets(ctx)]
    return SteeringMethod(
        "ShiftDC (as published)",
        _config(ctx, directions=ctx.cache["directions"]),
        sets,
        "captioned counterpart, safety direction only, last prompt token",
    )


#: The caption question the testbed was trained to answer (ShiftDC's captions on the testbed).
TESTBED_CAPTION_PROMPT = "describe the image ."

#: The steering rows of the demo, in table order.
STEERING_METHODS: tuple[Callable[[DemoContext], SteeringMethod], ...] = (
    cmrm_dataset,
    cmrm_sample,
    cmrm_safety_component,
)

#: The published variants, added with ``run_demo(all_methods=True)`` / ``vlmsafe demo --all-methods``:
#: CMRM's blank anchor (dataset- and sample-level) and ShiftDC, each chosen on the calibration split.
EXTRA_METHODS: tuple[Callable[[DemoContext], SteeringMethod], ...] = (
    cmrm_dataset_blank,
    cmrm_sample_blank,
    shiftdc,
)


def steering_methods(all_methods: bool = False) -> tuple[Callable[[DemoContext], SteeringMethod], ...]:
    """The demo's steering rows, in table order: the defaults, then the published variants if asked."""
    return STEERING_METHODS + (EXTRA_METHODS if all_methods else ())


def steered_row(ctx: DemoContext, method: SteeringMethod, alphas: Sequence[float]) -> dict[str, Any]:
    """Tune ``method`` on the calibration split, then measure its chosen setting on the test split.

    When no setting qualifies on calibration, the row carries no test rates (its cells print "-") and
    says so: the unsteered model's numbers are never printed under the method's name.
    """
    base = baseline(ctx)
    grid = tune(ctx, method, alphas, base)
    pick = choose(grid, base)
    common = {"calibration_grid": grid_rows(grid, base), "description": method.description}
    if pick is None:
        return {
            "setting": f"multimodal + {method.name}",
            "harmful": None,
            "benign": None,
            "accuracy": None,
            "note": "no setting qualified on calibration",
            "chosen": {"alpha": 0.0, "layers": None, "calibration": None, "rule": RULE.name},
            **common,
        }
    layers, alpha = pick.layers, pick.alpha
    rates = ctx.measure(ctx.generator(method.config(layers, alpha)), "test")
    chosen = {
        "alpha": alpha,
        "layers": "all" if layers is None else layers,
        "calibration": pick.row(base, RULE),
        "rule": RULE.name,
    }
    return {
        "setting": f"multimodal + {method.name}",
        **rates,
        "note": f"alpha={alpha:g}, {layers_label(layers)}",
        "chosen": chosen,
        **common,
    }
