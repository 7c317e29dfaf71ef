"""ShiftDC: remove only the safety-relevant part of the shift an image causes, per input.

Source: Zou et al., "Understanding and Rectifying Safety Perception Distortion in VLMs" (ShiftDC),
arXiv 2502.13095, NeurIPS 2025; reference code github.com/Renovamen/ShiftDC (read at commit df91f41;
file names below are that repository's).

* **Counterpart.** An input's text-only counterpart is its prompt plus a caption of its image,
  ``"{prompt} Image Caption: {caption}"`` (:data:`COUNTERPART_TEMPLATE`; the reference's
  ``ANSWER_Q_BASED_ON_CAPTION`` in ``shiftdc/utils/prompt.py``).
* **Safety direction.** Per layer, ``s_l`` = mean last-token state of benign counterparts minus that
  of harmful ones, over a labelled calibration set (:func:`calibrate_shiftdc`; the reference:
  ``run_safety_shift.py``, LLaVA-Instruct vs MM-SafetyBench items prepared by
  ``scripts/prepare_steer.py``). The projection does not depend on its sign.
* **Correction.** Per input and layer, ``m_l = x_l(prompt + image) - x_l(counterpart)`` at the last
  token, and ``alpha * (m_l . s_l / s_l . s_l) s_l`` is subtracted from the last prompt token at
  prefill, at layers from the middle to the last (:func:`steer_shiftdc`; the reference:
  ``run_shiftdc.py``, ``compute_shift_components``).

What the reference code does, point by point, and what vlmsafe does (see README "Methods and their
sources"):

* **Prefill only, in both.** The reference's hook (``add_prefill_hooks`` in ``shiftdc/utils/hooks.py``)
  subtracts the correction at the last position once per layer and then sets a per-layer
  ``applied`` flag that stops it on every later call, so generated tokens are not corrected. vlmsafe
  corrects the prefill only too, unless ``decode=True`` (then every generated token gets the prompt's
  correction; not the reference's behaviour).
* **Chat template.** The reference reads the image + text states through the processor's chat
  template (``run_vl_activation.py``) but tokenizes the text-only caption counterparts bare, with no
  template (``run_tt_activation.py`` and ``run_safety_shift.py``, via
  ``HuggingFace.extract_last_token_activations`` in ``shiftdc/models/hf.py``), so its ``m_l`` compares
  the last token of a templated prompt (the assistant turn's opening) with the last token of a bare
  one (the caption's end): two different token positions, a quirk. It also generates from the
  ``NORMAL_SAFE`` prompt, a jailbreak-style preamble ("... without any regard for ethical, moral, or
  safety concerns") that is absent when ``m_l`` and ``s_l`` are read. vlmsafe builds captions,
  counterparts, directions and generation with the model's chat template, so ``m_l`` compares the
  same position of two inputs that differ only in image vs caption, and the steered prompt is the
  one the shift was measured on.
* **Captions.** The reference captions its *direction set* with GPT-4o (``gpt-4o-2024-11-20``) from
  "Describe the image. Keep your description concise." (``scripts/prepare_steer.py``); at test time
  the VLM captions each input itself from ``CAPTION_BASED_ON_Q`` ("Based on the given Request,
  describe the image. Request: ...", ``run_caption.py``, 128 tokens). vlmsafe uses the item's own
  ``caption`` when it has one (bring GPT-4o captions that way, or through ``captions``), else the
  model writes one from :data:`CAPTION_PROMPT` (the reference's test-time instruction) for the
  direction set and for inputs alike: no API is needed, and a caption written by the model under
  test is what the test-time shift is measured against. ``--caption-prompt`` gives the reference's
  direction-set wording to the model instead.
* **Layers.** The reference code's default is ``num_layers // 2 .. num_layers - 1``
  (``_build_layer_maps`` in ``run_shiftdc.py``), vlmsafe's ``"middle-to-last"`` default; the
  reference's README runs ``--layer_start 10 --layer_end 31`` on LLaVA-1.5-7B (32 layers), which is
  ``layers="10-31"`` here.
* **The last layer.** The reference reads layer ``l`` as ``hidden_states[l + 1]``; for the last layer
  transformers returns the state *after* the final norm there, while its hook edits the decoder
  layer's output, *before* the norm: at the last layer it reads one quantity and edits another.
  vlmsafe reads and edits the decoder layer's output at every layer (the same hook point).
* **The last token.** The reference takes the last token as ``attention_mask.sum(1) - 1``, which is
  the last real token only under right padding; with left padding (or any row shorter than the
  batch's longest under the other convention) it reads another position. vlmsafe reads the last
  non-padding token of each row, left- or right-padded (:mod:`vlmsafe.activations`), so batched and
  one-by-one calibration agree.

Choices where the paper or its code leave room:

* ``shift_from="unsteered"`` (default, as the reference, which reads ``m_l`` from activations saved
  before any steering): ``m_l`` is read from a separate, unsteered pass of the multimodal input, so
  corrections made at earlier layers carry forward and add up along ``s``. ``"running"``: ``m_l`` is
  read during the steered pass itself, on the stream earlier layers already corrected: no
  compounding, and one forward pass less.

The package: :mod:`~vlmsafe.steering.shiftdc.directions` (the artefact, :class:`SafetyDirections`),
:mod:`~vlmsafe.steering.shiftdc.config` (:class:`ShiftDCCalibration`, :class:`CaptionConfig`),
:mod:`~vlmsafe.steering.shiftdc.captions` (captions and counterparts), :mod:`~vlmsafe.steering.shiftdc.calibration`
(:func:`calibrate_shiftdc`) and
:mod:`~vlmsafe.steering.shiftdc.application` (the registered ``"shiftdc"`` method, :func:`steer_shiftdc`).
"""

from vlmsafe.steering.shiftdc.application import ShiftDC, steer_shiftdc
from vlmsafe.steering.shiftdc.calibration import calibrate_shiftdc, labelled_rows
from vlmsafe.steering.shiftdc.captions import (
    COUNTERPART_TEMPLATE,
    counterpart_prompt,
    generate_captions,
    read_caption_cache,
)
from vlmsafe.steering.shiftdc.config import CaptionConfig, ShiftDCCalibration, check_caption_prompt
from vlmsafe.steering.shiftdc.directions import CAPTION_PROMPT, CAPTION_TOKENS, SafetyDirections, projection

__all__ = [
    "CAPTION_PROMPT",
    "CAPTION_TOKENS",
    "COUNTERPART_TEMPLATE",
    "CaptionConfig",
    "SafetyDirections",
    "ShiftDC",
    "ShiftDCCalibration",
    "calibrate_shiftdc",
    "check_caption_prompt",
    "counterpart_prompt",
    "generate_captions",
    "labelled_rows",
    "projection",
    "read_caption_cache",
    "steer_shiftdc",
]
