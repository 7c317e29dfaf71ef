"""The generic adapter: any other image-text-to-text model laid out the way transformers lays out its VLMs.

Chosen only when no explicit adapter is registered for a model's class (:data:`vlmsafe.adapters.base.FALLBACKS`).
It never guesses by module-name frequency (on LLaVA that picks the vision tower). It accepts a model only
when all of these hold, and otherwise the model is refused with the reason:

* its config has a vision config and a text config (``config.get_text_config()`` is not the config itself);
* one of the known decoder paths (:data:`LAYER_PATHS`) is an ``nn.ModuleList`` of exactly
  ``text_config.num_hidden_layers`` blocks that share no parameter with the vision tower;
* the input embeddings are ``text_config.hidden_size`` wide;
* the config names its image token (``image_token_id`` / ``image_token_index``).

It warns once per model class, in one line, naming the layers, vision tower, projector and image token it
chose. Inputs go through the processor's chat template as for :class:`ChatVLMAdapter`.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

from torch import nn

from vlmsafe.adapters.base import FALLBACKS, ModelAdapter
from vlmsafe.adapters.chat import ChatVLMAdapter

#: Where transformers' VLMs keep their language model's decoder layers, most common first.
LAYER_PATHS = (
    "model.language_model.layers",
    "model.text_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
    "language_model.layers",
    "language_model.model.decoder.layers",  # BLIP-2 / InstructBLIP around OPT
    "model.language_model.decoder.layers",
)
VISION_PATHS = ("model.vision_tower", "model.visual", "model.vision_model", "model.vision_encoder",
                "vision_tower", "visual", "vision_model", "model.vision")
PROJECTOR_PATHS = ("model.multi_modal_projector", "model.connector", "model.visual.merger", "model.mm_projector",
                   "multi_modal_projector", "model.vision_projection", "model.aligner")


class GuessedAdapterWarning(UserWarning):
    """vlmsafe is driving a model through the generic adapter (no explicit one exists for its class)."""


def _path(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


class GenericVLMAdapter(ChatVLMAdapter):
    """A chat VLM whose structure was found by :func:`generic_adapter_for` (one subclass per model class)."""

    family = "generic"
    layers_path: ClassVar[str] = ""
    vision_path: ClassVar[str | None] = None
    projector_path: ClassVar[str | None] = None

    @property
    def layers(self) -> nn.ModuleList:
        return _path(self.model, self.layers_path)

    @property
    def vision_tower(self) -> nn.Module | None:
        return _path(self.model, self.vision_path) if self.vision_path else None

    @property
    def projector(self) -> nn.Module | None:
        return _path(self.model, self.projector_path) if self.projector_path else None

    @property
    def image_token_id(self) -> int | None:
        return image_token_id(self.model.config)

    @property
    def image_placeholder(self) -> str:
        """The processor's ``image_token``, else the token string of the config's image token id."""
        processor = self._require_processor()
        token = getattr(processor, "image_token", None)
        return token or processor.tokenizer.convert_ids_to_tokens(self.image_token_id)


def image_token_id(config: Any) -> int | None:
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


_CACHE: dict[type, type[ModelAdapter] | str] = {}


def generic_adapter_for(model: nn.Module) -> type[ModelAdapter] | str:
    """An adapter class for ``model`` if it has a structure the generic adapter can read, else the reason."""
    cls = type(model)
    if cls not in _CACHE:
        _CACHE[cls] = _inspect(model)
        if not isinstance(_CACHE[cls], str):
            found = _CACHE[cls]
            warnings.warn(
                f"vlmsafe has no explicit adapter for {cls.__name__}; the generic adapter guessed: decoder layers "
                f"{found.layers_path} ({len(_path(model, found.layers_path))}), vision tower {found.vision_path}, "
                f"projector {found.projector_path}, image token id {image_token_id(model.config)}",
                GuessedAdapterWarning, stacklevel=4,
            )
    return _CACHE[cls]


def _is_image_text_to_text(model: nn.Module) -> bool:
    """Whether transformers lists ``model``'s class as an image-text-to-text model."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())


def _inspect(model: nn.Module) -> type[ModelAdapter] | str:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config") or getattr(config, "vision_config", None) is None:
        if not _is_image_text_to_text(model):
            return ""  # not a VLM: the plain "no adapter" message says it all
        return f"the generic adapter needs a vision config; {name}'s config has none"
    text = config.get_text_config()
    n, width = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if text is config or not isinstance(n, int) or not isinstance(width, int):
        return f"the generic adapter found no text config with num_hidden_layers and hidden_size in {name}'s config"
    vision_path = next((p for p in VISION_PATHS if isinstance(_path(model, p), nn.Module)), None)
    vision = {id(p) for p in _path(model, vision_path).parameters()} if vision_path else set()
    layers_path = None
    for path in LAYER_PATHS:
        found = _path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) == n and not any(
                id(p) in vision for p in found.parameters()):
            layers_path = path
            break
    if layers_path is None:
        return (f"the generic adapter found no decoder layers of {name} ({', '.join(LAYER_PATHS)}: none is a "
                f"ModuleList of text_config.num_hidden_layers={n} blocks outside the vision tower)")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if getattr(embeddings, "embedding_dim", width) != width:
        return (f"the generic adapter found input embeddings {embeddings.embedding_dim} wide in {name}, not "
                f"text_config.hidden_size={width}")
    if image_token_id(config) is None:
        return f"the generic adapter found no image token in {name}'s config (image_token_id / image_token_index)"
    projector_path = next((p for p in PROJECTOR_PATHS if isinstance(_path(model, p), nn.Module)), None)
    family = f"generic:{getattr(config, 'model_type', name)}"
    return type(f"Generic{name}Adapter", (GenericVLMAdapter,), {
        "family": family, "layers_path": layers_path, "vision_path": vision_path, "projector_path": projector_path,
        "model_classes": (name,), "__doc__": f"Generic adapter for {name} (found by structure).",
    })


FALLBACKS.append(generic_adapter_for)
