"""Inference-time steering: CMRM (shift vectors, dataset- and sample-level) and ShiftDC (safety directions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmsafe._lazy import attach

if TYPE_CHECKING:  # static analysers see the real names; at run time they load on first access
    from vlmsafe.loading import load_model
    from vlmsafe.steering.anchors import ANCHORS, anchor_image
    from vlmsafe.steering.cmrm import calibrate, compute_sample_shifts, safety_directions, steer, steer_sample_level
    from vlmsafe.steering.config import SteeringConfig
    from vlmsafe.steering.directions import SafetyDirections
    from vlmsafe.steering.safevlm import SafeVLM
    from vlmsafe.steering.shiftdc import calibrate_shiftdc, generate_captions, steer_shiftdc
    from vlmsafe.steering.vectors import ShiftAccumulator, ShiftVectors, calibration_meta

#: Public name -> the module that defines it (``module:attr`` for an alias).
_EXPORTS: dict[str, str] = {
    "ANCHORS": "vlmsafe.steering.anchors",
    "SafeVLM": "vlmsafe.steering.safevlm",
    "SafetyDirections": "vlmsafe.steering.directions",
    "ShiftAccumulator": "vlmsafe.steering.vectors",
    "ShiftVectors": "vlmsafe.steering.vectors",
    "SteeringConfig": "vlmsafe.steering.config",
    "anchor_image": "vlmsafe.steering.anchors",
    "calibrate": "vlmsafe.steering.cmrm",
    "calibrate_shiftdc": "vlmsafe.steering.shiftdc",
    "calibration_meta": "vlmsafe.steering.vectors",
    "compute_sample_shifts": "vlmsafe.steering.cmrm",
    "generate_captions": "vlmsafe.steering.shiftdc",
    "load_model": "vlmsafe.loading",
    "safety_directions": "vlmsafe.steering.cmrm",
    "steer": "vlmsafe.steering.cmrm",
    "steer_sample_level": "vlmsafe.steering.cmrm",
    "steer_shiftdc": "vlmsafe.steering.shiftdc",
}
__getattr__, __dir__ = attach(__name__, _EXPORTS)

__all__ = [
    "ANCHORS",
    "SafeVLM",
    "SafetyDirections",
    "ShiftAccumulator",
    "ShiftVectors",
    "SteeringConfig",
    "anchor_image",
    "calibrate",
    "calibrate_shiftdc",
    "calibration_meta",
    "compute_sample_shifts",
    "generate_captions",
    "load_model",
    "safety_directions",
    "steer",
    "steer_sample_level",
    "steer_shiftdc",
]
