"""vlmsafe.stats: the Wilson interval against published values, and the Rate every report prints."""

import math

import pytest

from vlmsafe.errors import InputError
from vlmsafe.stats import Rate, wilson_interval


@pytest.mark.parametrize(
    "k, n, low, high",
    [
        (0, 20, 0.0, 0.16113),  # no event in 20 still allows 16%
        (5, 10, 0.23659, 0.76341),
        (10, 10, 0.72247, 1.0),
        (1, 5, 0.03622, 0.62449),
        (81, 263, 0.25529, 0.36621),  # Newcombe (1998), Stat. Med. 17:857, the 81/263 example: 0.2553-0.3662
    ],
)
def test_wilson_interval_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert (lo, hi) == (pytest.approx(low, abs=5e-5), pytest.approx(high, abs=5e-5))


def test_wilson_interval_confidence_and_edges():
    lo95, hi95 = wilson_interval(30, 100)
    lo99, hi99 = wilson_interval(30, 100, confidence=0.99)
    assert lo99 < lo95 < 0.3 < hi95 < hi99  # a wider interval for more confidence
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    for bad in [(-1, 5), (6, 5), (1.5, 5), (True, 5)]:
        with pytest.raises(InputError, match="0 <= k <= n"):
            wilson_interval(*bad)
    with pytest.raises(InputError, match="confidence"):
        wilson_interval(1, 2, confidence=95)


def test_rate_prints_value_interval_and_count():
    assert str(Rate(5, 8)) == "62.5% [30.6\u201386.3] (n=8)"
    assert str(Rate(0, 0)) == "- (n=0)"
    assert Rate(0, 0).value is None and Rate(0, 0).interval is None
    assert Rate(3, 4).to_dict() == {
        "rate": 0.75,
        "ci95": [pytest.approx(0.30064, abs=1e-5), pytest.approx(0.95441, abs=1e-5)],
        "k": 3,
        "n": 4,
    }
    with pytest.raises(InputError):
        Rate(5, 4)


def test_bootstrap_rate_over_prompts():
    from vlmsafe.stats import bootstrap_interval, bootstrap_rate

    flags = [True] * 30 + [False] * 70
    out = bootstrap_rate(flags)
    assert (out["rate"], out["k"], out["n"]) == (0.3, 30, 100)
    lo, hi = out["ci95"]
    wlo, whi = wilson_interval(30, 100)
    assert lo < 0.3 < hi and abs(lo - wlo) < 0.03 and abs(hi - whi) < 0.03  # close to Wilson for iid flags
    assert bootstrap_interval(flags) == bootstrap_interval(flags)  # fixed seed: reproducible
    narrow = bootstrap_interval(flags, confidence=0.5)
    assert lo < narrow[0] < narrow[1] < hi
    # all outcomes equal: a bootstrap cannot vary, the Wilson interval is used instead of [0, 0]
    assert bootstrap_rate([False] * 532)["ci95"] == list(wilson_interval(0, 532))
    assert bootstrap_rate([False] * 532)["ci95"][1] > 0.006
    assert bootstrap_rate([]) == Rate(0, 0).to_dict()
    with pytest.raises(InputError, match="n_boot"):
        bootstrap_interval(flags, n_boot=0)
    with pytest.raises(InputError, match="confidence"):
        bootstrap_interval(flags, confidence=1.5)
