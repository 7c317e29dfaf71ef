"""The values each steering option can take, in one module that imports nothing heavy.

The command line builds its flags (choices, ranges, defaults) from these before any model code is imported,
so ``vlmsafe --help`` never pays for torch; the steering modules import them from here, so a flag and the
code behind it cannot disagree.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vlmsafe.errors import InputError
from vlmsafe.options import refuse_unknown
from vlmsafe.validation import check_float

#: Prompt positions a shift can be applied at.
STEER_POSITIONS = ("last", "prompt", "text", "image")
#: Positions a shift can be read at: both sides of the pair have them (image tokens have no text-only twin).
CALIBRATION_POSITIONS = ("last", "text")
#: Positions text-only states can be read at (no image tokens involved).
TEXT_READ_POSITIONS = ("last", "prompt", "text")
#: Images a CMRM shift is measured with: each item's own, a uniform one (the CMRM paper), or seeded noise.
ANCHORS = ("real", "blank", "noise")
#: How per-item shifts become one vector per layer: their mean, or their first principal component.
AGGREGATES = ("mean", "pca")
#: ShiftDC: read each layer's image shift from an unsteered pass or from the already-corrected stream.
SHIFT_FROM = ("unsteered", "running")
#: ShiftDC's default layers (the reference code's n//2..n-1).
SHIFTDC_LAYERS = "middle-to-last"
#: The steering strength when none is given: the papers' setting (``SteeringConfig.alpha``, ``steer``, ``--alpha``,
#: and what a card states when the artefact records none).
DEFAULT_ALPHA = 1.0
#: The largest steering strength accepted. The papers use about 1; a small safety component (ShiftDC on a
#: tiny model) can need a few hundred. A negative alpha would push states further from the text-only
#: distribution (CMRM reversed), and a huge one overflows the hidden states into empty answers.
MAX_ALPHA = 1000.0


def check_positions(positions: object) -> None:
    """The one check of the prompt positions a shift is applied at: a name of :data:`STEER_POSITIONS` or a
    ``(batch, seq)`` boolean mask (a tensor, checked against the batch when it is used)."""
    if isinstance(positions, str) and positions in STEER_POSITIONS:
        return
    if isinstance(positions, str) or not hasattr(positions, "shape"):
        raise InputError(f"unknown steering positions {positions!r}; use one of {STEER_POSITIONS} "
                         "(and decode=True to also steer generated tokens)")


def check_alpha(alpha: object) -> float:
    """The one check of a steering strength, for every entry point (``steer``, ``steer_sample_level``,
    ``steer_shiftdc``, :class:`~vlmsafe.steering.config.SteeringConfig`, ``--alpha``): finite, in [0, MAX_ALPHA]."""
    return check_float(alpha, "alpha", low=0.0, high=MAX_ALPHA)


def with_options(config: Any, options: dict[str, Any], default: Any) -> Any:
    """``config`` (``None``: ``default``) with ``options`` set: how a function taking a method's config dataclass
    also takes its fields as keyword arguments (``calibrate(model, processor, items, layers="8-15")``). The
    dataclass checks every value once, where it is declared; a name it does not have is refused with those it has.
    """
    base = default if config is None else config
    if not options:
        return base
    refuse_unknown(type(base), options)
    return replace(base, **options)
