"""Add vectors to the residual stream at prompt and generated positions (see :mod:`vlmsafe.activations`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from vlmsafe.activations.plan import CallEdit, EditPlan, RelativeVector, RowFn, VectorFn, _PromptPlan
from vlmsafe.activations.positions import _capture_call, _hidden, _hooks, _replace_hidden
from vlmsafe.activations.prompts import Prompt, _track_generate
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.errors import InputError

__all__ = ["CallEdit", "EditPlan", "RelativeVector", "RowFn", "VectorFn", "edit_activations"]


@contextlib.contextmanager
def edit_activations(model: nn.Module | ModelAdapter, plan: EditPlan, *,
                     static: bool | None = False) -> Iterator[dict[str, Any]]:
    """Add ``plan.scale * vector`` to the output of each layer in ``plan.vectors`` at the selected positions.

    ``static=True`` takes the compiled path (:mod:`vlmsafe.activations.compiled`: no per-token Python
    work, no graph breaks under ``torch.compile``, for ``generate`` with a KV cache); ``None`` takes it
    when the model is set up for compiled generation and the plan allows it, else the hook path below.

    One pre-hook on the entry module works out, once per forward call, which positions are
    edited (see the module docstring for prompt vs generated tokens); each layer's hook then
    does one tensor add. Layer hooks are attached only while a call edits something, so calls
    that edit nothing (the decode steps of prompt-only steering) run at plain speed. Fixed
    vectors are scaled and cast to the layer's dtype and device once, on entry. Yields a small
    state dict (``calls``, ``last_call``, ``edit``) for inspection.
    """
    from vlmsafe.activations.compiled import edit_static, static_unsupported, wants_static

    adapter = get_adapter(model)
    layer_ids = adapter.resolve_layers(list(plan.vectors))
    if plan.image_token_id is None and adapter.image_token_id is not None:
        plan = EditPlan(**{**plan.__dict__, "image_token_id": adapter.image_token_id})
    if static is None:
        static = wants_static(adapter.model) and static_unsupported(adapter, plan) is None
    if static:
        with edit_static(adapter, plan, layer_ids) as state:
            yield state
        return
    state: dict[str, Any] = {"calls": 0, "last_call": None, "edit": None, "plan": None}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _capture_call(args, kwargs)
        state["calls"] += 1
        state["last_call"] = call
        prompt = tracker.stack[-1] if tracker.stack else Prompt.of_call(call)
        pp: _PromptPlan | None = state["plan"]
        if pp is None or pp.prompt is not prompt:
            pp = state["plan"] = _PromptPlan(plan, prompt)
        state["edit"] = edit = pp.call_edit(plan, call)
        attach(edit is not None)

    hooks = [(layer, _make_edit_hook(adapter, layer, plan.vectors[layer], plan.scale, state)) for layer in layer_ids]
    layer_handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(on: bool) -> None:
        if on and not layer_handles:
            for layer, hook in hooks:
                layer_handles.append(adapter.layers[layer].register_forward_hook(hook, prepend=True))
        elif not on and layer_handles:
            for handle in layer_handles:
                handle.remove()
            layer_handles.clear()

    tracker, release = _track_generate(adapter.model)
    try:
        with _hooks() as handles:
            handles.append(adapter.entry_module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            yield state
    finally:
        attach(False)
        release()


def _make_edit_hook(adapter: ModelAdapter, layer: int, vector: Any, scale: float, state: dict) -> Callable:
    batch_first = adapter.batch_first
    if callable(vector):
        fixed = None
    else:
        param = next(adapter.layers[layer].parameters(), None)
        # an offloaded layer's weights sit on ``meta``: keep the vector where it is, the hook moves it once seen
        on_device = param is not None and param.device.type != "meta"
        fixed = (scale * vector.detach().float()).to(device=param.device if on_device else vector.device,
                                                      dtype=param.dtype if param is not None else vector.dtype)
    # the decode step of a batch steered everywhere, on a tensor output of the vector's dtype and device: one add
    fast_dtype = fixed.dtype if fixed is not None and fixed.dim() == 1 and batch_first else None
    fast_device = fixed.get_device() if fast_dtype is not None else None

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        edit: CallEdit | None = state["edit"]
        if edit is None:
            return None
        if (edit.rows is None and type(output) is torch.Tensor and output.dtype is fast_dtype
                and output.get_device() == fast_device):
            return output + fixed
        plain = batch_first and isinstance(output, torch.Tensor)  # the common case, with no per-call unwrapping
        hidden = output if plain else _hidden(output)
        if not batch_first:
            hidden = hidden.transpose(0, 1)
        vec = fixed
        if vec is None:
            vec = scale * vector(hidden, edit)
        if vec.dtype != hidden.dtype or vec.device != hidden.device:
            vec = vec.to(device=hidden.device, dtype=hidden.dtype)
        per_row = vec.dim() == 2
        if per_row and vec.shape[0] != hidden.shape[0]:
            raise InputError(f"per-row vectors for layer {layer} have {vec.shape[0]} rows but the batch has "
                             f"{hidden.shape[0]}; pass one vector per row of the batch")
        if edit.rows is None:
            new = hidden + (vec.unsqueeze(1) if per_row else vec)
        else:
            rows, cols = edit.rows, edit.cols
            if rows.device != hidden.device:  # a dispatched model's layers may sit on different GPUs
                rows, cols = rows.to(hidden.device), cols.to(hidden.device)
            new = hidden.index_put((rows, cols), vec[rows] if per_row else vec, accumulate=True)
        if plain:
            return new
        if not batch_first:
            new = new.transpose(0, 1)
        return _replace_hidden(output, new)

    return hook
