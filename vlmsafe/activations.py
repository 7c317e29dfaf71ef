"""Record and edit the residual stream of a model's layers with forward hooks.

Two context managers, sharing one notion of *positions*:

* :func:`record_activations` reads the output of chosen layers at chosen token positions;
* :func:`edit_activations` adds ``scale * vector`` at chosen layers and positions, during the
  prefill forward pass and/or the decode steps of ``generate`` (what CMRM steering uses).

Positions are resolved per call from the inputs the model actually receives (captured by a
forward pre-hook on the adapter's entry module), so they are correct for batched, left- or
right-padded inputs without the caller passing masks around:

``"last"``     the last non-padding token of each row (the last prompt token at prefill)
``"prompt"``   every non-padding token (alias ``"all"``)
``"image"``    image-placeholder tokens
``"text"``     non-padding, non-image tokens
tensor         an explicit ``(batch, seq)`` boolean/float mask

Every hook is removed when the context exits, normally or by exception.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import torch
from torch import nn

from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.errors import InputError

PositionSpec = Union[str, torch.Tensor]
POSITION_NAMES = ("last", "prompt", "all", "image", "text")


# --------------------------------------------------------------------------- call inputs
@dataclass
class CallInputs:
    """What one forward call of the entry module received (the parts positions depend on)."""

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    seq_len: int
    batch_size: int
    is_decode: bool


def _capture_call(args: tuple, kwargs: dict[str, Any]) -> CallInputs:
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        input_ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, dict):  # some models pass a dict of masks
        attention_mask = None
    ref = input_ids if input_ids is not None else embeds
    if ref is None and args and isinstance(args[0], torch.Tensor):
        ref = args[0]
    batch_size, seq_len = (int(ref.shape[0]), int(ref.shape[1])) if ref is not None and ref.dim() >= 2 else (0, 0)
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    is_decode = False
    if cache is not None:
        try:
            is_decode = int(cache.get_seq_length()) > 0
        except (AttributeError, TypeError):
            is_decode = False
    if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] != seq_len:
        # during decoding the 2-D mask covers past + current tokens; keep the current slice
        attention_mask = attention_mask[:, -seq_len:] if seq_len else attention_mask
    return CallInputs(input_ids, attention_mask, seq_len, batch_size, is_decode)


def resolve_positions(
    positions: PositionSpec,
    call: CallInputs,
    *,
    image_token_id: int | None = None,
) -> torch.Tensor:
    """Turn a position rule into a ``(batch, seq)`` float mask for one forward call."""
    if isinstance(positions, torch.Tensor):
        mask = positions
        if mask.shape != (call.batch_size, call.seq_len):
            raise InputError(
                f"explicit position mask has shape {tuple(mask.shape)} but the inputs are "
                f"(batch={call.batch_size}, seq={call.seq_len}); pass a mask of that shape"
            )
        return mask.float()
    if positions not in POSITION_NAMES:
        raise InputError(f"unknown positions {positions!r}; use one of {POSITION_NAMES} or a (batch, seq) mask")
    B, T = call.batch_size, call.seq_len
    valid = call.attention_mask.bool() if call.attention_mask is not None else torch.ones(B, T, dtype=torch.bool)
    if call.input_ids is not None:
        valid = valid.to(call.input_ids.device)
    if positions in ("prompt", "all"):
        return valid.float()
    if positions == "last":
        idx = torch.arange(T, device=valid.device).expand(B, T)
        last = torch.where(valid, idx, torch.full_like(idx, -1)).max(dim=1).values
        mask = torch.zeros(B, T, device=valid.device)
        rows = last >= 0
        mask[rows.nonzero().squeeze(1), last[rows]] = 1.0
        return mask
    if call.input_ids is None:
        raise InputError(f"positions={positions!r} needs token ids, but the model was called with inputs_embeds")
    image = call.input_ids == image_token_id if image_token_id is not None else torch.zeros_like(valid)
    if positions == "image":
        return (image & valid).float()
    return (valid & ~image).float()  # "text"


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_hidden(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    if isinstance(output, list):
        return [hidden, *output[1:]]
    return hidden


@contextlib.contextmanager
def _hooks() -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- recording
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
        """Mean over each row's selected positions: ``(B, hidden)``."""
        acts = self.activations[layer]
        if self.row_index is None:
            return acts.mean(dim=1) if acts.dim() == 3 else acts
        B = batch_size if batch_size is not None else int(self.row_index.max()) + 1
        sums = torch.zeros(B, acts.shape[-1], dtype=acts.dtype).index_add_(0, self.row_index, acts)
        counts = torch.bincount(self.row_index, minlength=B).clamp(min=1).unsqueeze(1).to(acts.dtype)
        return sums / counts


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
) -> Iterator[Recording]:
    """Record the residual-stream output of ``layers`` at ``positions``.

    >>> with record_activations(model, layers=[4, 8], positions="last") as rec:
    ...     model(**inputs)
    >>> rec.activations[8].shape   # (batch, hidden)

    ``inputs`` (``input_ids``/``attention_mask``) overrides what the entry module receives, for
    models whose entry forward sees embeddings only (open_clip). Tensors are detached, converted
    to ``dtype`` (float32 by default; ``None`` keeps the model dtype) and moved to ``device``.
    """
    adapter = get_adapter(model)
    layer_ids = adapter.resolve_layers(layers)
    rec = Recording(layers=layer_ids)
    state: dict[str, Any] = {"call": None, "n_calls": 0}
    image_token_id = adapter.image_token_id

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _capture_call(args, kwargs)
        if inputs is not None:
            ids = inputs.get("input_ids")
            am = inputs.get("attention_mask")
            call = CallInputs(ids, am, call.seq_len or int(ids.shape[1]), call.batch_size or int(ids.shape[0]), call.is_decode)
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
                    raise InputError("layer ran without a call of the entry module; pass inputs= to record_activations")
                if state.get("mask") is None:
                    mask = resolve_positions(positions, call, image_token_id=image_token_id).to(hidden.device) > 0
                    state["mask"] = mask
                    rows, cols = mask.nonzero(as_tuple=True)
                    rec.row_index, rec.position_index = rows.cpu(), cols.cpu()
                selected = hidden[state["mask"]]
            if dtype is not None:
                selected = selected.to(dtype)
            if device is not None:
                selected = selected.to(device)
            rec.calls[-1][layer] = selected
            if len(rec.calls) == 1:
                rec.activations[layer] = selected

        return hook

    with _hooks() as handles:
        handles.append(adapter.entry_module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for layer in layer_ids:
            handles.append(adapter.layers[layer].register_forward_hook(make_hook(layer)))
        yield rec


# --------------------------------------------------------------------------- editing
MaskFn = Callable[[CallInputs], "torch.Tensor | None"]


@dataclass
class EditPlan:
    """What :func:`edit_activations` adds: ``scale * vectors[layer]`` times a per-call mask.

    ``vectors[layer]`` is ``(hidden,)`` (same vector for every row), ``(batch, hidden)`` (one
    per row, e.g. sample-level CMRM), or a callable ``fn(hidden, call) -> tensor`` of either
    shape, evaluated at each forward call on the layer's current output (model dtype). ``prefill_mask(call)`` / ``decode_mask(call)`` return a
    ``(batch, seq)`` mask for that forward call, or ``None`` to leave the call untouched.
    """

    vectors: Mapping[int, "torch.Tensor | Callable[[torch.Tensor, CallInputs], torch.Tensor]"]
    prefill_mask: MaskFn | None
    decode_mask: MaskFn | None = None
    scale: float = 1.0


@contextlib.contextmanager
def edit_activations(model: nn.Module | ModelAdapter, plan: EditPlan) -> Iterator[dict[str, Any]]:
    """Add ``plan.scale * vector * mask`` to the output of each layer in ``plan.vectors``.

    The masks are computed once per forward call (prefill or decode step) from the inputs the
    entry module receives. Yields a small state dict (``calls``, ``last_call``) for inspection.
    """
    adapter = get_adapter(model)
    layer_ids = adapter.resolve_layers(list(plan.vectors))
    state: dict[str, Any] = {"calls": 0, "last_call": None, "mask": None}

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        call = _capture_call(args, kwargs)
        state["calls"] += 1
        state["last_call"] = call
        fn = plan.decode_mask if call.is_decode else plan.prefill_mask
        state["mask"] = fn(call) if fn is not None else None

    def make_hook(layer: int, vector: torch.Tensor) -> Callable:
        cache: dict[tuple, torch.Tensor] = {}

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            mask = state["mask"]
            if mask is None:
                return None
            hidden = _hidden(output)
            if not adapter.batch_first:
                hidden = hidden.transpose(0, 1)
            if callable(vector):
                vec = vector(hidden, state["last_call"]).to(device=hidden.device, dtype=torch.float32)
            else:
                key = (hidden.device, hidden.dtype)
                if key not in cache:
                    cache[key] = vector.to(device=hidden.device, dtype=torch.float32)
                vec = cache[key]
            B, T = hidden.shape[0], hidden.shape[1]
            m = mask.to(device=hidden.device, dtype=torch.float32)
            if m.shape != (B, T):
                raise InputError(
                    f"edit mask has shape {tuple(m.shape)} but layer {layer} output is (batch={B}, seq={T}); "
                    "generation that changes the batch (beam search, num_return_sequences > 1) is not supported while editing"
                )
            if vec.dim() == 1:
                delta = m.unsqueeze(-1) * vec
            else:
                if vec.shape[0] != B:
                    raise InputError(f"per-row vectors for layer {layer} have {vec.shape[0]} rows but the batch has {B}")
                delta = m.unsqueeze(-1) * vec.unsqueeze(1)
            new = (hidden.float() + plan.scale * delta).to(hidden.dtype)
            if not adapter.batch_first:
                new = new.transpose(0, 1)
            return _replace_hidden(output, new)

        return hook

    with _hooks() as handles:
        handles.append(adapter.entry_module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        for layer in layer_ids:
            handles.append(adapter.layers[layer].register_forward_hook(make_hook(layer, plan.vectors[layer]), prepend=True))
        yield state
