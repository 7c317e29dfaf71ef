"""``SteeringConfig``: one description of how a model is steered, used everywhere steering is applied.

``SafeVLM``, the ``generate`` / ``evaluate`` / ``probe`` commands and the probes all steer through
:meth:`SteeringConfig.apply`, so dataset- and sample-level steering behave identically wherever
they run, and a report can say exactly what was applied (:meth:`SteeringConfig.describe`). Three
modes: CMRM dataset-level (calibrated vectors), CMRM sample-level (each input's own shift, from its
real image or a fixed anchor image) and ShiftDC (each input's shift projected on safety directions).

>>> cfg = SteeringConfig(vectors=ShiftVectors.load("vectors/"), alpha=1.0, layers="8-15")
>>> with cfg.apply(model, processor, prompts=prompts, images=images):
...     model.generate(**inputs)

The field metadata holds the help text of the matching command-line flags
(:func:`vlmsafe.cli.options.add_steering_options`), so the CLI and the API cannot drift apart.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from vlmsafe.errors import InputError
from vlmsafe.images import BLANK_COLOUR, NOISE_SEED, check_colour
from vlmsafe.steering.choices import DEFAULT_ALPHA, MAX_ALPHA, SHIFT_FROM, check_alpha, check_positions
from vlmsafe.steering.registry import SteeringBatch, SteeringMethod, all_steering_methods, get_steering_method
from vlmsafe.validation import LAYER_PRESETS, check_choice, parse_layer_spec

# The model-side modules import torch: they load when a config is checked or applied, not when the command line
# reads this module for its flags' help (``field_help``), so ``vlmsafe --help`` stays fast. The artefacts
# (ShiftVectors, SafetyDirections) are typed through their methods (``SteeringMethod.artefact_type``): their
# modules import this one (``vectors.apply`` builds a config), not the other way round.
if TYPE_CHECKING:
    from vlmsafe.steering.application import SteeringHandle

__all__ = ["MAX_ALPHA", "SteeringConfig", "apply_steering", "as_steering", "field_help"]


@dataclass(frozen=True)
class SteeringConfig:
    """How steering is applied: ``h_l <- h_l - alpha * shift_l`` (CMRM) or its safety component (ShiftDC).

    ``mode`` names a registered steering method (:mod:`vlmsafe.steering.registry`: ``"dataset"``,
    ``"sample"``, ``"shiftdc"`` and any registered later); the method checks, describes and applies the
    config. ``mode=None`` with ``vectors`` means dataset-level, with ``directions`` ShiftDC (the method whose
    artefact is given); with neither, the config is inactive (plain generation). ``alpha=0`` is also
    inactive: no hook is installed. Every number is checked here, once, where it is declared.
    """

    mode: str | None = field(default=None, metadata={
        "help": "dataset: one calibrated vector per layer (--vectors); sample: each input's shift from its own "
                "text-only counterpart (one extra text-only pass per batch); shiftdc: each input's shift against "
                "its captioned counterpart, projected on safety directions (--shiftdc)"})
    vectors: Any = field(default=None, repr=False, metadata={
        "help": "dataset-level CMRM: the vectors folder written by `vlmsafe calibrate`"})
    alpha: float = field(default=DEFAULT_ALPHA, metadata={
        "help": f"steering strength in [0, {MAX_ALPHA:g}]: h <- h - alpha * shift (0 = unsteered; the papers use "
                "about 1)"})
    layers: Any = field(default=None, metadata={
        "help": "decoder layers to steer: 'all', 'middle-to-last', '8-15' or '4,8,12' (default: every calibrated "
                "layer for dataset-level, all layers for sample-level, middle-to-last for ShiftDC)"})
    positions: Any = field(default="last", metadata={
        "help": "prompt tokens steered: last (the last prompt token), prompt (every prompt token), text (prompt "
                "text tokens), image (image tokens)"})
    decode: bool = field(default=False, metadata={
        "help": "also steer every generated token (dataset-level only: generated tokens have no text-only "
                "counterpart)"})
    steer_text_only: bool = field(default=False, metadata={
        "help": "also steer inputs without an image (by default only multimodal rows are moved)"})
    anchor: Any = field(default="real", metadata={
        "help": "sample-level: the image each input's shift is measured with: real (its own), blank (a uniform "
                "image, as in the CMRM paper) or noise (seeded uniform noise); blank/noise cost two extra passes"})
    anchor_colour: Any = field(default=BLANK_COLOUR, metadata={
        "help": "colour of the blank anchor as R,G,B in 0..255 (default 255,255,255: white)"})
    anchor_seed: int = field(default=NOISE_SEED, metadata={"help": "seed of the noise anchor (default 0)"})
    directions: Any = field(default=None, repr=False, metadata={
        "help": "ShiftDC: the safety-directions folder written by `vlmsafe calibrate --method shiftdc`"})
    strict_model: bool = field(default=False, metadata={
        "help": "refuse vectors or directions calibrated on other weights of the same architecture (e.g. the "
                "merged model; default: one warning line)"})
    shift_from: str = field(default="unsteered", metadata={
        "help": "ShiftDC: read each layer's image shift from an unsteered pass (unsteered, as published; corrections "
                "add up across layers) or from the stream already corrected at earlier layers (running; one pass "
                "less)"})
    static: bool | None = field(default=None, metadata={
        "help": "steer with no per-token Python work (usable under torch.compile and static-cache generation; same "
                "tokens): True, False (forward hooks, which also handle use_cache=False and chunked prefill), or "
                "None: the compiled path when the model is set up for compiled generation"})

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))  # first: the same refusal at every entry point
        mode = self.mode
        if mode is None:  # the method whose artefact is given
            given = [m.name for m in all_steering_methods() if m.artefact and getattr(self, m.artefact) is not None]
            mode = given[0] if given else None
        method = get_steering_method(mode) if mode is not None else None
        for other in all_steering_methods():  # a field only another method uses would be ignored: refused
            if other is method:
                continue
            for name, (default, message) in other.owns.items():
                value = getattr(self, name)
                if value is not default and not (type(value) is type(default) and value == default):
                    raise InputError(message.format(mode=mode))
        if method is not None and method.artefact_type is not None:
            artefact = getattr(self, method.artefact)
            if artefact is not None and not isinstance(artefact, method.artefact_type):
                raise InputError(f"{method.artefact} must be {method.artefact_type.__name__} "
                                 f"({method.artefact_type.__name__}.load(DIR)), got {type(artefact).__name__}")
        check_positions(self.positions)
        if method is not None:
            method.validate(self)
        from vlmsafe.steering.anchors import check_anchor

        check_anchor(self.anchor, self.anchor_colour, self.anchor_seed)
        check_choice(self.shift_from, "shift_from", SHIFT_FROM)
        if not (self.static is None or isinstance(self.static, bool)):
            raise InputError(f"static must be True, False or None, got {self.static!r}")
        for name in ("strict_model", "decode", "steer_text_only"):  # decode="no" would be truthy: steered
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            parse_layer_spec(self.layers)  # syntax errors now, not after a model is loaded
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "anchor_colour", check_colour(self.anchor_colour, "anchor colour"))

    # ------------------------------------------------------------------ queries
    @property
    def method(self) -> SteeringMethod | None:
        """The registered method this config applies (``None``: unsteered)."""
        return None if self.mode is None else get_steering_method(self.mode)

    @property
    def active(self) -> bool:
        """Whether applying this config changes anything (a mode and a non-zero alpha)."""
        return self.mode is not None and self.alpha != 0.0

    def with_alpha(self, alpha: float) -> SteeringConfig:
        return replace(self, alpha=alpha)

    def describe(self) -> dict[str, Any]:
        """JSON-ready account of what is applied (for reports and saved results)."""
        method = self.method
        if method is None:
            return {"mode": None}
        layers = self.layers if self.layers is not None else method.default_layers(self)
        out: dict[str, Any] = {
            "mode": self.mode,
            "alpha": self.alpha,
            "layers": "all" if layers is None else (list(layers) if not isinstance(layers, (str, int)) else layers),
            "positions": self.positions,
            "decode": self.decode,
            "steer_text_only": self.steer_text_only,
        }
        return {**out, **method.describe(self)}

    def check_ready(self) -> None:
        """Refuse a config that cannot be applied as it is (its method says what it lacks)."""
        missing = self.method.missing(self) if self.method is not None else None
        if missing:
            raise InputError(missing)

    def check_model(self, model: Any) -> None:
        """Validate the artefact and layers against ``model`` (before any generation)."""
        from vlmsafe.adapters import get_adapter

        if self.method is not None:
            self.method.check_model(self, get_adapter(model))

    # ------------------------------------------------------------------ application
    def apply(
        self,
        model: Any,
        processor: Any | None = None,
        *,
        prompts: Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        system_prompt: str | None = None,
        captions: Sequence[str | None] | None = None,
    ) -> contextlib.AbstractContextManager[Any]:
        """A context manager that steers ``model`` while it is open (a no-op when inactive).

        Dataset-level needs nothing but the model. Sample-level needs the batch's ``prompts`` (their
        text-only counterparts are run once here, and with a blank or noise anchor their anchored
        versions too) and ``images`` (rows without an image are not steered). ShiftDC needs both,
        and ``captions`` of the images where known (the model writes the others). When ``images``
        is given and has no image at all, nothing is steered unless ``steer_text_only``.
        """
        if not self.active:
            return contextlib.nullcontext()
        if images is not None and all(img is None for img in images) and not self.steer_text_only:
            return contextlib.nullcontext()
        from vlmsafe.adapters import get_adapter

        batch = SteeringBatch(prompts=prompts, images=images, captions=captions, system_prompt=system_prompt)
        return self.method.apply(self, get_adapter(model, processor), batch)


def apply_steering(model: Any, config: SteeringConfig, batch: SteeringBatch | None = None) -> SteeringHandle:
    """Apply ``config``'s method to ``model`` on ``batch``, at ``alpha=0`` too (it then adds zero), and return the
    handle: what an artefact's ``apply`` and ``steer`` do. The adapter is resolved here, once per call."""
    from vlmsafe.adapters import get_adapter
    from vlmsafe.steering.application import SteeringHandle

    if config.method is None:
        raise InputError("nothing to apply: give the config a steering mode or an artefact (vectors, directions)")
    return SteeringHandle(config.method.apply(config, get_adapter(model), batch or SteeringBatch()))


def as_steering(steering: Any) -> SteeringConfig:
    """The :class:`SteeringConfig` a steering object stands for: a config itself; ``None`` (unsteered); or a
    method's artefact (:class:`~vlmsafe.steering.ShiftVectors`, :class:`~vlmsafe.steering.SafetyDirections`),
    steered with the setting it records (the one ``vlmsafe calibrate`` recommends; else the defaults)."""
    if steering is None:
        return SteeringConfig()
    if isinstance(steering, SteeringConfig):
        return steering
    for method in all_steering_methods():
        if method.artefact_type is not None and isinstance(steering, method.artefact_type):
            return SteeringConfig(mode=method.name, **{method.artefact: steering}, **method.recorded_setting(steering))
    load = (" (a folder: ShiftVectors.load(DIR) or SafetyDirections.load(DIR), or SafeVLM.from_pretrained(MODEL, DIR))"
            if isinstance(steering, (str, os.PathLike)) else "")
    raise InputError(f"steering must be a SteeringConfig, or an artefact of a steering method (ShiftVectors, "
                     f"SafetyDirections), got {type(steering).__name__}{load}")


def field_help(name: str) -> str:
    """The help text of a :class:`SteeringConfig` field (used by the CLI option builders)."""
    for f in fields(SteeringConfig):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise InputError(f"SteeringConfig has no field {name!r}")
