"""ShiftDC's options: :class:`ShiftDCCalibration` (calibration) and :class:`CaptionConfig` (how the model captions an
image), every option checked once, where it is declared. The steering options are
:class:`~vlmsafe.steering.SteeringConfig`'s (``shift_from``, ``layers``, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmsafe.steering.shiftdc.directions import CAPTION_PROMPT, CAPTION_TOKENS
from vlmsafe.validation import LAYER_PRESETS, check_int, check_template, parse_layer_spec


def check_caption_prompt(instruction: Any) -> str:
    """A caption instruction: a non-empty string whose only field, if any, is ``{prompt}``."""
    return check_template(instruction, "caption prompt", "prompt", required=False)


@dataclass(frozen=True)
class CaptionConfig:
    """How the model captions images (:func:`~vlmsafe.steering.shiftdc.generate_captions`): greedily, from
    ``instruction`` (``{prompt}`` = the request), up to ``max_new_tokens``, ``batch_size`` images per call, with
    ``system_prompt``."""

    instruction: str = CAPTION_PROMPT
    max_new_tokens: int = CAPTION_TOKENS
    batch_size: int = 8
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        check_caption_prompt(self.instruction)
        check_int(self.max_new_tokens, "caption max_new_tokens", low=1)
        check_int(self.batch_size, "batch_size", low=1)


@dataclass(frozen=True)
class ShiftDCCalibration:
    """Options of ShiftDC calibration (:func:`~vlmsafe.steering.shiftdc.calibrate_shiftdc`), each checked here once.

    ``layers``: the decoder layers read (default all). ``caption_prompt`` / ``caption_tokens``: how the model
    captions an item that brings no caption. ``batch_size`` items per forward pass, built with ``system_prompt``.
    """

    layers: Any = None
    batch_size: int = 8
    caption_prompt: str = CAPTION_PROMPT
    caption_tokens: int = CAPTION_TOKENS
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        check_int(self.caption_tokens, "caption_tokens", low=1)  # named as the caller knows it
        captioning = CaptionConfig(instruction=self.caption_prompt, max_new_tokens=self.caption_tokens,
                                   batch_size=self.batch_size, system_prompt=self.system_prompt)  # checks the rest
        object.__setattr__(self, "captioning", captioning)  # how the items without a caption are captioned
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            parse_layer_spec(self.layers)  # syntax errors now, not after a model is loaded


__all__ = ["CaptionConfig", "ShiftDCCalibration", "check_caption_prompt"]
