"""Copies kept on purpose agree with their original (transformers' ``check_copies`` habit).

A function that repeats another one (a numpy twin of a torch loss, say) carries a ``# Copied from
<module>.<name>`` comment right above it. Every such marker must have a check here, and each check
runs both on the same inputs: a fix made to one side that the other misses fails this file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^# Copied from ([\w.]+)", re.M)


def _cosine_distance() -> None:
    from probes.shift import cosine_distance as copy
    from vlmsafe.safeclip.losses import cosine_distance as original

    rng = np.random.default_rng(0)
    for n, d in [(1, 3), (5, 8), (17, 64)]:
        x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
        y[0] = -x[0]  # opposite rows: distance 2
        assert copy(x, y) == pytest.approx(float(original(torch.tensor(x), torch.tensor(y))), abs=1e-6)
    assert copy(x, x) == pytest.approx(0.0, abs=1e-6)


#: "<file of the copy>: <original>" -> a check that runs both.
CHECKS = {
    "probes/shift.py: vlmsafe.safeclip.losses.cosine_distance": _cosine_distance,
}


def _markers() -> list[str]:
    found = []
    for path in [*ROOT.joinpath("vlmsafe").rglob("*.py"), *ROOT.joinpath("probes").rglob("*.py")]:
        for original in MARKER.findall(path.read_text(encoding="utf-8")):
            found.append(f"{path.relative_to(ROOT).as_posix()}: {original}")
    return sorted(found)


def test_every_copy_has_a_check():
    assert _markers() == sorted(CHECKS), "a '# Copied from' marker without a check here (or a check without one)"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_copies_agree(name):
    CHECKS[name]()
