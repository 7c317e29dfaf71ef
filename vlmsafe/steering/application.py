"""What every steering method applies with: the edit plan of fixed vectors, the handle an artefact's ``apply``
returns, and the unsteered last-prompt-token states per-input methods measure against.

The artefact applies itself, as in steering-vectors (``SteeringVector.apply``)::

    with vectors.apply(model, alpha=1.0) as handle:   # a context manager ...
        model.generate(**inputs)
    handle = vectors.apply(model, alpha=1.0)          # ... or a handle to remove by hand
    ...
    handle.remove()

The functions here take a resolved :class:`~vlmsafe.adapters.ModelAdapter` and numbers already checked where
they were declared (:class:`~vlmsafe.steering.SteeringConfig`, or a public entry point such as
``steer_sample_level``): they check nothing twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from vlmsafe.activations import EditPlan, Prompt, record_activations
from vlmsafe.adapters import ModelAdapter
from vlmsafe.errors import InputError


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
    rows = multimodal_rows(adapter, steer_text_only)
    return EditPlan(vectors=vectors, positions=positions, decode=decode, rows=rows, scale=-alpha,
                    image_token_id=adapter.image_token_id)


class SteeringHandle:
    """Steering in force on a model until :meth:`remove` (or the end of the ``with`` block it opened).

    ``state`` is the editing context's state dict (``"static": True`` on the compiled path; ``"shifts"`` /
    ``"corrections"`` where a method measures per input).
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


@torch.no_grad()
def prompt_states(
    adapter: ModelAdapter,
    prompts: Sequence[str],
    images: Sequence[Any] | None,
    *,
    rows: Sequence[int] | None = None,
    layers: int | Sequence[int] | str | None = None,
    system_prompt: str | None = None,
) -> dict[int, torch.Tensor]:
    """Unsteered last-prompt-token states of ``(prompts[i], images[i])`` for ``rows`` (default all): ``{l: (B, H)}``.

    Rows not listed get zeros; no KV cache; the pass stops after the deepest requested layer. What
    per-input methods measure against: the text-only counterparts of sample-level CMRM, its anchored pass on a
    blank or noise image, and ShiftDC's captioned-counterpart and multimodal passes. Takes the adapter its caller
    resolved: an entry point resolves the model once (:func:`vlmsafe.adapters.get_adapter`) and passes it on.
    """
    adapter.refuse("text-only twin")
    layer_ids = adapter.resolve_layers(layers)
    rows = list(range(len(prompts))) if rows is None else list(rows)
    shape, device = (len(prompts), adapter.hidden_size), adapter.device
    out = {l: torch.zeros(shape, dtype=torch.float32, device=device) for l in layer_ids}
    if not rows:
        return out
    picked = None if images is None else [images[i] for i in rows]
    inputs = adapter.build_inputs([prompts[i] for i in rows], picked, system_prompt=system_prompt, padding_side="left")
    with record_activations(adapter, layer_ids, positions="last", dtype=torch.float32, device=None,
                            stop_early=True) as rec:
        adapter.model(**inputs, use_cache=False)
    index = torch.tensor(rows, device=device)
    for l in layer_ids:
        out[l].index_copy_(0, index, rec.activations[l].to(device))
    return out


__all__ = ["SteeringHandle", "multimodal_rows", "prompt_states", "steering_plan"]
