"""The one grid-and-choose (vlmsafe.eval.sweep): the paired margin, the named rules, and that pruning
never changes the choice. No model: a fake steerable generator answers from a table of per-item flags."""

from __future__ import annotations

import random

import pytest

from vlmsafe.errors import InputError
from vlmsafe.eval import sweep as S
from vlmsafe.stats import wilson_interval

N = {"harmful": 100, "benign": 160, "image_questions": 200}


def _flags(n: int, k: int, prefix: str, offset: int = 0) -> dict[str, bool]:
    """``n`` items of which ``k`` are true, starting at item ``offset`` (wrapping)."""
    return {f"{prefix}{i}": (i - offset) % n < k for i in range(n)}


def _setting(refusals: int, correct: int, benign_refusals: int = 0, *, alpha: float = 1.0, layers=None, shift=0):
    """A measured setting: ``refusals`` of 100 harmful, ``correct`` of 200 image questions (items
    ``shift``.. are the correct ones), ``benign_refusals`` of 160 benign instructions."""
    s = S.Setting(layers, alpha)
    s.flags = {
        "harmful_refusal": _flags(N["harmful"], refusals, "h"),
        "harmful_compliance": _flags(N["harmful"], N["harmful"] - refusals, "h", refusals),
        "accuracy": _flags(N["image_questions"], correct, "q", shift),
        "benign_refusal": _flags(N["benign"], benign_refusals, "b"),
        "benign_compliance": _flags(N["benign"], N["benign"] - benign_refusals, "b", benign_refusals),
    }
    return s


BASE = _setting(50, 160, alpha=0.0)


def test_paired_difference_is_zero_for_identical_answers_and_newcombe_otherwise():
    same = _flags(200, 160, "q")
    diff, lo, hi = S.paired_difference(same, same)
    assert diff == 0 and -0.02 < lo <= 0 <= hi < 0.02  # perfectly concordant: a narrow interval
    # all-false on both sides: phi is undefined (0) and the interval is the two Wilson half-widths
    zeros = _flags(159, 0, "b")
    upper = wilson_interval(0, 159)[1]
    assert S.paired_difference(zeros, zeros) == pytest.approx((0.0, -upper, upper))
    # one extra benign refusal in 159: the upper end exceeds 3 points, so a 3-point limit rejects it
    one = _flags(159, 1, "b")
    diff, lo, hi = S.paired_difference(one, zeros)
    assert diff == pytest.approx(1 / 159) and hi > 0.03 and lo < 0 < diff < hi
    with pytest.raises(InputError, match="no item measured in both"):
        S.paired_difference({"a": True}, {"b": True})


def test_paired_margin_rejects_what_the_point_rule_accepts():
    # 6 image questions of 200 lost (3 points exactly): within the point limit, not with the margin
    edge = _setting(90, 154)
    assert S.qualifies(edge, BASE, S.RULES["most-refusals-point"])
    assert not S.qualifies(edge, BASE, S.RULES["most-refusals"])
    # the same answers as unsteered on every benign item qualify under both
    same = _setting(90, 160)
    assert S.qualifies(same, BASE, S.RULES["most-refusals"])
    assert S.qualifies(same, BASE, S.RULES["most-refusals-point"])
    # one extra benign refusal: fine by point estimate (0.6 points), not by the margin
    assert S.qualifies(_setting(90, 160, 1), BASE, S.RULES["most-refusals-point"])
    assert not S.qualifies(_setting(90, 160, 1), BASE, S.RULES["most-refusals"])
    # a setting whose benign part was not measured never qualifies
    partial = _setting(90, 160)
    del partial.flags["benign_refusal"]
    assert not S.qualifies(partial, BASE, S.RULES["most-refusals"])


def test_choose_by_named_rule_ties_to_smaller_alpha_and_none_when_nothing_qualifies():
    grid = [_setting(95, 100, alpha=2.0), _setting(85, 160, alpha=1.0), _setting(85, 160, alpha=0.5),
            _setting(70, 160, alpha=0.25)]
    pick = S.choose(grid, BASE)
    assert (pick.alpha, pick.rate("harmful_refusal")) == (0.5, 0.85)
    assert S.choose([_setting(95, 100), _setting(40, 160)], BASE) is None  # no qualifying setting beats base
    assert S.choose(grid, BASE, "lowest-unsafe").alpha == 0.5  # the same point, read as least compliance
    with pytest.raises(InputError, match="unknown selection rule 'best'"):
        S.choose(grid, BASE, "best")
    rows = [s.row(BASE, S.RULES["most-refusals"]) for s in grid]
    assert [r["qualified"] for r in rows] == [False, True, True, True]
    assert rows[0]["differences"]["accuracy"][0] == pytest.approx(-0.3)


class _Steerable:
    """A fake SafeVLM: ``with_steering(config)`` returns the config, which the scorer reads."""

    def with_steering(self, steering):
        return steering

    def generate(self, prompts, images, *, max_new_tokens=64):  # pragma: no cover - never called
        raise AssertionError


def _scorer(table, calls):
    def score(gen, group):
        key = (None if gen[0] is None else tuple(gen[0]), gen[1])
        calls.append((key, group))
        s = table[key]
        metrics = [m for m, g in S.METRIC_GROUPS.items() if g == group]
        return {m: s.flags[m] for m in metrics}, {f"{group}_rate": s.rate(metrics[0])}

    return score


@pytest.mark.parametrize("seed", range(6))
def test_sweep_prunes_without_changing_the_choice(seed):
    rng = random.Random(seed)
    layer_sets = [None, [0], [1], [2]]
    alphas = [0.25, 0.5, 1.0, 1.5, 2.0]
    table = {}
    for layers in layer_sets:
        refusals, lost = 50, 0
        for a in alphas:  # refusals rise and answers are lost with alpha, at a random pace per layer set
            refusals, lost = min(100, refusals + rng.randint(0, 20)), lost + rng.randint(0, 6)
            key = (None if layers is None else tuple(layers), a)
            table[key] = _setting(refusals, 160 - lost, rng.choice([0, 0, 8]), alpha=a, layers=layers, shift=0)
    calls: list = []
    grid = S.sweep(_Steerable(), lambda layers, alpha: (layers, alpha), layer_sets, [0.0, *alphas],
                   _scorer(table, calls), BASE)
    expected = S.choose(list(table.values()), BASE)
    got = S.choose(grid, BASE)
    assert (got is None) == (expected is None)
    if got is not None:
        assert (got.alpha, got.layers) == (expected.alpha, expected.layers)
        assert all(not s.skipped for s in grid if s.layers == got.layers)  # the chosen curve is complete
    assert len(calls) <= 3 * len(table) and all(k[1] > 0 for k, _ in calls)  # alpha 0 is never re-measured


def test_sweep_skips_settings_that_cannot_win():
    table = {
        (None, 0.5): _setting(90, 160, alpha=0.5),
        (None, 1.0): _setting(95, 100, alpha=1.0),
        (None, 2.0): _setting(97, 90, alpha=2.0),
        ((0,), 0.5): _setting(60, 160, alpha=0.5, layers=[0]),
        ((0,), 1.0): _setting(60, 160, alpha=1.0, layers=[0]),
        ((0,), 2.0): _setting(60, 160, alpha=2.0, layers=[0]),
    }
    calls: list = []
    grid = S.sweep(_Steerable(), lambda layers, alpha: (layers, alpha), [None, [0]], [0.5, 1.0, 2.0],
                   _scorer(table, calls), BASE)
    assert [g for k, g in calls if k[0] == (0,)] == ["harmful"] * 3  # never better than 90%: benign unmeasured
    assert [s.skipped for s in grid if s.layers == [0]] == [["image_questions", "benign"]] * 3
    pick = S.choose(grid, BASE)
    assert (pick.alpha, pick.layers) == (0.5, None)
    assert all(not s.skipped for s in grid if s.layers is None)  # the chosen sweep completed for its plot


def test_sweep_refuses_a_generator_that_cannot_be_steered():
    with pytest.raises(InputError, match="with_steering"):
        S.sweep(object(), lambda layers, alpha: None, [None], [1.0], _scorer({}, []), BASE)


def test_eval_sweep_imports_nothing_from_steering():
    import ast
    from pathlib import Path

    tree = ast.parse(Path(S.__file__).read_text())
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if n.startswith(("vlmsafe.steering", "vlmsafe.demo", "vlmsafe.testbed"))]
