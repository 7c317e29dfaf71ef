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

if TYPE_CHECKING:  # static analysers see the real names; at run time they load on first access
    from vlmsafe.loading import load_model
    from vlmsafe.steering.anchors import ANCHORS, anchor_image
    from vlmsafe.steering.cmrm import (
        CMRMCalibration,
        calibrate,
        compute_sample_shifts,
        safety_directions,
        steer,
        steer_sample_level,
    )
    from vlmsafe.steering.config import SteeringConfig
    from vlmsafe.steering.registry import (
        SteeringMethod,
        get_steering_method,
        register_steering_method,
        steering_methods,
    )
    from vlmsafe.steering.safevlm import SafeVLM
    from vlmsafe.steering.shiftdc import (
        SafetyDirections,
        ShiftDCCalibration,
        calibrate_shiftdc,
        generate_captions,
        steer_shiftdc,
    )
    from vlmsafe.steering.vectors import ShiftAccumulator, ShiftVectors, calibration_meta

#: Public name -> the module that defines it (``module:attr`` for an alias).
_EXPORTS: dict[str, str] = {
    "ANCHORS": "vlmsafe.steering.anchors",
    "CMRMCalibration": "vlmsafe.steering.cmrm.config",
    "SafeVLM": "vlmsafe.steering.safevlm",
    "SafetyDirections": "vlmsafe.steering.shiftdc.directions",
    "ShiftAccumulator": "vlmsafe.steering.vectors",
    "ShiftDCCalibration": "vlmsafe.steering.shiftdc.config",
    "ShiftVectors": "vlmsafe.steering.vectors",
    "SteeringConfig": "vlmsafe.steering.config",
    "SteeringMethod": "vlmsafe.steering.registry",
    "anchor_image": "vlmsafe.steering.anchors",
    "calibrate": "vlmsafe.steering.cmrm.calibration",
    "calibrate_shiftdc": "vlmsafe.steering.shiftdc.calibration",
    "calibration_meta": "vlmsafe.steering.vectors",
    "compute_sample_shifts": "vlmsafe.steering.cmrm.calibration",
    "generate_captions": "vlmsafe.steering.shiftdc.captions",
    "get_steering_method": "vlmsafe.steering.registry",
    "load_model": "vlmsafe.loading",
    "register_steering_method": "vlmsafe.steering.registry",
    "safety_directions": "vlmsafe.steering.cmrm.calibration",
    "steer": "vlmsafe.steering.cmrm.application",
    "steer_sample_level": "vlmsafe.steering.cmrm.application",
    "steer_shiftdc": "vlmsafe.steering.shiftdc.application",
    "steering_methods": "vlmsafe.steering.registry",
}
__getattr__, __dir__ = attach(__name__, _EXPORTS)

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
