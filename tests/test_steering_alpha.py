"""One rule for the steering strength: every entry point refuses the same alphas with the same message."""

from __future__ import annotations

import math

import pytest
import torch

from vlmsafe.cli.options import add_steering_options
from vlmsafe.cli.parsing import ArgumentParser
from vlmsafe.errors import InputError
from vlmsafe.steering import ShiftVectors, SteeringConfig, steer, steer_sample_level, steer_shiftdc
from vlmsafe.steering.choices import MAX_ALPHA, check_alpha
from vlmsafe.testing import tiny_llava

BAD = [-5.0, -1e-9, math.nan, math.inf, MAX_ALPHA * 1.001]


@pytest.fixture(scope="module")
def model():
    return tiny_llava()[0]


@pytest.mark.parametrize("alpha", BAD)
def test_every_entry_point_refuses_the_same_alphas(model, alpha):
    with pytest.raises(InputError) as want:
        check_alpha(alpha)
    hidden = model.config.text_config.hidden_size
    vectors = ShiftVectors(shifts={0: torch.zeros(hidden)}, meta={"num_layers": 3})
    entry_points = [
        lambda: steer(model, vectors, alpha=alpha).__enter__(),
        lambda: steer_sample_level(model, {0: torch.zeros(1, hidden)}, alpha).__enter__(),
        lambda: steer_shiftdc(model, None, alpha, prompts=["x"], images=[None]).__enter__(),
        lambda: SteeringConfig(vectors=vectors, alpha=alpha),
    ]
    for call in entry_points:
        with pytest.raises(InputError) as got:
            call()
        assert str(got.value) == str(want.value)
    parser = ArgumentParser(prog="t")
    add_steering_options(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--alpha", repr(alpha)])


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, MAX_ALPHA])
def test_the_range_ends_are_accepted_everywhere(model, alpha):
    assert check_alpha(alpha) == alpha
    assert SteeringConfig(mode="sample", alpha=alpha).alpha == alpha
