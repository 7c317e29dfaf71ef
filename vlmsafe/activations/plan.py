"""What an edit adds where: the plan, its per-prompt and per-call resolution, and measured vectors.

Shared by the hook path (:mod:`vlmsafe.activations.editing`) and the compiled path
(:mod:`vlmsafe.activations.compiled`), which import it and not each other.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from vlmsafe.activations.positions import CallInputs, PositionSpec, last_index, resolve_positions
from vlmsafe.activations.prompts import Prompt
from vlmsafe.errors import InputError

VectorFn = Callable[[torch.Tensor, "CallEdit"], torch.Tensor]
RowFn = Callable[[Prompt], "torch.Tensor | None"]


@dataclass
class EditPlan:
    """What :func:`edit_activations` adds: ``scale * vectors[layer]`` at the selected positions.

    ``vectors[layer]`` is ``(hidden,)`` (same vector for every row), ``(batch, hidden)`` (one per
    row), or a callable ``fn(hidden, edit) -> tensor`` of either shape, evaluated on the layer's
    current output at each forward call that edits something (sample-level CMRM). ``positions``
    selects prompt tokens (``None``: none); ``decode=True`` also edits every generated token.
    ``rows(prompt)`` returns a ``(batch,)`` boolean mask of the rows to edit (``None``: all),
    evaluated once per prompt.
    """

    vectors: Mapping[int, torch.Tensor | VectorFn]
    positions: PositionSpec | None = "last"
    decode: bool = False
    rows: RowFn | None = None
    scale: float = 1.0
    image_token_id: int | None = None


@dataclass(eq=False)
class RelativeVector:
    """A per-row vector measured in the forward call that holds the prompt, on the stream the layer outputs.

    ``hidden[last prompt token] - target`` for each row (sample-level CMRM), projected on ``direction`` when
    given (ShiftDC with the running shift), in float32; rows that are not edited (or have no prompt token)
    get zero. Later calls of the same prompt (generated tokens with ``decode=True``) reuse the measured value.
    ``store[layer]`` keeps what was measured, for inspection. Being data rather than a closure, it runs on
    both paths: a hook calls it (:meth:`__call__`), and the compiled path (:mod:`vlmsafe.activations.compiled`)
    evaluates the same arithmetic as tensor operations inside the graph.
    """

    layer: int
    target: torch.Tensor
    direction: torch.Tensor | None = None
    store: dict[int, torch.Tensor] | None = None
    what: str = "sample-level steering"

    def __post_init__(self) -> None:
        self.target = self.target.detach().float()
        if self.direction is not None:
            self.direction = self.direction.detach().float()
        if self.store is None:
            self.store = {}
        self._measured: Prompt | None = None
        # fixed per context, so the compiled path never reads a tensor's value into Python
        self._nonzero_direction = self.direction is None or float(self.direction @ self.direction) > 0.0

    def measure(self, current: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The vector from each row's last-prompt-token state ``current`` (B, H) and row rule ``keep`` (B, 1)."""
        m = torch.where(keep, current.float() - self.target.to(current.device), 0.0)
        if self.direction is not None:
            s = self.direction.to(m.device)
            denom = s @ s
            m = (m @ s / denom).unsqueeze(-1) * s if self._nonzero_direction else torch.zeros_like(m)
        return m

    def __call__(self, hidden: torch.Tensor, edit: CallEdit) -> torch.Tensor:
        if edit.last_cols is None:
            if self._measured is not edit.prompt or self.layer not in self.store:
                raise InputError(f"{self.what} needs each row's last prompt token in the same forward call as the "
                                 "steered positions; prefill in one call (no prefill_chunk_size)")
            return self.store[self.layer]
        if self.target.shape != (hidden.shape[0], hidden.shape[-1]):
            raise InputError(f"text-only states for layer {self.layer} have shape {tuple(self.target.shape)} but the "
                             f"batch is {(hidden.shape[0], hidden.shape[-1])}; compute them on the same prompts")
        cols = edit.last_cols.to(hidden.device)
        keep = cols >= 0
        if edit.row_mask is not None:
            keep = keep & edit.row_mask.to(hidden.device)
        current = hidden[torch.arange(cols.shape[0], device=hidden.device), cols.clamp(min=0)]
        self.store[self.layer] = self.measure(current, keep.unsqueeze(1))
        self._measured = edit.prompt
        return self.store[self.layer]


@dataclass
class CallEdit:
    """The positions one forward call edits, computed once per call and shared by every layer.

    ``rows``/``cols`` index the edited positions; both ``None`` means every position of every
    row. ``last_cols`` is the column of each row's last prompt token when this call holds the
    last prompt token of every edited row, else ``None`` (-1 for rows without one).
    """

    call: CallInputs
    prompt: Prompt
    rows: torch.Tensor | None
    cols: torch.Tensor | None
    last_cols: torch.Tensor | None
    row_mask: torch.Tensor | None


class _PromptPlan:
    """A plan's selections for one prompt (resolved once per prompt)."""

    def __init__(self, plan: EditPlan, prompt: Prompt) -> None:
        tokens = prompt.tokens
        rows = plan.rows(prompt) if plan.rows is not None else None
        device = tokens.input_ids.device if tokens.input_ids is not None else None
        self.prompt = prompt
        self.rows = rows.to(device).bool() if rows is not None else None
        self.all_rows = rows is None or bool(self.rows.all())
        self.any_rows = rows is None or bool(self.rows.any())
        sel = None
        if plan.positions is not None:
            sel = resolve_positions(plan.positions, tokens, image_token_id=plan.image_token_id)
            if self.rows is not None:
                sel = sel & self.rows.unsqueeze(1)
        self.selected = sel
        valid = tokens.attention_mask.bool() if tokens.attention_mask is not None else \
            torch.ones(tokens.batch_size, tokens.seq_len, dtype=torch.bool, device=device)
        self.last = last_index(valid)  # prompt-relative column of each row's last prompt token

    def call_edit(self, plan: EditPlan, call: CallInputs) -> CallEdit | None:
        prompt = self.prompt
        B, T = call.batch_size, call.seq_len
        if prompt.tokens.batch_size != B:
            raise InputError(
                f"the batch changed from {prompt.tokens.batch_size} to {B} rows during generation "
                "(beam search / num_return_sequences); steer with num_beams=1 and one sequence per prompt"
            )
        offset = call.start - prompt.start  # prompt column of the call's first token
        n_ctx = min(max(-offset, 0), T)  # earlier-turn tokens recomputed in this call: never edited
        p_lo, p_hi = max(offset, 0), min(offset + T, prompt.tokens.seq_len)
        n_prompt = max(p_hi - p_lo, 0)
        n_gen = T - n_ctx - n_prompt
        gen_on = plan.decode and n_gen > 0 and self.any_rows
        if n_prompt == 0:
            if not gen_on:
                return None
            if n_ctx == 0 and self.all_rows:  # a decode step of a batch that is steered everywhere
                return CallEdit(call, prompt, None, None, None, self.rows)
        parts = []
        device = self.selected.device if self.selected is not None else self.last.device
        if n_ctx:
            parts.append(torch.zeros(B, n_ctx, dtype=torch.bool, device=device))
        if n_prompt:
            parts.append(self.selected[:, p_lo:p_hi] if self.selected is not None
                         else torch.zeros(B, n_prompt, dtype=torch.bool, device=device))
        if n_gen:
            on = self.rows if self.rows is not None else torch.ones(B, dtype=torch.bool, device=device)
            parts.append((on if gen_on else torch.zeros_like(on)).unsqueeze(1).expand(B, n_gen))
        mask = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        rows, cols = mask.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return None
        last_cols = None
        if n_prompt:
            cols_of_last = self.last + n_ctx - p_lo
            inside = (self.last >= p_lo) & (self.last < p_hi)
            needed = self.rows if self.rows is not None else torch.ones_like(inside)
            if bool((inside | ~needed | (self.last < 0)).all()):
                last_cols = torch.where(inside & (self.last >= 0), cols_of_last, torch.full_like(cols_of_last, -1))
        return CallEdit(call, prompt, rows, cols, last_cols, self.rows)
