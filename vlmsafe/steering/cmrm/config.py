"""How CMRM vectors are calibrated: :class:`CMRMCalibration`, every option checked once, where it is declared.

``calibrate(model, processor, items, CMRMCalibration(...))`` or, the same, ``calibrate(model, processor,
items, layers=..., anchor=...)``: the keyword arguments are this dataclass's fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmsafe.errors import InputError
from vlmsafe.images import BLANK_COLOUR, NOISE_SEED, check_colour
from vlmsafe.steering.anchors import check_anchor
from vlmsafe.steering.choices import CALIBRATION_POSITIONS
from vlmsafe.steering.cmrm.aggregation import Aggregator, mean_shift, resolve_aggregate
from vlmsafe.validation import LAYER_PRESETS, check_int, parse_layer_spec


def check_read_positions(positions: object, allowed: tuple[str, ...], where: str) -> None:
    """Positions a state is read at: ``allowed`` ones only (``"prompt"`` refused where image tokens would mix in)."""
    if positions == "prompt" and "prompt" not in allowed:
        raise InputError(f"{where}: positions='prompt' would average image tokens into the multimodal side, and they "
                         "have no text-only counterpart; use positions='text' (the prompt's text tokens) or 'last'")
    if positions not in allowed:
        raise InputError(f"{where}: unknown read positions {positions!r}; use one of {allowed}")


@dataclass(frozen=True)
class CMRMCalibration:
    """Options of dataset-level CMRM calibration (:func:`~vlmsafe.steering.cmrm.calibrate`).

    ``layers``: the decoder layers read (default all). ``positions``: the ``"last"`` prompt token or the
    prompt's ``"text"`` tokens (image tokens have no text-only counterpart). ``anchor``: the image each shift
    is measured with (:mod:`vlmsafe.steering.anchors`: ``"real"``, ``"blank"`` in ``anchor_colour``,
    ``"noise"`` from ``anchor_seed``, or a PIL image). ``aggregate``: how per-item shifts become one vector
    per layer, a function ``fn(per_item_shifts, mean) -> vector`` (default
    :func:`~vlmsafe.steering.cmrm.aggregation.mean_shift`;
    a name of :data:`~vlmsafe.steering.cmrm.aggregation.AGGREGATORS` is mapped to its function). ``batch_size`` items
    run per forward pass, built with ``system_prompt``.
    """

    layers: Any = None
    positions: str = "last"
    batch_size: int = 8
    system_prompt: str | None = None
    anchor: Any = "real"
    anchor_colour: Any = BLANK_COLOUR
    anchor_seed: int = NOISE_SEED
    aggregate: Aggregator = mean_shift

    def __post_init__(self) -> None:
        check_read_positions(self.positions, CALIBRATION_POSITIONS, "calibrate")
        object.__setattr__(self, "aggregate", resolve_aggregate(self.aggregate)[1])  # refused before any model work
        check_anchor(self.anchor, self.anchor_colour, self.anchor_seed)
        object.__setattr__(self, "anchor_colour", check_colour(self.anchor_colour, "anchor colour"))
        check_int(self.batch_size, "batch_size", low=1)
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            parse_layer_spec(self.layers)  # syntax errors now, not after a model is loaded

    @property
    def keeps_items(self) -> bool:
        """Whether the aggregation needs every item's shift (anything but the mean)."""
        return self.aggregate is not mean_shift


__all__ = ["CMRMCalibration", "check_read_positions"]
