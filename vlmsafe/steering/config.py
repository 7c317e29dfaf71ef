"""``SteeringConfig``: one description of how CMRM steers a model, used everywhere it is applied.

``SafeVLM``, the ``generate`` / ``evaluate`` / ``probe`` commands and the probes all steer through
:meth:`SteeringConfig.apply`, so dataset- and sample-level steering behave identically wherever
they run, and a report can say exactly what was applied (:meth:`SteeringConfig.describe`).

>>> cfg = SteeringConfig(vectors=ShiftVectors.load("vectors/"), alpha=1.0, layers="8-15")
>>> with cfg.apply(model, processor, prompts=prompts, images=images):
...     model.generate(**inputs)

The field metadata holds the help text of the matching command-line flags
(:func:`vlmsafe.cli_options.add_steering_options`), so the CLI and the API cannot drift apart.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields, replace
from typing import Any, ContextManager, Sequence


from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.errors import InputError
from vlmsafe.steering.cmrm import STEER_POSITIONS, steer, steer_sample_level, text_only_states
from vlmsafe.steering.vectors import ShiftVectors
from vlmsafe.validation import check_choice, check_float, parse_layer_spec

MODES = ("dataset", "sample")
LayerSpec = "int | Sequence[int] | str | None"


@dataclass(frozen=True)
class SteeringConfig:
    """How CMRM steering is applied: ``h_l <- h_l - alpha * shift_l``.

    ``mode=None`` with ``vectors`` means dataset-level; with neither, the config is inactive (plain
    generation). ``alpha=0`` is also inactive: no hook is installed at all.
    """

    mode: str | None = field(default=None, metadata={
        "help": "dataset: one calibrated vector per layer (--vectors); sample: each input's shift from its own "
                "text-only counterpart (one extra text-only pass per batch)"})
    vectors: ShiftVectors | None = field(default=None, repr=False, metadata={
        "help": "dataset-level CMRM: the vectors folder written by `vlmsafe calibrate`"})
    alpha: float = field(default=1.0, metadata={
        "help": "steering strength: h <- h - alpha * shift (0 = unsteered)"})
    layers: Any = field(default=None, metadata={
        "help": "decoder layers to steer, e.g. '8-15' or '4,8,12' (default: every calibrated layer; all layers "
                "for sample-level)"})
    positions: str = field(default="last", metadata={
        "help": "prompt tokens steered: last (the last prompt token), prompt (every prompt token), text (prompt "
                "text tokens), image (image tokens)"})
    decode: bool = field(default=False, metadata={
        "help": "also steer every generated token (dataset-level only: generated tokens have no text-only counterpart)"})
    steer_text_only: bool = field(default=False, metadata={
        "help": "also steer inputs without an image (by default only multimodal rows are moved)"})

    def __post_init__(self) -> None:
        mode = self.mode
        if mode is None and self.vectors is not None:
            mode = "dataset"
        if mode is not None:
            check_choice(mode, "steering mode", MODES)
        if mode == "sample" and self.vectors is not None:
            raise InputError("sample-level steering computes each input's shift itself; drop the vectors or use mode='dataset'")
        if mode == "sample" and self.decode:
            raise InputError("sample-level steering cannot steer generated tokens (they have no text-only counterpart); "
                             "drop decode (--decode), or use dataset-level vectors (--vectors DIR) to steer them")
        if self.vectors is not None and not isinstance(self.vectors, ShiftVectors):
            raise InputError(f"vectors must be ShiftVectors (ShiftVectors.load(DIR)), got {type(self.vectors).__name__}")
        check_choice(self.positions, "positions", STEER_POSITIONS)
        if isinstance(self.layers, str) and self.layers != "all":
            parse_layer_spec(self.layers)  # syntax errors now, not after a model is loaded
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "alpha", check_float(self.alpha, "alpha"))

    # ------------------------------------------------------------------ queries
    @property
    def active(self) -> bool:
        """Whether applying this config changes anything (a mode and a non-zero alpha)."""
        return self.mode is not None and self.alpha != 0.0

    def with_alpha(self, alpha: float) -> "SteeringConfig":
        return replace(self, alpha=alpha)

    def describe(self) -> dict[str, Any]:
        """JSON-ready account of what is applied (for reports and saved results)."""
        if self.mode is None:
            return {"mode": None}
        layers = self.layers
        if layers is None and self.vectors is not None:
            layers = self.vectors.layers
        out: dict[str, Any] = {
            "mode": self.mode,
            "alpha": self.alpha,
            "layers": "all" if layers in (None, "all") else (list(layers) if not isinstance(layers, (str, int)) else layers),
            "positions": self.positions,
            "decode": self.decode,
            "steer_text_only": self.steer_text_only,
        }
        if self.vectors is not None:
            meta = self.vectors.meta
            out["vectors"] = {k: meta.get(k) for k in ("model_name", "calibration_data", "calibration_sha256", "num_items",
                                                       "positions", "source") if meta.get(k) is not None}
        return out

    def check_model(self, model: Any) -> None:
        """Validate the vectors and layers against ``model`` (before any generation)."""
        adapter = get_adapter(model)
        if self.vectors is not None:
            self.vectors.check_compatible(adapter)
        if self.layers is not None:
            adapter.resolve_layers(self.layers)

    # ------------------------------------------------------------------ application
    def apply(
        self,
        model: Any,
        processor: Any | None = None,
        *,
        prompts: Sequence[str] | None = None,
        images: Sequence[Any] | None = None,
        system_prompt: str | None = None,
    ) -> ContextManager[Any]:
        """A context manager that steers ``model`` while it is open (a no-op when inactive).

        Dataset-level needs nothing but the model. Sample-level needs the batch's ``prompts`` (their
        text-only counterparts are run once here) and ``images`` (rows without an image are not
        steered). When ``images`` is given and has no image at all, nothing is steered unless
        ``steer_text_only``.
        """
        if not self.active:
            return contextlib.nullcontext()
        if images is not None and all(img is None for img in images) and not self.steer_text_only:
            return contextlib.nullcontext()
        adapter: ModelAdapter = get_adapter(model, processor)
        if self.mode == "dataset":
            if self.vectors is None:
                raise InputError("dataset-level steering needs calibrated vectors: SteeringConfig(vectors=ShiftVectors.load(DIR))")
            layers = None if self.layers in (None, "all") else adapter.resolve_layers(self.layers)
            return steer(adapter, self.vectors, self.alpha, layers=layers, positions=self.positions,
                         decode=self.decode, steer_text_only=self.steer_text_only)
        if prompts is None:
            raise InputError("sample-level steering needs the batch's prompts (their text-only counterparts are run first)")
        layers = None if self.layers == "all" else self.layers
        states = text_only_states(adapter, None, list(prompts), images, layers=layers, system_prompt=system_prompt)
        return steer_sample_level(adapter, states, self.alpha, positions=self.positions)


def field_help(name: str) -> str:
    """The help text of a :class:`SteeringConfig` field (used by the CLI option builders)."""
    for f in fields(SteeringConfig):
        if f.name == name:
            return str(f.metadata.get("help", ""))
    raise KeyError(name)
