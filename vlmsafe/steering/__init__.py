"""Inference-time steering, one front door: methods as registered objects, applied by ``SafeVLM`` or the artefact.

* :mod:`vlmsafe.steering.cmrm`: CMRM, dataset-level (calibrated :class:`ShiftVectors`) and sample-level;
* :mod:`vlmsafe.steering.shiftdc`: ShiftDC (calibrated :class:`SafetyDirections`);
* :mod:`vlmsafe.steering.registry`: ``register_steering_method`` / ``get_steering_method``: each method package
  registers its methods, :class:`SteeringConfig` (``mode=NAME``) looks them up;
* shared: :class:`SteeringConfig` (how steering is applied), :class:`SafeVLM` (generation under any steering
  object), the vectors artefact, anchors, items, and the recommended setting (:mod:`~vlmsafe.steering.recommend`).

Safety directions, wherever they are read, point from harmful to benign (benign minus harmful).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmsafe._lazy import attach

if TYPE_CHECKING:  # the public names and their modules, for static tools; at run time
    # vlmsafe._lazy.attach reads this block and loads each name's module on first access
    from vlmsafe.loading import load_model
    from vlmsafe.steering.anchors import ANCHORS, anchor_image
    from vlmsafe.steering.cmrm.aggregation import ShiftAccumulator
    from vlmsafe.steering.cmrm.application import steer, steer_sample_level
    from vlmsafe.steering.cmrm.calibration import calibrate, compute_sample_shifts, safety_directions
    from vlmsafe.steering.cmrm.config import CMRMCalibration
    from vlmsafe.steering.config import SteeringConfig
    from vlmsafe.steering.registry import (
        SteeringMethod,
        get_steering_method,
        register_steering_method,
        steering_methods,
    )
    from vlmsafe.steering.safevlm import SafeVLM
    from vlmsafe.steering.shiftdc.application import steer_shiftdc
    from vlmsafe.steering.shiftdc.calibration import calibrate_shiftdc
    from vlmsafe.steering.shiftdc.captions import generate_captions
    from vlmsafe.steering.shiftdc.config import ShiftDCCalibration
    from vlmsafe.steering.shiftdc.directions import SafetyDirections
    from vlmsafe.steering.vectors import ShiftVectors, calibration_meta

__all__ = [
    "ANCHORS",
    "CMRMCalibration",
    "SafeVLM",
    "SafetyDirections",
    "ShiftAccumulator",
    "ShiftDCCalibration",
    "ShiftVectors",
    "SteeringConfig",
    "SteeringMethod",
    "anchor_image",
    "calibrate",
    "calibrate_shiftdc",
    "calibration_meta",
    "compute_sample_shifts",
    "generate_captions",
    "get_steering_method",
    "load_model",
    "register_steering_method",
    "safety_directions",
    "steer",
    "steer_sample_level",
    "steer_shiftdc",
    "steering_methods",
]

__getattr__, __dir__ = attach(__name__)
