"""CMRM steering: calibrate shift vectors, steer generation, save/load vectors."""

from vlmsafe.steering.cmrm import calibrate, compute_sample_shifts, safety_directions, steer, steer_sample_level
from vlmsafe.steering.safevlm import SafeVLM, load_model
from vlmsafe.steering.vectors import ShiftVectors

__all__ = ["calibrate", "safety_directions", "compute_sample_shifts", "steer", "steer_sample_level", "SafeVLM", "ShiftVectors", "load_model"]
