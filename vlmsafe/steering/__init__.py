"""Inference-time steering: CMRM (shift vectors, dataset- and sample-level) and ShiftDC (safety directions)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmsafe._lazy import attach

if TYPE_CHECKING:  # the public names and their modules, for static tools; at run time
    # vlmsafe._lazy.attach reads this block and loads each name's module on first access
    from vlmsafe.loading import load_model
    from vlmsafe.steering.anchors import ANCHORS, anchor_image
    from vlmsafe.steering.cmrm import calibrate, compute_sample_shifts, safety_directions, steer, steer_sample_level
    from vlmsafe.steering.config import SteeringConfig
    from vlmsafe.steering.directions import SafetyDirections
    from vlmsafe.steering.safevlm import SafeVLM
    from vlmsafe.steering.shiftdc import calibrate_shiftdc, generate_captions, steer_shiftdc
    from vlmsafe.steering.vectors import ShiftAccumulator, ShiftVectors, calibration_meta

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

__getattr__, __dir__ = attach(__name__)
