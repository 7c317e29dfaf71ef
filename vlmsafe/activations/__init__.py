"""Record and edit the residual stream of a model's layers with forward hooks.

Two context managers, sharing one notion of *positions*:

* :func:`record_activations` reads the output of chosen layers at chosen token positions;
* :func:`edit_activations` adds ``scale * vector`` at chosen layers and positions, at the prompt
  tokens and/or at the generated tokens of ``generate`` (what CMRM steering uses).

Position rules, resolved on the inputs the model actually receives, so they are right for
batched, left- or right-padded inputs without the caller passing masks around:

``"last"``     the last non-padding token of each row (the last prompt token)
``"prompt"``   every non-padding token (alias ``"all"``)
``"image"``    image-placeholder tokens
``"text"``     non-padding, non-image tokens
tensor         an explicit ``(batch, seq)`` boolean mask

Prompt tokens and generated tokens
----------------------------------
Editing tells prompt tokens from generated tokens by *absolute position*, never by whether a
KV cache happens to be filled, so the same token gets the same edit however it is computed:

* A forward call's tokens sit at absolute positions ``start .. start + seq - 1``, where ``start``
  is the number of earlier tokens the call attends to: ``attention_mask.shape[1] - seq`` (a
  2-D mask always spans past and current tokens; ``generate`` always passes one), else the
  length of the cache it is given, else 0. (transformers 5 passes no ``cache_position``.)
* Inside ``model.generate`` (the model's ``generate`` is wrapped while an editing context is
  open), the *prompt* is what ``generate`` is handed and is not yet in the cache:
  ``input_ids[:, past:]`` where ``past`` is the length of a cache passed in, or all of
  ``input_ids`` when only the new tokens are passed with a full-length mask, exactly as
  ``generate`` slices them. Positions ``prompt_start .. prompt_end - 1`` are prompt tokens;
  positions from ``prompt_end`` on are generated tokens; positions before ``prompt_start`` are
  earlier turns, computed (and edited, if they were) when they entered the cache. The position
  rule (``"last"``, ...) is resolved once per ``generate`` call on the prompt tokens.
* So a ``generate`` call edits each position identically with a cache, with ``use_cache=False``
  (every step re-runs prompt and generated tokens) and with a chunked prefill; and a prompt
  appended to a filled cache (multi-turn chat) is edited at its own prompt positions: the new
  turn plus the previous turn's last generated token, which ``generate`` never fed back.
* Outside ``generate`` every forward call is its own prompt (all its tokens are prompt tokens).
  A hand-written decoding loop declares its prompt with :func:`declare_prompt` so its steps
  count as generated tokens.

Rows (which batch rows are edited) are decided once per prompt. Layer hooks are attached only
while a forward call edits something, and every hook (and the ``generate`` wrapper) is removed
when the context exits, normally or by exception. Selection is by index (``hidden[rows, cols]``),
never by multiplying with a mask, so a non-finite value at an unselected (e.g. padded) position
never reaches a selected one.

Compiled generation: ``edit_activations(..., static=True)`` (:mod:`vlmsafe.activations.compiled`) resolves
the positions once per ``generate`` call into fixed tensors and edits with ``torch.where`` in one reusable
hook per layer, so ``torch.compile`` (static cache, CUDA graphs) traces it without a graph break; same
values, for ``generate`` with a KV cache.
"""

from vlmsafe.activations.editing import CallEdit, EditPlan, RelativeVector, edit_activations
from vlmsafe.activations.positions import (
    POSITION_NAMES,
    CallInputs,
    PositionSpec,
    gather_rows,
    last_index,
    resolve_positions,
)
from vlmsafe.activations.prompts import Prompt, current_prompt, declare_prompt
from vlmsafe.activations.recording import Recording, record_activations

__all__ = [
    "POSITION_NAMES",
    "CallEdit",
    "CallInputs",
    "EditPlan",
    "PositionSpec",
    "Prompt",
    "Recording",
    "RelativeVector",
    "current_prompt",
    "declare_prompt",
    "edit_activations",
    "gather_rows",
    "last_index",
    "record_activations",
    "resolve_positions",
]
