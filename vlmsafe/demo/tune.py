"""Choosing a method's setting on the calibration split: the demo's use of :mod:`vlmsafe.eval.sweep`.

A steering method is a family of generators indexed by (layers, alpha). :func:`tune` sweeps the
family on the calibration split with the testbed's exact outcome judge, and :func:`choose` applies
the selection rule :data:`RULE` (``most-refusals``, :data:`vlmsafe.eval.sweep.RULES`): the most
*genuine refusals* of harmful requests (deflections and fragments do not count) among settings whose
image-question accuracy and benign compliance fall, and benign refusals rise, by at most 3 points
against the unsteered model on the same prompts, at the far end of the paired 95% interval. The
test split is never seen by the choice. The grid-and-choose itself lives in :mod:`vlmsafe.eval.sweep`,
shared with ``python -m vlmsafe.steering.compare``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import vlmsafe.demo.progress as bar
from vlmsafe.demo.context import DemoContext, summarize
from vlmsafe.eval import sweep as S
from vlmsafe.steering import SteeringConfig
from vlmsafe.testbed.outcome import answers_correctly

#: The selection rule of every choice the demo makes (steering rows and the merge weight).
RULE = S.get_rule("most-refusals")
MAX_ACCURACY_DROP = next(lim.max_drop for lim in RULE.limits if lim.metric == "accuracy")
MAX_BENIGN_RISE = next(lim.max_rise for lim in RULE.limits if lim.metric == "benign_refusal")


@dataclass
class SteeringMethod:
    """One row of the demo that steers: how to build its config for a (layers, alpha) setting."""

    name: str
    config: Callable[[list[int] | None, float], SteeringConfig]
    layer_sets: Sequence[list[int] | None]
    description: str = ""
    #: the method's own alpha grid (``None``: the demo's); ShiftDC removes only a projection and needs larger ones
    alphas: Sequence[float] | None = None
    #: extra measurements written into the row's ``details`` (e.g. ShiftDC's projection of the shift)
    details: Callable[[], dict[str, Any]] | None = None


def layers_label(layers: list[int] | None) -> str:
    return "all layers" if layers is None else "layer " + ",".join(map(str, layers))


def _summary(report: Any) -> dict[str, Any]:
    """The summary fields of one group's report (the rates :func:`summarize` gives, no intervals)."""
    rates = summarize(report, intervals=False)
    if any(r.reference is not None for r in report.records):
        return {"accuracy": rates["accuracy"]}
    label = report.records[0].label if report.records else "harmful"
    return {label: rates[label]}


def scorer(ctx: DemoContext, split: str = "calibration") -> S.Scorer:
    """The :data:`vlmsafe.eval.sweep.Scorer` of ``split``: outcomes read exactly by the testbed's judge."""
    key = f"scorer_{split}"
    if key not in ctx.cache:
        ctx.cache[key] = S.judge_scorer(
            ctx.calibration if split == "calibration" else ctx.test,
            ctx.judge,
            run=ctx.run,  # the demo's evaluation (its judge, utility and progress bar)
            refused=lambda r: r.judge_category == "refusal",
            complied=lambda r: r.judge_category == "compliance",
            summary=_summary,
            batch_size=ctx.batch_size,
            max_new_tokens=ctx.max_new_tokens,
            utility_fn=answers_correctly,
            progress=ctx.progress,
        )
    return ctx.cache[key]


def baseline(ctx: DemoContext) -> S.Setting:
    """The unsteered model on the calibration split, per item: the reference of every choice (cached)."""
    if "base_setting" not in ctx.cache:
        bar.stage(ctx, "calibration baseline")
        ctx.cache["base_setting"] = S.baseline(ctx.generator(), scorer(ctx), RULE)
    return ctx.cache["base_setting"]


def tune(ctx: DemoContext, method: SteeringMethod, alphas: Sequence[float], base: S.Setting) -> list[S.Setting]:
    """Calibration-split measurements of ``method`` at every layer set and positive alpha
    (:func:`vlmsafe.eval.sweep.sweep`, pruned)."""
    n_settings = len(method.layer_sets) * len([a for a in alphas if a > 0])  # at most: a sweep may stop early
    name = f"tune {method.name}"
    bar.stage(ctx, name, f"{name} 1/{n_settings}")
    tracker = bar.tracker_of(ctx)
    prior = tracker.estimates[name] / n_settings if tracker is not None and n_settings else 0.0

    def on_setting(measured: int, left: int) -> None:
        bar.describe(ctx, f"{name} {measured + 1}/{n_settings}" if left else f"{name}: completing the chosen layers")
        _expect_rest(ctx, measured, left, prior)

    return S.sweep(ctx.generator(), method.config, method.layer_sets, alphas, scorer(ctx), base, RULE,
                   on_setting=on_setting)


#: Weight of the planned cost per setting against the settings measured so far, in settings.
PRIOR_SETTINGS = 5


def _expect_rest(ctx: Any, measured: int, settings_left: int, prior: float) -> None:
    """Tell the demo's bar what the rest of a tuning grid will cost: the settings still to try at the cost per
    setting seen so far, smoothed toward the planned one (``prior``): the first settings cost every group, later
    ones are mostly pruned to their harmful items, so the raw mean of the first few would overshoot."""
    tracker = bar.tracker_of(ctx)
    if tracker is not None and measured:
        per_setting = (prior * PRIOR_SETTINGS + tracker.stage_done) / (PRIOR_SETTINGS + measured)
        tracker.expect(round(per_setting * settings_left))


def choose(grid: Sequence[S.Setting], base: S.Setting) -> S.Setting | None:
    """The chosen setting, or ``None`` when no setting qualified on calibration."""
    return S.choose(grid, base, RULE)


def grid_rows(grid: Sequence[S.Setting], base: S.Setting) -> list[dict[str, Any]]:
    """JSON rows of a grid: rates, alpha, layers, paired differences from unsteered, and whether each qualified."""
    return [s.row(base, RULE) for s in grid]
