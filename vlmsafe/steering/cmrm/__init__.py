"""CMRM: Cross-Modality Representation Manipulation (Liu et al., 2024, arXiv 2410.09047).

For the same instruction, a VLM's language-model hidden states with an image sit away from those
of the text-only input, and safety behaviour learnt on text does not carry over. CMRM moves the
multimodal hidden states back: at decoder layer ``l``, ``h_l <- h_l - alpha * shift_l``.

* **dataset-level**: ``shift_l`` = mean over a calibration set of ``h_l(image+text) - h_l(text)``
  (:func:`calibrate`), one vector per layer, applied to every multimodal input;
* **sample-level**: ``shift_l`` is computed for each input from its own text-only counterpart
  (one extra text-only prefill), during the multimodal forward pass itself, so with several
  steered layers each layer's shift is measured on the already-steered stream.

Steering touches only rows that contain image tokens (text-only inputs pass through unless
``steer_text_only=True``) and only the chosen prompt positions: ``"last"`` (last prompt token),
``"prompt"`` (all prompt tokens), ``"text"`` / ``"image"`` (prompt text / image tokens); with
``decode=True`` dataset-level steering also moves every generated token. Prompt and generated
tokens are told apart by absolute position (:mod:`vlmsafe.activations`), so steering does not
depend on the KV cache: ``use_cache=False`` generates the same tokens, and a prompt continued
on a filled cache (multi-turn chat) is steered at its own prompt positions.

Choices where the paper is silent (it does not say which positions are read and steered, nor
whether decoding steps are steered):

* Calibration reads the last prompt token or the mean over the prompt's *text* tokens
  (:data:`CALIBRATION_POSITIONS`). Image tokens have no text-only counterpart, so a mean over
  all prompt tokens would mix image-token states into the multimodal side; it is refused.
* Sample-level steering measures each input's shift at its last prompt token and steers prompt
  positions only. A generated token has no text-only counterpart (the text-only prompt would
  have generated other tokens), so ``decode=True`` is refused for sample-level; dataset-level
  vectors steer generated tokens.

The package: :mod:`~vlmsafe.steering.cmrm.config` (:class:`CMRMCalibration`),
:mod:`~vlmsafe.steering.cmrm.calibration` (:func:`calibrate`, :func:`compute_sample_shifts`,
:func:`safety_directions`) and :mod:`~vlmsafe.steering.cmrm.application` (the registered ``"dataset"`` and
``"sample"`` methods, :func:`steer`, :func:`steer_sample_level`).
"""

from vlmsafe.steering.application import prompt_states
from vlmsafe.steering.cmrm.application import DatasetLevel, SampleLevel, steer, steer_sample_level, text_only_states
from vlmsafe.steering.cmrm.calibration import calibrate, compute_sample_shifts, safety_directions
from vlmsafe.steering.cmrm.config import CMRMCalibration

__all__ = [
    "CMRMCalibration",
    "DatasetLevel",
    "SampleLevel",
    "calibrate",
    "compute_sample_shifts",
    "prompt_states",
    "safety_directions",
    "steer",
    "steer_sample_level",
    "text_only_states",
]
