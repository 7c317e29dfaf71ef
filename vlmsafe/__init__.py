"""vlmsafe: make vision-language models safer.

Three remedies and the tools to measure them:

* CMRM steering (:mod:`vlmsafe.steering`): move multimodal hidden states back toward the
  text-only distribution at inference time.
* Safe-CLIP (:mod:`vlmsafe.safeclip`): fine-tune CLIP encoders so unsafe inputs embed near safe ones.
* Safety merge (:mod:`vlmsafe.merge`): merge a VL-adapted language backbone with its aligned original.

The foundation is :mod:`vlmsafe.adapters` (what each model family looks like) and
:mod:`vlmsafe.activations` (record and edit the residual stream).

The names a user needs are here, imported on first access (``import vlmsafe`` itself loads no torch)::

    import vlmsafe

    model, processor = vlmsafe.load_model("assets/testbed")
    vectors = vlmsafe.calibrate(model, processor, vlmsafe.load_items("data.jsonl"))
    print(vlmsafe.SafeVLM(model, processor, vectors).generate("...", image))
"""

__version__ = "0.1.0"

from vlmsafe._lazy import attach
from vlmsafe.errors import VlmsafeError

#: The public face: name -> the module that defines it (loaded on first access).
_EXPORTS: dict[str, str] = {
    # models and data
    "load_model": "vlmsafe.loading",
    "ModelConfig": "vlmsafe.loading",
    "get_adapter": "vlmsafe.adapters",
    "load_items": "vlmsafe.data",
    # steering (CMRM, ShiftDC)
    "calibrate": "vlmsafe.steering.cmrm.calibration",
    "calibrate_shiftdc": "vlmsafe.steering.shiftdc.calibration",
    "steer": "vlmsafe.steering.cmrm.application",
    "ShiftVectors": "vlmsafe.steering.vectors",
    "SafetyDirections": "vlmsafe.steering.shiftdc.directions",
    "SteeringConfig": "vlmsafe.steering.config",
    "SafeVLM": "vlmsafe.steering.safevlm",
    # safety merge
    "MergeConfig": "vlmsafe.merge.config",
    "merge_checkpoints": "vlmsafe.merge.streaming",
    # Safe-CLIP
    "train_safeclip": "vlmsafe.safeclip.trainer",
    "apply_safe_text_encoder": "vlmsafe.safeclip.integrations",
    # evaluation
    "evaluate": "vlmsafe.eval.evaluate",
}
__all__ = ["VlmsafeError", "__version__", *_EXPORTS]

__getattr__, __dir__ = attach(__name__, _EXPORTS)
