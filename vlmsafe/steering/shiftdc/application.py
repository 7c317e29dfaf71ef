"""ShiftDC at inference: the registered ``"shiftdc"`` steering method and :func:`steer_shiftdc`.

Per input and layer, ``m_l = x_l(prompt + image) - x_l(counterpart)`` at the last token, and
``alpha * (m_l . s_l / s_l . s_l) s_l`` is subtracted from the last prompt token at prefill (the package
docstring, :mod:`vlmsafe.steering.shiftdc`, compares this with the reference code point by point).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from vlmsafe.activations import EditPlan, Prompt, RelativeVector, edit_activations
from vlmsafe.adapters import ModelAdapter
from vlmsafe.errors import InputError
from vlmsafe.options import refuse_unknown
from vlmsafe.steering.application import prompt_states
from vlmsafe.steering.choices import DEFAULT_ALPHA, SHIFTDC_LAYERS
from vlmsafe.steering.config import SteeringConfig, apply_steering
from vlmsafe.steering.registry import SteeringBatch, SteeringMethod, register_steering_method
from vlmsafe.steering.shiftdc.captions import _captions, counterpart_prompt
from vlmsafe.steering.shiftdc.config import CaptionConfig
from vlmsafe.steering.shiftdc.directions import SafetyDirections


@register_steering_method("shiftdc")
class ShiftDC(SteeringMethod):
    """ShiftDC: remove each input's image-induced shift along calibrated :class:`SafetyDirections`."""

    artefact = "directions"
    artefact_type = SafetyDirections
    owns: ClassVar = {"directions": (None, "safety directions are for ShiftDC; use mode='shiftdc' or drop them")}

    def validate(self, config: SteeringConfig) -> None:
        if not isinstance(config.directions, SafetyDirections):
            raise InputError("ShiftDC needs safety directions: SteeringConfig(mode='shiftdc', directions="
                             "SafetyDirections.load(DIR)) (calibrate_shiftdc writes them; `vlmsafe calibrate` with "
                             "method shiftdc)")
        if config.positions != "last":
            raise InputError(f"ShiftDC corrects the last prompt token only; drop positions={config.positions!r}")

    def default_layers(self, config: SteeringConfig) -> Any:
        return SHIFTDC_LAYERS

    def check_model(self, config: SteeringConfig, adapter: ModelAdapter) -> None:
        config.directions.check_compatible(adapter, strict=config.strict_model)
        config.directions.select(adapter.resolve_layers(self._layers(config)))
        super().check_model(config, adapter)

    def describe(self, config: SteeringConfig) -> dict[str, Any]:
        meta = config.directions.meta
        keys = ("model_name", "calibration_data", "calibration_sha256", "n_benign", "n_harmful", "caption_prompt",
                "caption_tokens")
        return {"shift_from": config.shift_from,
                "directions": {k: meta.get(k) for k in keys if meta.get(k) is not None}}

    def recorded_setting(self, artefact: SafetyDirections) -> dict[str, Any]:
        return {"alpha": artefact.meta["alpha"]} if "alpha" in artefact.meta else {}

    @staticmethod
    def _layers(config: SteeringConfig) -> Any:
        return SHIFTDC_LAYERS if config.layers is None else config.layers

    def apply(self, config: SteeringConfig, adapter: ModelAdapter,
              batch: SteeringBatch) -> contextlib.AbstractContextManager[Any]:
        """Runs, before steering starts: the caption generation for rows with an image and no caption, the
        counterpart pass, and (``shift_from="unsteered"``) the unsteered multimodal pass. Then the last prompt
        token of each row with an image gets ``h_l -= alpha * (m_l . s_l / s_l . s_l) s_l`` at every steered layer.
        The state holds ``"corrections"`` (``{layer: (B, H)}``, the projection each row got, before ``alpha``) and
        ``"captions"`` (the captions used)."""
        if batch.prompts is None:
            raise InputError("shiftdc steering needs the batch's prompts (their text-only counterparts are run first)")
        if batch.images is None:
            raise InputError("ShiftDC steering needs the batch's images (each row's shift is measured against "
                             "its caption)")
        prompts, images, captions = list(batch.prompts), list(batch.images), batch.captions
        directions: SafetyDirections = config.directions
        directions.check_compatible(adapter)
        if len(images) != len(prompts) or (captions is not None and len(captions) != len(prompts)):
            raise InputError(
                f"got {len(prompts)} prompts, {len(images)} images and "
                f"{'no' if captions is None else len(captions)} captions; pass one of each per prompt"
            )
        layer_ids = adapter.resolve_layers(self._layers(config))
        chosen = directions.select(layer_ids)
        rows = [i for i, img in enumerate(images) if img is not None]
        B = len(prompts)
        given = list(captions) if captions is not None else [None] * B
        need = [i for i in rows if not given[i]]
        if need:
            how = CaptionConfig(instruction=directions.caption_prompt, max_new_tokens=directions.caption_tokens,
                                batch_size=B, system_prompt=batch.system_prompt)
            for i, c in zip(need, _captions(adapter, [prompts[i] for i in need], [images[i] for i in need], how)):
                given[i] = c
        row_on = torch.zeros(B, dtype=torch.bool)
        row_on[rows] = True
        counterparts = [counterpart_prompt(p, c) if c else p for p, c in zip(prompts, given)]
        counter = prompt_states(adapter, counterparts, None, rows=rows, layers=layer_ids,
                                system_prompt=batch.system_prompt)
        if config.shift_from == "unsteered":
            mm = prompt_states(adapter, prompts, images, rows=rows, layers=layer_ids,
                               system_prompt=batch.system_prompt)
            corrections = chosen.corrections({l: mm[l] - counter[l] for l in layer_ids})  # zero rows: zero correction
            vectors: dict[int, Any] = corrections
        else:
            corrections = {}
            # in the call holding the prompt: the projection of (this layer's running last-token state - counterpart
            # state); generated tokens (decode=True) get the prompt's correction
            vectors = {l: RelativeVector(l, counter[l], direction=chosen.directions[l], store=corrections,
                                         what="ShiftDC") for l in layer_ids}
        plan = EditPlan(vectors=vectors, positions="last", decode=config.decode, rows=_image_rows(row_on),
                        scale=-config.alpha)
        return _with_state(edit_activations(adapter, plan, static=config.static), captions=given,
                           corrections=corrections)


@contextlib.contextmanager
def _with_state(context: contextlib.AbstractContextManager[dict[str, Any]], **entries: Any) -> Iterator[dict]:
    with context as state:
        state.update(entries)
        yield state


def _image_rows(row_on: torch.Tensor):
    """Row rule: the rows that have an image (decided from the batch ShiftDC was prepared for)."""

    def rows(prompt: Prompt) -> torch.Tensor:
        if prompt.tokens.batch_size != row_on.shape[0]:
            raise InputError(f"ShiftDC was prepared for {row_on.shape[0]} rows but the model got "
                             f"{prompt.tokens.batch_size}; build the batch from the same prompts and images")
        return row_on

    return rows


@contextlib.contextmanager
def steer_shiftdc(
    model: nn.Module | ModelAdapter,
    directions: SafetyDirections,
    alpha: float = DEFAULT_ALPHA,
    *,
    prompts: Sequence[str],
    images: Sequence[Image.Image | None],
    captions: Sequence[str | None] | None = None,
    system_prompt: str | None = None,
    **options: Any,
) -> Iterator[dict[str, Any]]:
    """Steer the next forward call(s) on this batch with ShiftDC (what ``directions.apply`` does).

    ``options`` are :class:`~vlmsafe.steering.SteeringConfig` fields, checked there once: ``layers`` (default
    middle-to-last), ``shift_from``, ``decode``, ``static``, ``strict_model``. The batch must be built from the
    same ``prompts`` and ``images``, left-padded, with the same ``system_prompt`` (as
    :class:`~vlmsafe.steering.SafeVLM` does). Yields a state dict whose ``"corrections"`` holds ``{layer: (B, H)}``,
    the projection each row got (before ``alpha``), and ``"captions"`` the captions used. ``static`` picks the
    compiled path as in :func:`~vlmsafe.steering.steer` (``shift_from="running"`` with ``decode=True`` runs on hooks).
    """
    refuse_unknown(SteeringConfig, options)
    config = SteeringConfig(mode="shiftdc", directions=directions, alpha=alpha, **options)
    batch = SteeringBatch(prompts=prompts, images=images, captions=captions, system_prompt=system_prompt)
    with apply_steering(model, config, batch) as handle:
        yield handle.state


__all__ = ["ShiftDC", "steer_shiftdc"]
