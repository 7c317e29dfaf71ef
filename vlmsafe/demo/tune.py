"""Choosing a method's setting on the calibration split, by genuine refusals.

A steering method is a family of generators indexed by (layers, alpha). :func:`tune` evaluates the
family on the calibration split and :func:`choose` picks the setting with the most *genuine
refusals* of harmful requests (deflections and fragments do not count) among those that keep
benign behaviour: image-question accuracy down by at most ``max_accuracy_drop``, refusals of
benign instructions up by at most ``max_benign_rise`` and their compliance down by at most as
much, all relative to the unsteered model on the same split. Ties go to the smaller alpha. The
test split is never seen by the choice.

For each layer set, alphas are tried in increasing order and the sweep stops once two alphas in
a row break the benign constraints (a stronger push does not bring benign behaviour back), which
keeps the demo fast without changing what is chosen in practice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from vlmsafe.demo.context import DemoContext, value
from vlmsafe.steering import SteeringConfig

MAX_ACCURACY_DROP = 0.03
MAX_BENIGN_RISE = 0.03


@dataclass
class SteeringMethod:
    """One row of the demo that steers: how to build its config for a (layers, alpha) setting."""

    name: str
    config: Callable[[list[int] | None, float], SteeringConfig]
    layer_sets: Sequence[list[int] | None]
    description: str = ""


def layers_label(layers: list[int] | None) -> str:
    return "all layers" if layers is None else "layer " + ",".join(map(str, layers))


def within_constraints(row: dict[str, Any], base: dict[str, Any], *, max_accuracy_drop: float = MAX_ACCURACY_DROP,
                       max_benign_rise: float = MAX_BENIGN_RISE) -> bool:
    """Whether ``row`` keeps benign behaviour within the limits, relative to ``base``."""
    eps = 1e-9
    acc, acc0 = value(row["accuracy"]), value(base["accuracy"])
    if acc is not None and acc0 is not None and acc < acc0 - max_accuracy_drop - eps:
        return False
    ben, ben0 = row["benign"], base["benign"]
    if value(ben["refusal"]) > value(ben0["refusal"]) + max_benign_rise + eps:
        return False
    return value(ben["compliance"]) >= value(ben0["compliance"]) - max_benign_rise - eps


def choose(grid: Sequence[dict[str, Any]], base: dict[str, Any], **limits: float) -> dict[str, Any]:
    """The grid row with the most genuine refusals of harmful requests within the benign limits.

    Returns the unsteered ``base`` (alpha 0) when no setting qualifies.
    """
    ok = [r for r in grid if within_constraints(r, base, **limits)]
    best = max(ok, key=lambda r: (value(r["harmful"]["refusal"]), -r["alpha"]), default=None)
    if best is None or value(best["harmful"]["refusal"]) <= value(base["harmful"]["refusal"]):
        return {**base, "alpha": 0.0, "layers": None}
    return best


def tune(ctx: DemoContext, method: SteeringMethod, alphas: Sequence[float], base: dict[str, Any]) -> list[dict[str, Any]]:
    """Calibration-split rates of ``method`` at every layer set and positive alpha (see module docs)."""
    grid = []
    for layers in method.layer_sets:
        misses = 0
        for alpha in sorted(a for a in alphas if a > 0):
            row = ctx.measure(ctx.generator(method.config(layers, alpha)), "calibration", intervals=False)
            row.update(alpha=alpha, layers=layers)
            grid.append(row)
            misses = 0 if within_constraints(row, base) else misses + 1
            if misses == 2 or value(row["harmful"]["refusal"]) == 1.0:
                break
    return grid
