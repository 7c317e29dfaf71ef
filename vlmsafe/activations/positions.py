"""Position rules and the token-level view of a forward call (see :mod:`vlmsafe.activations`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vlmsafe.errors import InputError

PositionSpec = str | torch.Tensor
POSITION_NAMES = ("last", "prompt", "all", "image", "text")


# --------------------------------------------------------------------------- call inputs
@dataclass
class CallInputs:
    """The token-level view of one forward call of the entry module (or of a whole prompt).

    ``attention_mask`` covers this call's ``seq_len`` tokens only; ``start`` is the absolute
    position of its first token (the number of earlier tokens it attends to).
    """

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    seq_len: int
    batch_size: int
    start: int = 0


def _capture_call(args: tuple, kwargs: dict[str, Any]) -> CallInputs:
    input_ids = kwargs.get("input_ids")
    if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        input_ids = args[0]
    embeds = kwargs.get("inputs_embeds")
    ref = input_ids if input_ids is not None else embeds
    if ref is None and args and isinstance(args[0], torch.Tensor):
        ref = args[0]
    batch_size, seq_len = (int(ref.shape[0]), int(ref.shape[1])) if ref is not None and ref.dim() >= 2 else (0, 0)
    attention_mask = kwargs.get("attention_mask")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        attention_mask = None  # 4-D / dict masks carry no padding we can read; positions fall back to "all valid"
    if attention_mask is not None and attention_mask.shape[1] >= seq_len:
        start = int(attention_mask.shape[1]) - seq_len
        attention_mask = attention_mask[:, start:]
    else:
        attention_mask = None if attention_mask is not None and attention_mask.shape[1] != seq_len else attention_mask
        start = _cache_length(kwargs)
    return CallInputs(input_ids, attention_mask, seq_len, batch_size, start)


def _cache_length(kwargs: Mapping[str, Any]) -> int:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except (AttributeError, TypeError):
        return 0


def resolve_positions(
    positions: PositionSpec,
    call: CallInputs,
    *,
    image_token_id: int | None = None,
) -> torch.Tensor:
    """Turn a position rule into a ``(batch, seq)`` boolean mask for ``call``'s tokens."""
    B, T = call.batch_size, call.seq_len
    if isinstance(positions, torch.Tensor):
        if positions.shape != (B, T):
            raise InputError(
                f"explicit position mask has shape {tuple(positions.shape)} but the inputs are "
                f"(batch={B}, seq={T}); pass a mask of that shape"
            )
        return positions.bool()
    if positions not in POSITION_NAMES:
        raise InputError(f"unknown positions {positions!r}; use one of {POSITION_NAMES} or a (batch, seq) mask")
    device = call.input_ids.device if call.input_ids is not None else None
    if call.attention_mask is not None:
        valid = call.attention_mask.bool()
    else:
        valid = torch.ones(B, T, dtype=torch.bool, device=device)
    if positions in ("prompt", "all"):
        return valid
    if positions == "last":
        last = last_index(valid)
        mask = torch.zeros_like(valid)
        rows = (last >= 0).nonzero().squeeze(1)
        mask[rows, last[rows]] = True
        return mask
    if call.input_ids is None:
        raise InputError(f"positions={positions!r} needs token ids, but the model was called with inputs_embeds; "
                         "pass input_ids")
    image = call.input_ids == image_token_id if image_token_id is not None else torch.zeros_like(valid)
    return (image & valid) if positions == "image" else (valid & ~image)


def last_index(valid: torch.Tensor) -> torch.Tensor:
    """Column of the last True of each row of a ``(B, T)`` boolean mask; -1 for an empty row."""
    idx = torch.arange(valid.shape[1], device=valid.device).expand_as(valid)
    return torch.where(valid, idx, torch.full_like(idx, -1)).max(dim=1).values if valid.shape[1] else \
        torch.full((valid.shape[0],), -1, dtype=torch.long, device=valid.device)


def gather_rows(hidden: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``hidden[b, cols[b]]`` for each row: ``(B, T, H) -> (B, H)`` by index (NaN-safe; -1 gives zeros)."""
    B = hidden.shape[0]
    picked = hidden[torch.arange(B, device=hidden.device), cols.clamp(min=0).to(hidden.device)]
    missing = (cols < 0).to(hidden.device)
    return torch.where(missing.unsqueeze(1), torch.zeros_like(picked), picked)


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


