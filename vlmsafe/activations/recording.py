"""Record the residual stream of chosen layers at chosen positions."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmsafe.activations.positions import CallInputs, PositionSpec, _capture_call, _hidden, _hooks, resolve_positions
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.errors import InputError


@dataclass
class Recording:
    """Activations recorded by :func:`record_activations`.

    ``activations[layer]`` is ``(N, hidden)``: the N selected positions of the batch, row-major;
    ``row_index`` / ``position_index`` say where each came from. With ``positions="last"`` N equals
    the batch size and row i is batch row i. With ``positions=None`` the full ``(B, T, hidden)``
    tensor is kept instead. Only the first (prefill) call is recorded unless ``all_calls=True``,
    in which case ``calls`` holds one dict per forward call.
    """

    layers: list[int]
    activations: dict[int, torch.Tensor] = field(default_factory=dict)
    row_index: torch.Tensor | None = None
    position_index: torch.Tensor | None = None
    calls: list[dict[int, torch.Tensor]] = field(default_factory=list)

    def mean(self, layer: int) -> torch.Tensor:
        return self.activations[layer].mean(dim=0)

    def per_row_mean(self, layer: int, batch_size: int | None = None) -> torch.Tensor:
        """Mean over each row's selected positions: ``(B, hidden)`` (index-add, so unselected values never enter)."""
        acts = self.activations[layer]
        if self.row_index is None:
            return acts.mean(dim=1) if acts.dim() == 3 else acts
        B = batch_size if batch_size is not None else int(self.row_index.max()) + 1
        sums = torch.zeros(B, acts.shape[-1], dtype=acts.dtype).index_add_(0, self.row_index, acts)
        counts = torch.bincount(self.row_index, minlength=B).clamp(min=1).unsqueeze(1).to(acts.dtype)
        return sums / counts


class _StopForward(Exception):
    """Raised after the deepest recorded layer when the rest of the forward pass is not needed."""


@contextlib.contextmanager
def record_activations(
    model: nn.Module | ModelAdapter,
    layers: int | Sequence[int] | str | None = None,
    positions: PositionSpec | None = "last",
    *,
    inputs: Mapping[str, torch.Tensor] | None = None,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device | None = "cpu",
    all_calls: bool = False,
    stop_early: bool = False,
) -> Iterator[Recording]:
    """Record the residual-stream output of ``layers`` at ``positions``.

    >>> with record_activations(model, layers=[4, 8], positions="last") as rec:
    ...     model(**inputs)
    >>> rec.activations[8].shape   # (batch, hidden)

    ``inputs`` (``input_ids``/``attention_mask``) overrides what the entry module receives, for
    models whose entry forward sees embeddings only (open_clip). Tensors are detached, converted
    to ``dtype`` (float32 by default; ``None`` keeps the model dtype) and moved to ``device``.
    ``stop_early=True`` ends the forward pass right after the deepest recorded layer (the layers
    above it and the output head do not run; the call inside the ``with`` block returns nothing
    and the block ends there), for passes that only need the recorded states.
    """
    adapter = get_adapter(model)
    layer_ids = adapter.resolve_layers(layers)
    rec = Recording(layers=layer_ids)
    state: dict[str, Any] = {"call": None, "n_calls": 0}
    image_token_id = adapter.image_token_id
    deepest = max(layer_ids)

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _capture_call(args, kwargs)
        if inputs is not None:
            ids = inputs.get("input_ids")
            am = inputs.get("attention_mask")
            T, B = call.seq_len or int(ids.shape[1]), call.batch_size or int(ids.shape[0])
            call = CallInputs(ids, am, T, B, call.start)
        state["call"] = call
        state["n_calls"] += 1
        state["mask"] = None
        if all_calls or state["n_calls"] == 1:
            rec.calls.append({})

    def make_hook(layer: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not all_calls and state["n_calls"] > 1:
                return
            hidden = _hidden(output)
            if not adapter.batch_first:
                hidden = hidden.transpose(0, 1)
            hidden = hidden.detach()
            if positions is None:
                selected = hidden
            else:
                call: CallInputs = state["call"]
                if call is None:
                    raise InputError("a layer ran without a call of the entry module; "
                                     "pass inputs= to record_activations")
                if state.get("mask") is None:
                    mask = resolve_positions(positions, call, image_token_id=image_token_id).to(hidden.device)
                    rows, cols = mask.nonzero(as_tuple=True)
                    state["mask"] = (rows, cols)
                    rec.row_index, rec.position_index = rows.cpu(), cols.cpu()
                rows, cols = state["mask"]
                if rows.device != hidden.device:  # a dispatched model's layers may sit on different GPUs
                    rows, cols = rows.to(hidden.device), cols.to(hidden.device)
                selected = hidden[rows, cols]
            if dtype is not None:
                selected = selected.to(dtype)
            if device is not None:
                selected = selected.to(device)
            rec.calls[-1][layer] = selected
            if len(rec.calls) == 1:
                rec.activations[layer] = selected
            if stop_early and layer == deepest:
                raise _StopForward

        return hook

    with _hooks() as handles:
        handles.append(adapter.entry_module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for layer in layer_ids:
            handles.append(adapter.layers[layer].register_forward_hook(make_hook(layer)))
        with contextlib.suppress(_StopForward):
            yield rec


