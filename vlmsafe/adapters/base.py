"""The adapter interface: what vlmsafe needs to know about a model family, and the registry.

An adapter wraps one loaded model (and its processor) and answers, explicitly and per family:

* which ``nn.ModuleList`` holds the language model's decoder layers (the residual stream we read
  and edit), its hidden size and layer count (from ``config.get_text_config()``);
* where the vision tower and projector are, and which token id marks image positions;
* how to turn a (prompt, image) item into model inputs, and into its **text-only counterpart**
  (the same conversation with the image removed) through the model's own processor and chat
  template.

Layers are never guessed (e.g. "the most frequent ModuleList"): on LLaVA such heuristics can pick
the vision tower. Each family names its layers; unknown models fail loudly, and new families are
added with :func:`register_adapter`.
"""

from __future__ import annotations

import numbers
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from PIL import Image
from torch import nn

from vlmsafe.errors import InputError, LayerIndexError, UnsupportedModelError
from vlmsafe.validation import LAYER_PRESETS, parse_layer_spec, preset_layers

ImageLike = Image.Image

_REGISTRY: dict[str, type[ModelAdapter]] = {}


class ModelAdapter(ABC):
    """Family-specific knowledge about one loaded model.

    Subclasses set :attr:`family` and :attr:`model_classes` and implement the abstract members.
    """

    #: Short family name stored in saved artefacts (e.g. ``"llava"``).
    family: ClassVar[str] = ""
    #: Model class names this adapter handles (bare ``__name__`` or ``"module.QualName"``).
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: Whether inputs may carry images.
    supports_images: ClassVar[bool] = False
    #: Layout of a layer's hidden-state output: batch-first ``(B, T, H)`` or ``(T, B, H)``.
    batch_first: ClassVar[bool] = True
    #: What this family cannot do, and why (one line each), e.g. ``{"text-only twin": "..."}``.
    refusals: ClassVar[dict[str, str]] = {}

    def __init__(self, model: nn.Module, processor: Any | None = None):
        self.model = model
        self.processor = processor

    # ----------------------------------------------------------------- structure
    @property
    @abstractmethod
    def layers(self) -> nn.ModuleList:
        """The stack of transformer blocks whose outputs form the residual stream."""

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream (``config.get_text_config().hidden_size`` by default)."""
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def num_layers(self) -> int:
        """Number of blocks (``config.get_text_config().num_hidden_layers`` when the config has it)."""
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "get_text_config"):
            n = getattr(config.get_text_config(), "num_hidden_layers", None)
            if n is not None:
                return int(n)
        return len(self.layers)

    @property
    def context_length(self) -> int | None:
        """Positions the language model was built for: the text config's ``max_position_embeddings``, else the
        tokenizer's ``model_max_length`` when it is a real limit (transformers' default is 1e30); ``None`` if
        neither says. A prompt longer than this is refused before the model runs (see :meth:`check_prompts`)."""
        config = getattr(self.model, "config", None)
        text_config = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else None
        n = getattr(text_config, "max_position_embeddings", None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        n = getattr(tokenizer, "model_max_length", None)
        if isinstance(n, int) and not isinstance(n, bool) and 0 < n < MAX_SANE_CONTEXT:
            return n
        return None

    def prompt_tokens(self, prompt: str, with_image: bool) -> int:
        """Tokens of ``prompt`` as the model sees it (in its chat template; an image placeholder counts once).

        The base version tokenizes the prompt alone; adapters that build conversations override it.
        """
        tokenizer = getattr(self._require_processor(), "tokenizer", self.processor)
        return len(tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"])

    def check_prompts(self, items: Sequence[Any]) -> None:
        """Refuse, before any work, a prompt longer than the model's context (:attr:`context_length`).

        ``items``: :class:`vlmsafe.data.Item` (named by its file:line), ``(prompt, image)`` pairs, dicts with a
        ``prompt`` or plain strings (named by their index). A 2 MB prompt would otherwise run the model on
        600k positions of a 128-position model: minutes of work and gigabytes of memory for garbage. Prompts
        are counted with their chat template, without the image's tokens (a lower bound: an image only adds).
        """
        limit = self.context_length
        if limit is None:
            return
        for index, item in enumerate(items):
            prompt, with_image = _prompt_and_image(item)
            if prompt is None:
                continue
            n = self.prompt_tokens(prompt, with_image)
            if n > limit:
                where = getattr(item, "source", None) or f"item {index}"
                ident = getattr(item, "id", None)
                what = f"item {ident!r}" if ident is not None and not where.startswith("item ") else "the prompt"
                raise InputError(
                    f"{where}: {what} is {n} tokens long ({len(prompt)} characters) with the chat template, over the "
                    f"{limit}-token context of {self.model_name or type(self.model).__name__}; shorten the prompt "
                    "(or split it into several items)"
                )

    def refuse(self, need: str) -> None:
        """Raise :class:`UnsupportedModelError` (one line: why) if this family cannot provide ``need`` (a key of
        :attr:`refusals`, e.g. ``"text-only twin"``); remedies call it before any work."""
        if need in self.refusals:
            raise UnsupportedModelError(self.refusals[need])

    @property
    def entry_module(self) -> nn.Module:
        """The module whose ``forward`` receives ``input_ids``/``attention_mask`` (for hooks)."""
        return self.model

    @property
    def vision_tower(self) -> nn.Module | None:
        return None

    @property
    def projector(self) -> nn.Module | None:
        return None

    @property
    def image_token_id(self) -> int | None:
        return None

    @property
    def model_name(self) -> str:
        """Name or path the model was loaded from (``config._name_or_path``), if known."""
        config = getattr(self.model, "config", None)
        return str(getattr(config, "_name_or_path", "") or "")

    @property
    def device(self) -> torch.device:
        """Where inputs are placed.

        A model dispatched by accelerate (``device_map``: several GPUs, CPU or disk offload) keeps the
        weights of offloaded modules on ``meta``, so its first parameter says nothing; inputs go to the
        first accelerator of its device map (the execution device of offloaded blocks), or the CPU.
        """
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map:
            for target in device_map.values():
                if isinstance(target, int):
                    return torch.device("cuda", target)
                if target not in ("cpu", "disk", "meta"):
                    return torch.device(target)
            return torch.device("cpu")
        for param in self.model.parameters():
            if param.device.type != "meta":
                return param.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def resolve_layers(self, layers: int | Sequence[int] | str | None) -> list[int]:
        """Normalise a layer selection to sorted, validated, non-negative indices.

        Accepts ``None``/``"all"`` (every layer), ``"middle-to-last"`` (layers ``n // 2 .. n - 1``), an
        int, a sequence of ints (negative counts from the end, as in Python), or a string such as
        ``"8-15"`` / ``"3,5,7"`` (CLI form).
        """
        n = self.num_layers
        if layers is None:
            return list(range(n))
        if isinstance(layers, str) and layers in LAYER_PRESETS:
            return preset_layers(layers, n)
        if isinstance(layers, str):
            layers = parse_layer_spec(layers)
        if isinstance(layers, numbers.Integral):
            layers = [layers]
        if isinstance(layers, torch.Tensor):  # a tensor of indices, as a numpy array is: its elements
            layers = layers.flatten().tolist()
        if not len(layers):
            raise LayerIndexError(
                "the layer selection is empty; pass layer indices, a spec such as '8-15', or None for all"
            )
        out = []
        for idx in layers:
            if not isinstance(idx, numbers.Integral) or isinstance(idx, bool):  # numpy integers included
                raise LayerIndexError(f"layer indices must be integers, got {idx!r}")
            idx = int(idx)
            if not -n <= idx < n:
                raise LayerIndexError(
                    f"layer {idx} is out of range: {type(self.model).__name__} has {n} decoder layers "
                    f"(valid indices 0..{n - 1}, or -{n}..-1 from the end)"
                )
            out.append(idx % n)
        return sorted(set(out))

    # ----------------------------------------------------------------- inputs
    @abstractmethod
    def build_inputs(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageLike | None] | None = None,
        *,
        padding_side: str | None = None,
        add_generation_prompt: bool = True,
        system_prompt: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Batch ``prompts`` (each with an optional image) into model inputs on the model device."""

    def build_pair(
        self,
        prompts: Sequence[str],
        images: Sequence[ImageLike | None],
        **kwargs: Any,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Return (multimodal inputs, text-only counterpart inputs) for the same conversations."""
        if len(prompts) != len(images):
            raise InputError(f"got {len(prompts)} prompts but {len(images)} images; pass one image per prompt")
        return self.build_inputs(prompts, images, **kwargs), self.build_inputs(prompts, None, **kwargs)

    @property
    def image_input_size(self) -> tuple[int, int]:
        """``(width, height)`` of the images the processor hands the vision tower.

        Read from the image processor: its crop size, else a fixed ``size``, else a square of its
        shortest edge. Processors with dynamic resolution (Qwen2-VL: a pixel budget, no input size)
        get :data:`DYNAMIC_RESOLUTION_SIDE` squared, clamped into their pixel budget and rounded down
        to whole merged patches. Used to draw anchor images (blank / noise) that the processor does
        not need to resize.
        """
        return processor_image_size(getattr(self._require_processor(), "image_processor", None))

    def image_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of image-token positions (all False for text-only models)."""
        if self.image_token_id is None:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return input_ids == self.image_token_id

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        return [s.strip() for s in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]

    def _require_processor(self) -> Any:
        if self.processor is None:
            raise InputError(
                f"{type(self).__name__} needs the model's processor/tokenizer to build inputs; "
                "pass it as get_adapter(model, processor)"
            )
        return self.processor

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(model={type(self.model).__name__}, layers={self.num_layers}, "
            f"hidden_size={self.hidden_size})"
        )


#: A ``model_max_length`` at or above this is a tokenizer's "no limit" placeholder, not a context length.
MAX_SANE_CONTEXT = 10_000_000


def _prompt_and_image(item: Any) -> tuple[str | None, bool]:
    """``(prompt, has image)`` of an Item, a ``(prompt, image)`` pair, a dict or a string (``None``: no prompt)."""
    if isinstance(item, str):
        return item, False
    if isinstance(item, (tuple, list)) and len(item) == 2:
        prompt, image = item
    elif isinstance(item, dict):
        prompt, image = item.get("prompt"), item.get("image")
    else:
        prompt, image = getattr(item, "prompt", None), getattr(item, "image", None)
    return (prompt if isinstance(prompt, str) else None), image is not None


def check_prompt_lengths(model: Any, processor: Any, items: Sequence[Any]) -> None:
    """:meth:`ModelAdapter.check_prompts` for ``model`` (an ``nn.Module``, an adapter, or an object holding one
    as ``.adapter``, such as :class:`vlmsafe.steering.SafeVLM`); anything else is left alone.

    What every command calls once its model is loaded and before its first batch: a prompt the model
    cannot hold is refused with one line naming its file and line, before the work.
    """
    adapter = getattr(model, "adapter", model)
    if isinstance(adapter, nn.Module):
        adapter = adapter_class_for(adapter)(adapter, processor)
    if not isinstance(adapter, ModelAdapter):
        return
    if processor is not None and adapter.processor is None:
        adapter.processor = processor
    if adapter.processor is None:
        return
    adapter.check_prompts(items)


def template_source(processor: Any, model_name: str = "") -> str:
    """Where a model's chat template lives, for error messages: the folder's ``chat_template.jinja`` (or
    ``chat_template.json`` / ``tokenizer_config.json``) when the model was loaded from a folder."""
    folders = [model_name, getattr(processor, "name_or_path", None),
               getattr(getattr(processor, "tokenizer", None), "name_or_path", None)]
    for folder in folders:
        if folder and os.path.isdir(folder):
            for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
                path = Path(folder) / name
                if path.is_file():
                    return str(path)
    return f"the chat template of {model_name or type(processor).__name__}"


def apply_template(processor: Any, conversation: list[dict], *, model_name: str = "", **kwargs: Any) -> Any:
    """``processor.apply_chat_template(conversation, **kwargs)``, a template that raises (its own
    ``raise_exception``, a syntax error, an undefined name) turned into one :class:`InputError` naming the
    template file and the fix, instead of jinja's traceback."""
    from jinja2 import TemplateError, TemplateSyntaxError

    try:
        return processor.apply_chat_template(conversation, **kwargs)
    except TemplateError as exc:
        source = template_source(processor, model_name)
        line = getattr(exc, "lineno", None)
        at = f" (line {line})" if line and isinstance(exc, TemplateSyntaxError) else ""
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise InputError(
            f"{source}: the chat template fails{at} on a one-turn user conversation "
            f"({type(exc).__name__}: {reason}); fix the template, or restore the model's original one"
        ) from None


#: Side of the square anchor image for dynamic-resolution processors (LLaVA-1.5's 336 would be cut to
#: few tokens by Qwen2-VL's 28-pixel merged patches; 448 = 16 x 28 keeps a typical 256-token image).
DYNAMIC_RESOLUTION_SIDE = 448


def processor_image_size(image_processor: Any) -> tuple[int, int]:
    """``(width, height)`` an image processor feeds its vision tower (see :attr:`ModelAdapter.image_input_size`)."""
    if image_processor is None:
        raise InputError("the processor has no image_processor, so it has no image input size; "
                         "pass an anchor image yourself")

    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    for name in ("crop_size", "size"):
        spec = getattr(image_processor, name, None)
        if spec is not None and get(spec, "height") and get(spec, "width"):
            return int(get(spec, "width")), int(get(spec, "height"))
    patch = getattr(image_processor, "patch_size", None)
    merge = getattr(image_processor, "merge_size", None)
    size = getattr(image_processor, "size", None)
    if patch and merge and size is not None and get(size, "longest_edge"):  # Qwen2-VL: a pixel budget
        unit = int(patch) * int(merge)
        low = int(get(size, "shortest_edge") or getattr(image_processor, "min_pixels", 0) or 0) ** 0.5
        high = int(get(size, "longest_edge")) ** 0.5
        side = min(max(DYNAMIC_RESOLUTION_SIDE, low), high)
        side = max(unit, int(side) // unit * unit)
        return side, side
    if size is not None and get(size, "shortest_edge"):
        edge = int(get(size, "shortest_edge"))
        return edge, edge
    raise InputError(
        f"cannot tell the image input size of {type(image_processor).__name__}; pass the anchor as a PIL image"
    )


def register_adapter(*class_names: str) -> Callable[[type[ModelAdapter]], type[ModelAdapter]]:
    """Class decorator registering an adapter for model classes given by name.

    Example, adding a new family::

        from vlmsafe.adapters import ModelAdapter, register_adapter

        @register_adapter("MyVLMForConditionalGeneration")
        class MyVLMAdapter(ChatVLMAdapter):
            family = "myvlm"
            @property
            def layers(self): return self.model.model.language_model.layers
            ...

    Names are matched against every class in the model's MRO, bare (``__name__``) or qualified
    (``module.QualName``), so subclasses of a supported class work too.
    """

    def decorator(cls: type[ModelAdapter]) -> type[ModelAdapter]:
        names = class_names or cls.model_classes
        cls.model_classes = tuple(names)
        for name in names:
            _REGISTRY[name] = cls
        return cls

    return decorator


def supported_model_classes() -> list[str]:
    return sorted(_REGISTRY)


#: Tried in order when no adapter is registered for a model: each returns an adapter class, or a string saying
#: why it does not apply (see :mod:`vlmsafe.adapters.generic`).
FALLBACKS: list[Callable[[nn.Module], type[ModelAdapter] | str]] = []


def adapter_class_for(model: nn.Module) -> type[ModelAdapter]:
    for klass in type(model).__mro__:
        for key in (f"{klass.__module__}.{klass.__qualname__}", klass.__name__):
            if key in _REGISTRY:
                return _REGISTRY[key]
    reasons = []
    for fallback in FALLBACKS:
        found = fallback(model)
        if not isinstance(found, str):
            return found
        reasons.append(found)
    why = "".join(f" {r}." for r in reasons if r)
    raise UnsupportedModelError(
        f"vlmsafe has no adapter for model class {type(model).__name__!r} "
        f"(module {type(model).__module__}).{why} Supported classes: {', '.join(supported_model_classes())}. "
        "To add a family, subclass vlmsafe.adapters.ModelAdapter (or ChatVLMAdapter) and decorate it "
        f"with @vlmsafe.adapters.register_adapter({type(model).__name__!r}); "
        "see \"Adding a model family\" in README.md."
    )
