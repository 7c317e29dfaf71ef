"""vlmsafe: make vision-language models safer.

Three remedies and the tools to measure them:

* CMRM steering (:mod:`vlmsafe.steering`): move multimodal hidden states back toward the
  text-only distribution at inference time.
* Safe-CLIP (:mod:`vlmsafe.safeclip`): fine-tune CLIP encoders so unsafe inputs embed near safe ones.
* Safety merge (:mod:`vlmsafe.merge`): merge a VL-adapted language backbone with its aligned original.

The foundation is :mod:`vlmsafe.adapters` (what each model family looks like) and
:mod:`vlmsafe.activations` (record and edit the residual stream).
"""

__version__ = "0.1.0"

from vlmsafe.errors import VlmsafeError

__all__ = ["VlmsafeError", "__version__"]
