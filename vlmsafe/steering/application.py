"""How steering is applied to a model: the edit plan of CMRM vectors, and the handle ``ShiftVectors.apply`` returns.

The artefact applies itself, as in steering-vectors (``SteeringVector.apply``)::

    with vectors.apply(model, alpha=1.0) as handle:   # a context manager ...
        model.generate(**inputs)
    handle = vectors.apply(model, alpha=1.0)          # ... or a handle to remove by hand
    ...
    handle.remove()

The adapter is resolved once per call and handed down; every number is checked once, here
(:func:`~vlmsafe.steering.choices.check_alpha`, the position names). This module imports no other steering
module, so the vectors module can import it without a cycle.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from vlmsafe.activations import EditPlan, Prompt, edit_activations
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.errors import InputError
from vlmsafe.steering.choices import STEER_POSITIONS, check_alpha


def validate_positions(positions: str | torch.Tensor) -> None:
    if isinstance(positions, str) and positions not in STEER_POSITIONS:
        raise InputError(
            f"unknown steering positions {positions!r}; use one of {STEER_POSITIONS} "
            "(and decode=True to also steer generated tokens)"
        )


def multimodal_rows(adapter: ModelAdapter, steer_text_only: bool):
    """Row rule for :class:`EditPlan`: rows whose prompt holds image tokens (all rows with ``steer_text_only``)."""
    if steer_text_only:
        return None

    def rows(prompt: Prompt) -> torch.Tensor:
        if prompt.context_ids is None:
            raise InputError("steering needs input_ids to tell multimodal rows from text-only ones (got "
                             "inputs_embeds); pass input_ids, or steer_text_only=True to steer every row")
        return adapter.image_token_mask(prompt.context_ids).any(dim=1)

    return rows


def steering_plan(adapter: ModelAdapter, vectors: dict, alpha: float, positions: str | torch.Tensor, decode: bool,
                  steer_text_only: bool) -> EditPlan:
    """``h_l <- h_l - alpha * vectors[l]`` at ``positions`` (generated tokens too with ``decode``), rows chosen."""
    validate_positions(positions)
    alpha = check_alpha(alpha)
    rows = multimodal_rows(adapter, steer_text_only)
    return EditPlan(vectors=vectors, positions=positions, decode=decode, rows=rows, scale=-alpha,
                    image_token_id=adapter.image_token_id)


class SteeringHandle:
    """Steering in force on a model until :meth:`remove` (or the end of the ``with`` block it opened).

    ``state`` is the editing context's state dict (``"static": True`` on the compiled path).
    """

    def __init__(self, context: contextlib.AbstractContextManager[dict[str, Any]]) -> None:
        self._stack = contextlib.ExitStack()
        self.state: dict[str, Any] = self._stack.enter_context(context)

    def remove(self) -> None:
        """Stop steering: every hook and wrapper is removed (idempotent)."""
        self._stack.close()

    def __enter__(self) -> SteeringHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def apply_vectors(vectors: Any, model: nn.Module | ModelAdapter, alpha: float = 1.0, *,
                  layers: int | Sequence[int] | str | None = None, positions: str | torch.Tensor = "last",
                  decode: bool = False, steer_text_only: bool = False, static: bool | None = None,
                  strict: bool = False) -> SteeringHandle:
    """Dataset-level CMRM with ``vectors`` (a :class:`~vlmsafe.steering.ShiftVectors`): its ``apply``."""
    adapter = get_adapter(model)
    vectors.check_compatible(adapter, strict=strict)
    layer_ids = vectors.layers if layers is None else adapter.resolve_layers(layers)
    chosen = vectors.select(layer_ids)
    plan = steering_plan(adapter, dict(chosen.shifts), alpha, positions, decode, steer_text_only)
    return SteeringHandle(edit_activations(adapter, plan, static=static))
