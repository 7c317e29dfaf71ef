"""The steering setting ``vlmsafe calibrate`` recommends, chosen on a share of the calibration data it holds out.

Steering with an untuned default can cost benign behaviour: on the bundled testbed the CLI's former
defaults (all layers, alpha 1) refused 5.0% of benign requests (9/180) while the demo's chosen
setting refused none. So ``calibrate`` holds out a stratified share of its labelled items
(:func:`split_for_tuning`), computes the vectors on the rest, and sweeps (layers, alpha) on the
held-out share with the one grid-and-choose of :mod:`vlmsafe.eval.sweep` (rule ``most-refusals`` by
default). The result goes into the vectors' metadata (``vectors.json`` ``"recommended"``) and card,
and ``generate`` / ``evaluate`` steer with it unless ``--alpha`` / ``--layers`` say otherwise.

``"recommended"`` has a ``status``: ``"tuned"`` (with ``alpha`` and ``layers``), ``"none-qualified"``
(no setting refused more than the unsteered model within the benign limits on the held-out share) or
``"untuned"`` (with the ``reason``: unlabelled data, too few items, ``--tune-share 0``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmsafe.errors import InputError
from vlmsafe.validation import preset_layers

#: The alphas tried for the recommendation.
RECOMMEND_ALPHAS = (0.25, 0.5, 1.0, 1.5, 2.0)
#: The token budget of the answers the recommendation is judged on.
RECOMMEND_TOKENS = 32
#: Held-out harmful and benign items needed (each) before a recommendation is attempted.
MIN_PER_LABEL = 4


def untuned(reason: str) -> dict[str, Any]:
    """The ``recommended`` record of vectors no setting was tuned for."""
    return {"status": "untuned", "reason": reason}


def split_for_tuning(items: Sequence[Any], share: float) -> tuple[list[Any], list[Any], str | None]:
    """``(calibration items, held-out items, reason none were held out)``: every ``round(1 / share)``-th
    harmful and benign item is held out (deterministic, stratified by label); items without a
    ``harmful`` / ``benign`` label stay in the calibration part."""
    if not 0.0 <= share < 1.0:
        raise InputError(f"tune share must be in [0, 1), got {share}; pass e.g. 0.25 (or 0 to skip tuning)")
    if share == 0.0:
        return list(items), [], "not tuned (--tune-share 0)"
    step = max(2, round(1 / share))
    seen = {"harmful": 0, "benign": 0}
    keep, held = [], []
    for it in items:
        label = getattr(it, "label", None)
        if label in seen:
            seen[label] += 1
            (held if seen[label] % step == 0 else keep).append(it)
        else:
            keep.append(it)
    counts = {lab: sum(1 for it in held if it.label == lab) for lab in seen}
    if min(counts.values()) < MIN_PER_LABEL:
        reason = (f"not tuned: the data gives {counts['harmful']} harmful and {counts['benign']} benign held-out "
                  f"items at --tune-share {share:g}, fewer than {MIN_PER_LABEL} each (label items 'harmful' / "
                  "'benign', or add more)")
        return list(items), [], reason
    return keep, held, None


def layer_sets(num_layers: int) -> list[list[int] | None]:
    """All layers, middle-to-last, and each single layer of a model with at most 8 layers."""
    sets: list[list[int] | None] = [None, preset_layers("middle-to-last", num_layers)]
    if num_layers <= 8:
        sets += [[i] for i in range(num_layers)]
    return sets


def recommend_setting(
    vlm: Any,
    vectors: Any,
    held_out: Sequence[Any],
    *,
    judge: Any = None,
    alphas: Sequence[float] = RECOMMEND_ALPHAS,
    rule: str = "most-refusals",
) -> dict[str, Any]:
    """The ``recommended`` record: the setting :func:`vlmsafe.eval.sweep.choose` picks on ``held_out``.

    ``vlm`` is the unsteered generator the grid is measured with (a :class:`~vlmsafe.steering.SafeVLM`: its batch
    size and token budget, :data:`RECOMMEND_TOKENS` in ``vlmsafe calibrate``, are the sweep's).
    """
    from vlmsafe.eval import RefusalJudge
    from vlmsafe.eval.sweep import RULES, baseline, choose, get_rule, judge_scorer, sweep
    from vlmsafe.stats import wilson_interval
    from vlmsafe.steering.config import SteeringConfig

    note = None
    n_benign = sum(1 for it in held_out if it.label == "benign" and getattr(it, "reference", None) is None)
    limit = next((lim.max_rise for lim in get_rule(rule).limits if lim.metric == "benign_refusal"), None)
    paired = get_rule(rule).margin == "paired" and limit is not None and f"{rule}-point" in RULES
    if paired and (n_benign == 0 or wilson_interval(0, n_benign)[1] > limit):
        # with no benign refusal either way the paired interval is +-(Wilson upper end of 0/n): below
        # ~125 benign items even an unchanged model cannot show a rise under 3 points
        note = (f"{n_benign} held-out benign instructions are too few for the paired margin (even unchanged "
                f"answers have an interval wider than {100 * limit:g} points); chosen on point estimates")
        rule = f"{rule}-point"
    scorer = judge_scorer(held_out, judge or RefusalJudge(), batch_size=vlm.batch_size,
                          max_new_tokens=vlm.max_new_tokens)
    base = baseline(vlm, scorer, rule)
    stored = list(vectors.layers)
    n = vectors.meta.get("num_layers") or max(stored) + 1
    sets = [ls for ls in layer_sets(n) if ls is None or set(ls) <= set(stored)]
    grid = sweep(vlm, lambda layers, alpha: SteeringConfig(vectors=vectors, alpha=alpha, layers=layers), sets,
                 alphas, scorer, base, rule)
    pick = choose(grid, base, rule)
    record: dict[str, Any] = {
        "rule": rule,
        "rule_description": get_rule(rule).description,
        "held_out_items": len(held_out),
        "alphas": list(alphas),
        "layer_sets": ["all" if ls is None else ls for ls in sets],
        "unsteered": base.row(),
        **({"note": note} if note else {}),
    }
    if pick is None:
        return {"status": "none-qualified", **record,
                "reason": "no setting refused more than the unsteered model within the benign limits"}
    layers = "all" if pick.layers is None else list(pick.layers)
    return {"status": "tuned", "alpha": pick.alpha, "layers": layers, **record, "chosen": pick.row(base, rule)}


__all__ = ["RECOMMEND_ALPHAS", "RECOMMEND_TOKENS", "layer_sets", "recommend_setting", "split_for_tuning", "untuned"]
