"""Editing with no per-token Python work: the compiled path of :func:`~vlmsafe.activations.edit_activations`.

The hook path (:mod:`vlmsafe.activations.editing`) works out, in Python, at every forward call which
positions it edits (an entry pre-hook, ``nonzero``, layer hooks attached and detached as needed). That
is exact under every way of calling a model, but under ``torch.compile`` it breaks the graph at each
call, and CUDA graphs cannot hold it. This path moves all of that work to the moment a prompt is
declared (once per ``generate`` call, in Python, outside any graph):

* the edited prompt positions become one ``(batch, prompt_len, 1)`` boolean mask and the rows steered
  at generated tokens one ``(batch, 1, 1)`` mask, both fixed for the whole ``generate`` call;
* vectors are scaled and cast once per context; a :class:`~vlmsafe.activations.editing.RelativeVector`
  (sample-level CMRM, ShiftDC's running shift) gathers each row's last prompt token with a fixed index;
* each steered layer is wrapped (swapped in its ``ModuleList`` while the context is open) by a module
  whose edit is tensor arithmetic (``torch.where(mask, hidden + vector, hidden)``) and branches only on
  shapes and on flags fixed per call, which ``torch.compile`` specialises on instead of breaking the
  graph. A wrapper, not a hook: ``torch.compile`` does not guard on hooks, so a model compiled before a
  hook is added keeps running its unsteered graph, while a swapped module is seen. The wrappers are kept
  per model and reused by later contexts, so a new batch or another alpha does not recompile.

Under ``torch.compile``, steer through ``generate`` (or :func:`~vlmsafe.activations.declare_prompt`): a
forward call outside them declares its prompt from an entry pre-hook, which a graph compiled earlier
does not see.

A forward call with more than one token is the prompt; a one-token call is a generated token. That
is how ``generate`` with a KV cache (dynamic or static, compiled or not) calls a model; a call that
fits neither (``use_cache=False``, a chunked prefill, a prompt of one token) is refused in one line
naming the hook path (``static=False``), which handles them. Values are those of the hook path
(same additions at the same positions), so greedy tokens are identical.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from vlmsafe.activations.plan import EditPlan, RelativeVector, _PromptPlan
from vlmsafe.activations.positions import _capture_call, _replace_hidden
from vlmsafe.activations.prompts import Prompt, _track_generate
from vlmsafe.adapters import ModelAdapter
from vlmsafe.errors import InputError

_FALLBACK = "steer with static=False (the hook path) for this call"


def static_unsupported(adapter: ModelAdapter, plan: EditPlan) -> str | None:
    """Why ``plan`` cannot run on the compiled path for this model (``None`` when it can)."""
    if not adapter.batch_first:
        return f"{type(adapter.model).__name__} layers are not batch-first"
    for layer, vector in plan.vectors.items():
        if isinstance(vector, RelativeVector):
            if plan.decode:
                return "a vector measured at the prompt cannot steer generated tokens on the compiled path"
        elif callable(vector):
            return f"layer {layer}'s vector is a Python function of the call"
    return None


def wants_static(model: nn.Module) -> bool:
    """Whether ``model`` is set up for compiled generation: a static cache or a compile config in its generation
    config, a forward compiled with ``torch.compile``, or a call made while compiling.

    The automatic choice of :func:`edit_activations` (``static=None``): the compiled path where the model
    will be compiled, the hook path otherwise (it also handles ``use_cache=False`` and chunked prefill).
    Options passed to one ``generate`` call are not seen here: pass ``static=True`` for those.
    """
    if torch.compiler.is_compiling():
        return True
    config = getattr(model, "generation_config", None)
    if config is not None and (getattr(config, "cache_implementation", None) == "static"
                               or getattr(config, "compile_config", None) is not None):
        return True
    return hasattr(model.forward, "_torchdynamo_orig_callable")


class _State:
    """What the layer hooks read: tensors fixed per prompt, and Python flags the compiled graph is guarded on."""

    def __init__(self, adapter: ModelAdapter, plan: EditPlan, layer_ids: list[int]) -> None:
        self.plan = plan
        self.scale = float(plan.scale)
        self.vectors: dict[int, Any] = {}
        self.devices: dict[int, torch.device] = {}
        for layer in layer_ids:
            vector = plan.vectors[layer]
            param = next(adapter.layers[layer].parameters(), None)
            device = param.device if param is not None and param.device.type != "meta" else None
            self.devices[layer] = device
            if isinstance(vector, RelativeVector):
                self.vectors[layer] = vector
                continue
            vec = (self.scale * vector.detach().float()).to(device=device or vector.device,
                                                            dtype=param.dtype if param is not None else vector.dtype)
            self.vectors[layer] = vec.unsqueeze(1) if vec.dim() == 2 else vec  # (B, 1, H) or (H,)
        self.prompt_len = 0
        self.prompt_any = False
        self.gen_on = False
        self.gen_all = False
        self.masks: dict[Any, dict[str, torch.Tensor]] = {}

    def declare(self, prompt: Prompt) -> None:
        """Resolve the edited positions of ``prompt`` into fixed tensors (once per ``generate`` call)."""
        plan = self.plan
        tokens = prompt.tokens
        B, P = tokens.batch_size, tokens.seq_len
        if P < 2:
            raise InputError(f"the compiled steering path tells the prompt from generated tokens by its length, and "
                             f"this prompt has {P} token(s); {_FALLBACK}")
        for layer, vec in self.vectors.items():
            rows = vec.target.shape[0] if isinstance(vec, RelativeVector) else vec.shape[0] if vec.dim() == 3 else B
            if rows != B:
                raise InputError(f"per-row vectors for layer {layer} have {rows} rows but the batch has {B}; "
                                 "pass one vector per row of the batch")
        pp = _PromptPlan(plan, prompt)
        device = pp.last.device
        selected = pp.selected if pp.selected is not None else torch.zeros(B, P, dtype=torch.bool, device=device)
        rows = pp.rows if pp.rows is not None else torch.ones(B, dtype=torch.bool, device=device)
        keep = ((pp.last >= 0) & rows).unsqueeze(1)
        base = {"prompt": selected.unsqueeze(-1), "gen": rows.view(B, 1, 1), "keep": keep,
                "index": torch.arange(B, device=device), "last": pp.last.clamp(min=0)}
        self.masks = {d: {k: v.to(d) for k, v in base.items()} if d is not None else base
                      for d in set(self.devices.values())}
        self.prompt_len = P
        self.prompt_any = bool(selected.any())
        self.gen_on = bool(plan.decode and pp.any_rows)
        self.gen_all = bool(pp.all_rows)


class _Hooks:
    """Per model: one wrapper module per steered layer and the entry pre-hook, reading whichever :class:`_State`
    is current.

    Layers are wrapped, not hooked: ``torch.compile`` does not guard on hooks (``skip_nnmodule_hook_guards``), so
    a graph compiled before a hook was added would silently ignore it, while swapping a module in its
    ``ModuleList`` is seen and recompiled for. Reusing the same wrapper objects (and the same state fields) keeps
    the guards satisfied from one context to the next: a new batch or another alpha reuses the compiled graph.
    """

    def __init__(self, tracker: Any) -> None:
        self.state: _State | None = None
        self.wrappers: dict[int, _SteeredLayer] = {}
        self.tracker = tracker

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            state = self.state
            if state is not None and not self.tracker.stack:  # a forward call outside generate is its own prompt
                state.declare(Prompt.of_call(_capture_call(args, kwargs)))

        self.pre_hook = pre_hook

    def wrapper(self, layer: int, inner: nn.Module) -> _SteeredLayer:
        wrapper = self.wrappers.get(layer)
        if wrapper is None or wrapper.inner is not inner:
            wrapper = self.wrappers[layer] = _SteeredLayer(inner, _make_hook(self, layer))
        return wrapper


class _SteeredLayer(nn.Module):
    """A decoder layer followed by the compiled-path edit (in its ``ModuleList`` only while a context is open).

    Attributes it does not have are read from the wrapped layer, so model code that inspects its layers
    (``attention_type``, ...) sees the same values.
    """

    def __init__(self, inner: nn.Module, edit: Any) -> None:
        super().__init__()
        self.inner = inner
        self._edit = edit

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.inner(*args, **kwargs)
        new = self._edit(self, args, output)
        return output if new is None else new

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


_HOOKS: weakref.WeakKeyDictionary[nn.Module, _Hooks] = weakref.WeakKeyDictionary()


def _make_hook(hooks: _Hooks, layer: int) -> Any:
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        state = hooks.state
        if state is None:
            return None
        plain = isinstance(output, torch.Tensor)
        hidden = output if plain else output[0]
        masks = state.masks[state.devices[layer]]
        vec = state.vectors[layer]
        if hidden.shape[1] == 1:  # a generated token (the prompt holds two tokens or more)
            if not state.gen_on:
                return None
            if vec.dtype != hidden.dtype:
                vec = vec.to(hidden.dtype)
            new = hidden + vec if state.gen_all else torch.where(masks["gen"], hidden + vec, hidden)
        else:
            if hidden.shape[1] != state.prompt_len:
                raise InputError(f"the compiled steering path expects the {state.prompt_len}-token prompt in one "
                                 f"forward call and then one token per call, got a {hidden.shape[1]}-token call "
                                 f"(use_cache=False or a chunked prefill); {_FALLBACK}")
            if not state.prompt_any:
                return None
            if isinstance(vec, RelativeVector):
                measured = vec.measure(hidden[masks["index"], masks["last"]], masks["keep"])
                vec.store[layer] = measured
                vec = (state.scale * measured).unsqueeze(1)
            if vec.dtype != hidden.dtype:
                vec = vec.to(hidden.dtype)
            new = torch.where(masks["prompt"], hidden + vec, hidden)
        return new if plain else _replace_hidden(output, new)

    return hook


@contextlib.contextmanager
def edit_static(adapter: ModelAdapter, plan: EditPlan, layer_ids: list[int]) -> Iterator[dict[str, Any]]:
    """The compiled path of :func:`~vlmsafe.activations.edit_activations` (see the module docstring)."""
    why = static_unsupported(adapter, plan)
    if why is not None:
        raise InputError(f"the compiled steering path cannot run this edit: {why}; {_FALLBACK}")
    state = _State(adapter, plan, layer_ids)
    hooks = _HOOKS.get(adapter.model)
    if hooks is not None and hooks.state is not None:
        raise InputError("a compiled steering context is already open on this model; close it before opening "
                         "another (or nest with static=False)")
    tracker, release = _track_generate(adapter.model)
    if hooks is None:
        hooks = _HOOKS[adapter.model] = _Hooks(tracker)
    handles = []
    swapped: list[tuple[int, nn.Module]] = []
    container = adapter.layers
    hooks.state = state
    tracker.listeners.append(state.declare)
    try:
        handles.append(adapter.entry_module.register_forward_pre_hook(hooks.pre_hook, with_kwargs=True))
        for layer in layer_ids:
            inner = container[layer]
            container[layer] = hooks.wrapper(layer, inner)
            swapped.append((layer, inner))
        yield {"static": True, "state": state}
    finally:
        for layer, inner in reversed(swapped):
            container[layer] = inner
        for handle in handles:
            handle.remove()
        tracker.listeners.remove(state.declare)
        hooks.state = None
        release()
