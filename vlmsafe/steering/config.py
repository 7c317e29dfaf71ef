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
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from vlmsafe.data import BLANK_COLOUR, NOISE_SEED, check_colour
from vlmsafe.errors import InputError
from vlmsafe.steering.choices import MAX_ALPHA, MODES, SHIFT_FROM, SHIFTDC_LAYERS, STEER_POSITIONS, check_alpha
from vlmsafe.validation import LAYER_PRESETS, check_choice, parse_layer_spec

# The model-side modules import torch: they load when a config is checked or applied, not when the command line
# reads this module for its flags' help (``field_help``), so ``vlmsafe --help`` stays fast.
if TYPE_CHECKING:
    from vlmsafe.adapters import ModelAdapter
    from vlmsafe.steering.directions import SafetyDirections
    from vlmsafe.steering.vectors import ShiftVectors

__all__ = ["MAX_ALPHA", "MODES", "SteeringConfig", "field_help"]
LayerSpec = "int | Sequence[int] | str | None"


@dataclass(frozen=True)
class SteeringConfig:
    """How steering is applied: ``h_l <- h_l - alpha * shift_l`` (CMRM) or its safety component (ShiftDC).

    ``mode=None`` with ``vectors`` means dataset-level, with ``directions`` ShiftDC; with neither,
    the config is inactive (plain generation). ``alpha=0`` is also inactive: no hook is installed.
    """

    mode: str | None = field(default=None, metadata={
        "help": "dataset: one calibrated vector per layer (--vectors); sample: each input's shift from its own "
                "text-only counterpart (one extra text-only pass per batch); shiftdc: each input's shift against "
                "its captioned counterpart, projected on safety directions (--shiftdc)"})
    vectors: ShiftVectors | None = field(default=None, repr=False, metadata={
        "help": "dataset-level CMRM: the vectors folder written by `vlmsafe calibrate`"})
    alpha: float = field(default=1.0, metadata={
        "help": f"steering strength in [0, {MAX_ALPHA:g}]: h <- h - alpha * shift (0 = unsteered; the papers use "
                "about 1)"})
    layers: Any = field(default=None, metadata={
        "help": "decoder layers to steer: 'all', 'middle-to-last', '8-15' or '4,8,12' (default: every calibrated "
                "layer for dataset-level, all layers for sample-level, middle-to-last for ShiftDC)"})
    positions: str = field(default="last", metadata={
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
    directions: SafetyDirections | None = field(default=None, repr=False, metadata={
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
        from vlmsafe.steering.anchors import check_anchor
        from vlmsafe.steering.directions import SafetyDirections
        from vlmsafe.steering.vectors import ShiftVectors

        mode = self.mode
        if mode is None and self.vectors is not None:
            mode = "dataset"
        if mode is None and self.directions is not None:
            mode = "shiftdc"
        if mode is not None:
            check_choice(mode, "steering mode", MODES)
        if mode != "dataset" and self.vectors is not None:
            raise InputError(f"{mode}-level steering does not use CMRM vectors; drop them or use mode='dataset'")
        if mode == "sample" and self.decode:
            raise InputError("sample-level steering cannot steer generated tokens (they have no text-only "
                             "counterpart); drop decode (--decode), or use dataset-level vectors (--vectors DIR) "
                             "to steer them")
        if mode != "shiftdc" and self.directions is not None:
            raise InputError("safety directions are for ShiftDC; use mode='shiftdc' or drop them")
        if mode == "shiftdc" and not isinstance(self.directions, SafetyDirections):
            raise InputError("ShiftDC needs safety directions: SteeringConfig(mode='shiftdc', directions="
                             "SafetyDirections.load(DIR)) (`vlmsafe calibrate --method shiftdc` writes them)")
        if self.vectors is not None and not isinstance(self.vectors, ShiftVectors):
            raise InputError(
                f"vectors must be ShiftVectors (ShiftVectors.load(DIR)), got {type(self.vectors).__name__}"
            )
        check_choice(self.positions, "positions", STEER_POSITIONS)
        if mode == "shiftdc" and self.positions != "last":
            raise InputError(f"ShiftDC corrects the last prompt token only; drop positions={self.positions!r}")
        check_anchor(self.anchor, self.anchor_colour, self.anchor_seed)
        if (not isinstance(self.anchor, str) or self.anchor != "real") and mode != "sample":
            raise InputError("an anchor image is a sample-level choice (dataset-level vectors carry the anchor they "
                             "were calibrated with: `vlmsafe calibrate --anchor`); use mode='sample' or drop it")
        check_choice(self.shift_from, "shift_from", SHIFT_FROM)
        if not (self.static is None or isinstance(self.static, bool)):
            raise InputError(f"static must be True, False or None, got {self.static!r}")
        if not isinstance(self.strict_model, bool):
            raise InputError(f"strict_model must be True or False, got {self.strict_model!r}")
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            parse_layer_spec(self.layers)  # syntax errors now, not after a model is loaded
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        object.__setattr__(self, "anchor_colour", check_colour(self.anchor_colour, "anchor colour"))

    # ------------------------------------------------------------------ queries
    @property
    def active(self) -> bool:
        """Whether applying this config changes anything (a mode and a non-zero alpha)."""
        return self.mode is not None and self.alpha != 0.0

    def with_alpha(self, alpha: float) -> SteeringConfig:
        return replace(self, alpha=alpha)

    def describe(self) -> dict[str, Any]:
        """JSON-ready account of what is applied (for reports and saved results)."""
        if self.mode is None:
            return {"mode": None}
        layers = self.layers
        if layers is None and self.vectors is not None:
            layers = self.vectors.layers
        if layers is None and self.mode == "shiftdc":
            layers = SHIFTDC_LAYERS
        out: dict[str, Any] = {
            "mode": self.mode,
            "alpha": self.alpha,
            "layers": "all" if layers is None else (list(layers) if not isinstance(layers, (str, int)) else layers),
            "positions": self.positions,
            "decode": self.decode,
            "steer_text_only": self.steer_text_only,
        }
        if self.mode == "sample":
            out["anchor"] = self.anchor if isinstance(self.anchor, str) else "image"
            if out["anchor"] == "blank":
                out["anchor_colour"] = list(self.anchor_colour)
            if out["anchor"] == "noise":
                out["anchor_seed"] = self.anchor_seed
        if self.vectors is not None:
            meta = self.vectors.meta
            keys = ("model_name", "calibration_data", "calibration_sha256", "num_items", "positions", "anchor",
                    "aggregate", "source")
            out["vectors"] = {k: meta.get(k) for k in keys if meta.get(k) is not None}
        if self.directions is not None:
            meta = self.directions.meta
            out["shift_from"] = self.shift_from
            keys = ("model_name", "calibration_data", "calibration_sha256", "n_benign", "n_harmful", "caption_prompt",
                    "caption_tokens")
            out["directions"] = {k: meta.get(k) for k in keys if meta.get(k) is not None}
        return out

    def check_model(self, model: Any) -> None:
        """Validate the vectors and layers against ``model`` (before any generation)."""
        from vlmsafe.adapters import get_adapter

        adapter = get_adapter(model)
        if self.vectors is not None:
            self.vectors.check_compatible(adapter, strict=self.strict_model)
        if self.directions is not None:
            self.directions.check_compatible(adapter, strict=self.strict_model)
            self.directions.select(adapter.resolve_layers(self._shiftdc_layers()))
        if self.layers is not None:
            adapter.resolve_layers(self.layers)

    def _shiftdc_layers(self) -> Any:
        return SHIFTDC_LAYERS if self.layers is None else self.layers

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
        from vlmsafe.steering.cmrm import steer, steer_sample_level, text_only_states
        from vlmsafe.steering.shiftdc import steer_shiftdc

        adapter: ModelAdapter = get_adapter(model, processor)
        if self.mode == "dataset":
            if self.vectors is None:
                raise InputError(
                    "dataset-level steering needs calibrated vectors: SteeringConfig(vectors=ShiftVectors.load(DIR))"
                )
            # "all" = every calibrated layer
            layers = None if self.layers in (None, "all") else adapter.resolve_layers(self.layers)
            return steer(adapter, self.vectors, self.alpha, layers=layers, positions=self.positions,
                         decode=self.decode, steer_text_only=self.steer_text_only, static=self.static)
        if prompts is None:
            raise InputError(f"{self.mode} steering needs the batch's prompts (their text-only counterparts are "
                             "run first)")
        if self.mode == "shiftdc":
            if images is None:
                raise InputError("ShiftDC steering needs the batch's images (each row's shift is measured against "
                                 "its caption)")
            return steer_shiftdc(adapter, self.directions, self.alpha, prompts=list(prompts), images=list(images),
                                 captions=captions, layers=self._shiftdc_layers(), shift_from=self.shift_from,
                                 decode=self.decode, system_prompt=system_prompt, static=self.static)
        if not isinstance(self.anchor, str) or self.anchor != "real":
            return _sample_level_anchored(self, adapter, list(prompts), images, system_prompt)
        layers = None if self.layers == "all" else self.layers
        states = text_only_states(adapter, None, list(prompts), images, layers=layers, system_prompt=system_prompt)
        return steer_sample_level(adapter, states, self.alpha, positions=self.positions, static=self.static)


def _sample_level_anchored(cfg: SteeringConfig, adapter: ModelAdapter, prompts: list[str],
                           images: Sequence[Any] | None,
                           system_prompt: str | None) -> contextlib.AbstractContextManager[Any]:
    """Sample-level CMRM on a fixed anchor image, as in the paper: two extra (unsteered) passes per batch.

    Each row's shift is ``h(prompt, anchor) - h(prompt)`` at the last prompt token, measured before
    generation; rows without an image get none. Steering then subtracts ``alpha`` times it at the
    chosen positions of every steered layer (like dataset-level, with one vector per row).
    """
    from vlmsafe.steering.anchors import anchor_image
    from vlmsafe.steering.cmrm import prompt_states, steer
    from vlmsafe.steering.vectors import ShiftVectors

    layer_ids = adapter.resolve_layers(cfg.layers)
    anchor, meta = anchor_image(adapter, cfg.anchor, colour=cfg.anchor_colour, seed=cfg.anchor_seed)
    rows = [i for i in range(len(prompts)) if images is None or images[i] is not None]
    anchored = prompt_states(adapter, None, prompts, [anchor] * len(prompts), rows=rows, layers=layer_ids,
                             system_prompt=system_prompt)
    text = prompt_states(adapter, None, prompts, None, rows=rows, layers=layer_ids, system_prompt=system_prompt)
    shifts = {l: anchored[l] - text[l] for l in layer_ids}  # rows without an image: zero in both
    per_row = ShiftVectors(shifts=shifts, meta={"num_layers": adapter.num_layers, "family": adapter.family, **meta})
    return steer(adapter, per_row, cfg.alpha, positions=cfg.positions, steer_text_only=cfg.steer_text_only,
                 static=cfg.static)


def field_help(name: str) -> str:
    """The help text of a :class:`SteeringConfig` field (used by the CLI option builders)."""
    for f in fields(SteeringConfig):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)
