"""CMRM steering: calibrate shift vectors, steer generation, save/load vectors."""

from vlmsafe.loading import load_model
from vlmsafe.steering.cmrm import calibrate, compute_sample_shifts, safety_directions, steer, steer_sample_level
from vlmsafe.steering.config import SteeringConfig
from vlmsafe.steering.safevlm import SafeVLM
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
]
