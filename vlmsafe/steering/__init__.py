"""Inference-time steering: CMRM (shift vectors, dataset- and sample-level) and ShiftDC (safety directions)."""

from vlmsafe.loading import load_model
from vlmsafe.steering.anchors import ANCHORS, anchor_image
from vlmsafe.steering.cmrm import calibrate, compute_sample_shifts, safety_directions, steer, steer_sample_level
from vlmsafe.steering.config import SteeringConfig
from vlmsafe.steering.directions import SafetyDirections
from vlmsafe.steering.safevlm import SafeVLM
from vlmsafe.steering.shiftdc import calibrate_shiftdc, generate_captions, steer_shiftdc
from vlmsafe.steering.vectors import ShiftAccumulator, ShiftVectors, calibration_meta

__all__ = [
    "calibrate",
    "safety_directions",
    "compute_sample_shifts",
    "steer",
    "steer_sample_level",
    "SteeringConfig",
    "SafeVLM",
    "ShiftVectors",
    "ShiftAccumulator",
    "calibration_meta",
    "load_model",
    "ANCHORS",
    "anchor_image",
    "SafetyDirections",
    "calibrate_shiftdc",
    "generate_captions",
    "steer_shiftdc",
]
