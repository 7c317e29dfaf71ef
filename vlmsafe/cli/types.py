"""``argparse`` types: the library's checks (:mod:`vlmsafe.validation`) at parse time.

A bad value (``--alpha nan``, ``--limit -1``, ``--max-shard-size 0``) is refused in one line naming the
flag before any model is loaded; the range checked is the one the library checks for the parameter.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from vlmsafe.errors import InputError, LayerIndexError
from vlmsafe.validation import LAYER_PRESETS, SEED_MAX, _interval, parse_layer_spec, parse_size


def float_arg(
    *, low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An ``argparse`` ``type=`` accepting finite floats in the given range."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (low is not None and (x < low or (low_open and x == low))) or (
            high is not None and (x > high or (high_open and x == high))
        ):
            raise argparse.ArgumentTypeError(f"must be {_interval(low, high, low_open, high_open)}, got {text}")
        return x

    parse.__name__ = "number"
    return parse


def int_arg(*, low: int | None = 1, high: int | None = None) -> Callable[[str], int]:
    """An ``argparse`` ``type=`` accepting integers in ``[low, high]`` (default: positive)."""

    def parse(text: str) -> int:
        try:
            x = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (low is not None and x < low) or (high is not None and x > high):
            raise argparse.ArgumentTypeError(f"must be {_interval(low, high, False, False)}, got {x}")
        return x

    parse.__name__ = "integer"
    return parse


def seed_arg() -> Callable[[str], int]:
    """An ``argparse`` ``type=`` for a random seed: an integer in ``[0, 2**32 - 1]``."""
    return int_arg(low=0, high=SEED_MAX)


def float_list_arg(*, low: float | None = None, high: float | None = None) -> Callable[[str], tuple[float, ...]]:
    """An ``argparse`` ``type=`` for comma-separated finite floats (e.g. ``--alphas 0,0.5,1``)."""
    one = float_arg(low=low, high=high)

    def parse(text: str) -> tuple[float, ...]:
        parts = [p for p in text.replace(" ", "").split(",") if p]
        if not parts:
            raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
        return tuple(one(p) for p in parts)

    parse.__name__ = "numbers"
    return parse


def layer_spec_arg(text: str) -> str:
    """An ``argparse`` ``type=`` checking a layer selection (``all``, ``middle-to-last``, ``8-15``, ``4,8``)."""
    if text.strip().lower() in LAYER_PRESETS:
        return text.strip().lower()
    try:
        parse_layer_spec(text)
    except LayerIndexError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text



def size_arg(text: str) -> str:
    """An ``argparse`` ``type=`` for ``--max-shard-size``: checked by :func:`parse_size` at parse time."""
    try:
        parse_size(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def csv_arg(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return parts


def unit_pair_arg(text: str) -> tuple[float, float]:
    """Two comma-separated numbers in [0, 1) (Adam's betas)."""
    one = float_arg(low=0, high=1, high_open=True)
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two comma-separated numbers such as 0.9,0.999, got {text!r}")
    return one(parts[0]), one(parts[1])


def colour_arg(text: str) -> tuple[int, int, int]:
    """An ``argparse`` ``type=`` for a colour: ``R,G,B`` with each in 0..255, or one grey level."""
    from vlmsafe.images import check_colour

    try:
        parts = tuple(int(p) for p in text.replace(" ", "").split(","))
        return check_colour(parts[0] if len(parts) == 1 else parts, "colour")
    except (ValueError, InputError) as exc:
        raise argparse.ArgumentTypeError(f"expected R,G,B with each in 0..255 (e.g. 255,255,255), got {text!r}"
                                         + (f" ({exc})" if isinstance(exc, InputError) else "")) from None
