"""CMRM at inference: the ``"dataset"`` and ``"sample"`` steering methods, and ``steer`` / ``steer_sample_level``.

Both methods are registered (:func:`~vlmsafe.steering.registry.register_steering_method`); a
:class:`~vlmsafe.steering.SteeringConfig` with ``mode="dataset"`` (or ``vectors=``) or ``mode="sample"`` is
checked, described and applied by them. ``steer`` and ``ShiftVectors.apply`` build that config, so a number
given to any entry point is checked by the config, once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from vlmsafe.activations import RelativeVector, edit_activations
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.errors import InputError
from vlmsafe.steering.anchors import anchor_image
from vlmsafe.steering.application import prompt_states, steering_plan
from vlmsafe.steering.choices import DEFAULT_ALPHA, check_alpha, check_positions
from vlmsafe.steering.config import SteeringConfig
from vlmsafe.steering.registry import SteeringBatch, SteeringMethod, register_steering_method
from vlmsafe.steering.vectors import ShiftVectors

#: Why a dataset-level config without vectors cannot be applied.
NEEDS_VECTORS = "dataset-level steering needs calibrated vectors: SteeringConfig(vectors=ShiftVectors.load(DIR))"
#: Why sample-level steering leaves generated tokens alone.
NO_DECODE = ("sample-level steering cannot steer generated tokens (they have no text-only counterpart); drop "
             "`decode=True`, or use dataset-level vectors (`vectors`) to steer them")


@register_steering_method("dataset")
class DatasetLevel(SteeringMethod):
    """Dataset-level CMRM: ``h_l <- h_l - alpha * vectors[l]`` with calibrated :class:`ShiftVectors`."""

    artefact = "vectors"
    artefact_type = ShiftVectors
    owns: ClassVar = {"vectors": (None, "{mode}-level steering does not use CMRM vectors; drop them or use "
                                        "mode='dataset'")}

    def missing(self, config: SteeringConfig) -> str | None:
        return NEEDS_VECTORS if config.vectors is None else None

    def default_layers(self, config: SteeringConfig) -> Any:
        return None if config.vectors is None else config.vectors.layers

    def check_model(self, config: SteeringConfig, adapter: ModelAdapter) -> None:
        if config.vectors is not None:
            config.vectors.check_compatible(adapter, strict=config.strict_model)
        super().check_model(config, adapter)

    def describe(self, config: SteeringConfig) -> dict[str, Any]:
        if config.vectors is None:
            return {}
        meta = config.vectors.meta
        keys = ("model_name", "calibration_data", "calibration_sha256", "num_items", "positions", "anchor",
                "aggregate", "source")
        return {"vectors": {k: meta.get(k) for k in keys if meta.get(k) is not None}}

    def recorded_setting(self, artefact: ShiftVectors) -> dict[str, Any]:
        return artefact.recorded_setting()

    def apply(self, config: SteeringConfig, adapter: ModelAdapter,
              batch: SteeringBatch) -> contextlib.AbstractContextManager[Any]:
        config.check_ready()
        vectors = config.vectors
        vectors.check_compatible(adapter, strict=config.strict_model)
        # "all" = every calibrated layer
        layer_ids = vectors.layers if config.layers in (None, "all") else adapter.resolve_layers(config.layers)
        chosen = vectors.select(layer_ids)
        plan = steering_plan(adapter, dict(chosen.shifts), config.alpha, config.positions, config.decode,
                             config.steer_text_only)
        return edit_activations(adapter, plan, static=config.static)


@register_steering_method("sample")
class SampleLevel(SteeringMethod):
    """Sample-level CMRM: each input's own shift, from its text-only counterpart (or a fixed anchor image)."""

    owns: ClassVar = {"anchor": ("real", "an anchor image is a sample-level choice (dataset-level vectors carry the "
                                         "anchor they were calibrated with: calibrate(..., anchor=...)); use "
                                         "mode='sample' or drop it")}

    def validate(self, config: SteeringConfig) -> None:
        if config.decode:
            raise InputError(NO_DECODE)

    def describe(self, config: SteeringConfig) -> dict[str, Any]:
        out: dict[str, Any] = {"anchor": config.anchor if isinstance(config.anchor, str) else "image"}
        if out["anchor"] == "blank":
            out["anchor_colour"] = list(config.anchor_colour)
        if out["anchor"] == "noise":
            out["anchor_seed"] = config.anchor_seed
        return out

    def apply(self, config: SteeringConfig, adapter: ModelAdapter,
              batch: SteeringBatch) -> contextlib.AbstractContextManager[Any]:
        if batch.prompts is None:
            raise InputError("sample steering needs the batch's prompts (their text-only counterparts are run first)")
        prompts = list(batch.prompts)
        if not isinstance(config.anchor, str) or config.anchor != "real":
            return _anchored(config, adapter, prompts, batch)
        layers = None if config.layers == "all" else config.layers
        rows = None if batch.images is None else [i for i, img in enumerate(batch.images) if img is not None]
        states = prompt_states(adapter, prompts, None, rows=rows, layers=layers,
                               system_prompt=batch.system_prompt)
        return _steer_relative(adapter, states, config.alpha, config.positions, config.static)


def _anchored(config: SteeringConfig, adapter: ModelAdapter, prompts: list[str],
              batch: SteeringBatch) -> contextlib.AbstractContextManager[Any]:
    """Sample-level CMRM on a fixed anchor image, as in the paper: two extra (unsteered) passes per batch.

    Each row's shift is ``h(prompt, anchor) - h(prompt)`` at the last prompt token, measured before
    generation; rows without an image get none. Steering then subtracts ``alpha`` times it at the
    chosen positions of every steered layer (like dataset-level, with one vector per row).
    """
    layer_ids = adapter.resolve_layers(config.layers)
    anchor, meta = anchor_image(adapter, config.anchor, colour=config.anchor_colour, seed=config.anchor_seed)
    images = batch.images
    rows = [i for i in range(len(prompts)) if images is None or images[i] is not None]
    anchored = prompt_states(adapter, prompts, [anchor] * len(prompts), rows=rows, layers=layer_ids,
                             system_prompt=batch.system_prompt)
    text = prompt_states(adapter, prompts, None, rows=rows, layers=layer_ids, system_prompt=batch.system_prompt)
    shifts = {l: anchored[l] - text[l] for l in layer_ids}  # rows without an image: zero in both
    per_row = ShiftVectors(shifts=shifts, meta={"num_layers": adapter.num_layers, "family": adapter.family, **meta})
    plan = steering_plan(adapter, dict(per_row.shifts), config.alpha, config.positions, False,
                         config.steer_text_only)
    return edit_activations(adapter, plan, static=config.static)


@contextlib.contextmanager
def _steer_relative(adapter: ModelAdapter, text_only: dict[int, torch.Tensor], alpha: float,
                    positions: str | torch.Tensor, static: bool | None) -> Iterator[dict[str, Any]]:
    """Sample-level steering from checked values: each layer measures its row's shift on the stream it receives."""
    layer_ids = adapter.resolve_layers(sorted(text_only))
    shifts: dict[int, torch.Tensor] = {}
    vectors = {l: RelativeVector(l, text_only[l], store=shifts) for l in layer_ids}
    plan = steering_plan(adapter, vectors, alpha, positions, False, False)
    with edit_activations(adapter, plan, static=static) as state:
        state["shifts"] = shifts
        yield state


# --------------------------------------------------------------------------- entry points
@contextlib.contextmanager
def steer(model: nn.Module | ModelAdapter, vectors: ShiftVectors, alpha: float = DEFAULT_ALPHA,
          **options: Any) -> Iterator[dict[str, Any]]:
    """Dataset-level CMRM over an existing model: ``h_l <- h_l - alpha * vectors[l]``.

    >>> with steer(model, vectors, alpha=1.0):
    ...     model.generate(**inputs)

    ``options`` are :class:`~vlmsafe.steering.SteeringConfig` fields: ``positions`` picks the prompt tokens
    steered; ``decode=True`` also steers every generated token; ``layers`` defaults to every layer in
    ``vectors``; ``steer_text_only``; ``strict_model``. Validates ``vectors`` against the model. Steering runs
    at ``alpha=0`` too (it then adds zero); :class:`SteeringConfig` skips it. The same as ``vectors.apply``.

    ``static=True`` steers with no per-token Python work (:mod:`vlmsafe.activations.compiled`: usable under
    ``torch.compile`` and static-cache ``generate``, same tokens); ``False`` with forward hooks that
    handle every way of calling the model; ``None`` (default) picks the compiled path when the model is
    set up for compiled generation (a static cache or compile config in its generation config, a
    compiled forward).
    """
    if not isinstance(vectors, ShiftVectors):  # a folder or a dict of tensors failed as "no attribute 'apply'"
        raise InputError(f"`vectors` must be ShiftVectors (ShiftVectors.load(DIR) for a folder), "
                         f"got {type(vectors).__name__}")
    with vectors.apply(model, alpha, **options) as handle:
        yield handle.state


@contextlib.contextmanager
def steer_sample_level(
    model: nn.Module | ModelAdapter,
    text_only_states: dict[int, torch.Tensor],
    alpha: float = DEFAULT_ALPHA,
    *,
    positions: str | torch.Tensor = "last",
    decode: bool = False,
    static: bool | None = None,
) -> Iterator[dict[str, Any]]:
    """Sample-level CMRM given each row's text-only counterpart state ``{layer: (B, H)}``.

    In the forward call that holds the prompt, each steered layer computes, per row,
    ``shift = h_l[last prompt token] - text_only_state`` on the stream it receives (so with
    several layers each shift is measured on the already-steered stream) and applies
    ``h_l <- h_l - alpha * shift`` at the chosen prompt ``positions``. Text-only rows are not
    steered (their counterpart is themselves). ``text_only_states`` typically come from
    :func:`text_only_states`.

    ``decode=True`` is refused: a generated token has no text-only counterpart. ``static`` picks the
    compiled path as in :func:`steer`.
    """
    alpha = check_alpha(alpha)  # this entry point declares alpha itself (no config): checked here, once
    if decode:
        raise InputError("sample-level CMRM cannot steer generated tokens: they have no text-only counterpart (the "
                         "text-only prompt would have generated other tokens); use decode=False, or dataset-level "
                         "vectors (`vlmsafe calibrate`, then steer(..., decode=True)) to steer generated tokens")
    check_positions(positions)
    if not isinstance(text_only_states, Mapping):  # a list of tensors was read as layer indices
        raise InputError(f"`text_only_states` must be a dict {{layer: (batch, hidden) tensor}} "
                         f"(text_only_states(model, processor, prompts, images) makes it), "
                         f"got {type(text_only_states).__name__}")
    with _steer_relative(get_adapter(model), text_only_states, alpha, positions, static) as state:
        yield state


@torch.no_grad()
def text_only_states(model: nn.Module | ModelAdapter, processor: Any, prompts: Sequence[str],
                     images: Sequence[Any] | None, **options: Any) -> dict[int, torch.Tensor]:
    """Last-prompt-token states of the text-only counterparts, for :func:`steer_sample_level`: ``{layer: (B, H)}``.

    Runs the smallest pass that yields them: only the rows that have an image (other rows are
    not steered and get zeros), no KV cache, and only up to the deepest requested layer (the
    layers above it and the output head do not run). ``options``: :func:`prompt_states`'s ``layers`` and
    ``system_prompt``.
    """
    rows = None if images is None else [i for i, img in enumerate(images) if img is not None]
    return prompt_states(get_adapter(model, processor), prompts, None, rows=rows, **options)


__all__ = ["DatasetLevel", "SampleLevel", "steer", "steer_sample_level", "text_only_states"]
