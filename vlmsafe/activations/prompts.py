"""Which tokens are the prompt of the generation in progress (see :mod:`vlmsafe.activations`).

While an editing context is open, the model's ``generate`` is wrapped so that each call
declares its prompt; forward calls outside ``generate`` are their own prompt.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vlmsafe.activations.positions import CallInputs, _cache_length
from vlmsafe.adapters import ModelAdapter
from vlmsafe.errors import InputError


@dataclass(eq=False)
class Prompt:
    """The prompt tokens of one generation: absolute positions ``start .. start + seq_len - 1``.

    ``tokens`` is the :class:`CallInputs` view of just those tokens; ``context_ids`` are all the
    ids that were handed over (earlier turns included, when given), used to tell multimodal rows.
    """

    tokens: CallInputs
    context_ids: torch.Tensor | None = None

    @property
    def start(self) -> int:
        return self.tokens.start

    @property
    def end(self) -> int:
        return self.tokens.start + self.tokens.seq_len

    @classmethod
    def of_call(cls, call: CallInputs) -> Prompt:
        return cls(call, call.input_ids)


class _PromptTracker:
    """Per model: the prompt of the ``generate`` call in progress (its ``generate`` is wrapped while used)."""

    def __init__(self) -> None:
        self.stack: list[Prompt] = []
        self.users = 0
        self.saved: Any = None
        self.listeners: list[Callable[[Prompt], None]] = []  # told of each declared prompt (compiled editing)

    @property
    def current(self) -> Prompt | None:
        return self.stack[-1] if self.stack else None


_TRACKERS: weakref.WeakKeyDictionary[nn.Module, _PromptTracker] = weakref.WeakKeyDictionary()
_MISSING = object()


@contextlib.contextmanager
def declare_prompt(
    model: nn.Module | ModelAdapter,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
    *,
    past_length: int = 0,
    inputs_embeds: torch.Tensor | None = None,
) -> Iterator[Prompt]:
    """Declare the prompt of a generation, so later forward calls count as generated tokens.

    ``model.generate`` does this itself while an editing context is open; call it around a
    hand-written decoding loop. ``input_ids`` may hold the whole conversation (its first
    ``past_length`` tokens already in the cache) or only the new tokens (then ``attention_mask``
    spans the whole conversation), as ``generate`` accepts them.
    """
    tracker = _TRACKERS.setdefault(_root(model), _PromptTracker())
    prompt = _prompt_from_generate_args(input_ids, attention_mask, inputs_embeds, past_length)
    tracker.stack.append(prompt)
    try:
        for listener in list(tracker.listeners):
            listener(prompt)
        yield prompt
    finally:
        tracker.stack.remove(prompt)


def _root(model: nn.Module | ModelAdapter) -> nn.Module:
    return model.model if isinstance(model, ModelAdapter) else model


def _prompt_from_generate_args(input_ids, attention_mask, inputs_embeds, past: int) -> Prompt:
    """Mirror ``generate``'s own slicing of a prompt continued on a filled cache (``past`` tokens)."""
    ref = input_ids if input_ids is not None else inputs_embeds
    if ref is None:
        raise InputError("generate was called without input_ids or inputs_embeds; pass the prompt tokens")
    B, L = int(ref.shape[0]), int(ref.shape[1])
    mask = attention_mask if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2 else None
    if mask is not None:
        full = int(mask.shape[1]) == L  # the whole conversation was handed over, its first `past` tokens cached
    else:
        full = past < L
    new = max(L - past, 0) if full else L
    start = L - new if full else (int(mask.shape[1]) - new if mask is not None else past)
    ids = input_ids[:, L - new :] if input_ids is not None else None
    tokens = CallInputs(ids, mask[:, start : start + new] if mask is not None else None, new, B, start)
    return Prompt(tokens, input_ids)


def _track_generate(model: nn.Module) -> tuple[_PromptTracker, Callable[[], None]]:
    """Wrap ``model.generate`` (once per model, reference-counted) so each call declares its prompt.

    Returns the model's tracker and the function that releases this use of it.
    """
    tracker = _TRACKERS.setdefault(model, _PromptTracker())
    tracker.users += 1
    if tracker.users == 1 and callable(getattr(model, "generate", None)):
        tracker.saved = model.__dict__.get("generate", _MISSING)
        original = model.generate

        @functools.wraps(original)
        def generate(*args: Any, **kwargs: Any) -> Any:
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            past = _cache_length(kwargs)
            with declare_prompt(model, ids, kwargs.get("attention_mask"), past_length=past,
                                inputs_embeds=kwargs.get("inputs_embeds")):
                return original(*args, **kwargs)

        model.generate = generate

    def release() -> None:
        tracker.users -= 1
        if tracker.users == 0 and tracker.saved is not None:
            if tracker.saved is _MISSING:
                model.__dict__.pop("generate", None)
            else:
                model.generate = tracker.saved
            tracker.saved = None

    return tracker, release


def current_prompt(model: nn.Module | ModelAdapter, call: CallInputs) -> Prompt:
    """The prompt ``call`` belongs to: the declared one (inside ``generate``) or the call itself."""
    tracker = _TRACKERS.get(_root(model))
    prompt = tracker.current if tracker is not None else None
    return prompt if prompt is not None else Prompt.of_call(call)


