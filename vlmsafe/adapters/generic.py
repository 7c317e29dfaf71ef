"""The generic adapter: any other image-text-to-text model laid out the way transformers lays out its VLMs.

Chosen only when no explicit adapter is registered for a model's class (:data:`vlmsafe.adapters.base.FALLBACKS`).
It never guesses by module-name frequency (on LLaVA that picks the vision tower). It accepts a model only
when all of these hold, and otherwise the model is refused with the reason:

* its config has a text config (``config.get_text_config()`` is not the config itself) and either a vision
  config or an image token (Fuyu feeds raw patches through a linear layer and has no vision config);
* one of the known decoder paths (:data:`LAYER_PATHS`) is an ``nn.ModuleList`` of exactly
  ``text_config.num_hidden_layers`` blocks that share no parameter with the vision tower;
* no decoder layer holds a cross-attention block (such models read the image from the side, not from image
  positions in the sequence, so the text-only twin has no image positions to compare);
* its ``forward`` runs without ``pixel_values`` (BLIP-2 and InstructBLIP require an image: no text-only twin;
  and their ``generate`` calls the language model's ``generate`` directly, so hooks on the model's ``forward``
  would never see a generated token; their default language model is OPT, decoder-only; a T5-based checkpoint
  sets ``is_encoder_decoder`` and is out of scope as an encoder-decoder);
* its image positions are marked by a token id, not by a separate mask (Kosmos-2 / 2.5 pass
  ``image_embeds_position_mask`` and write ordinary vocabulary ids at the image positions);
* a config that is its own text config is refused with what its layout does instead: IDEFICS 1's gated
  cross-attention, GIT's image embeddings prepended inside the embedding layer (no image positions in
  ``input_ids``);
* the input embeddings are ``text_config.hidden_size`` wide;
* the config has an image-token field (``image_token_id`` / ``image_token_index``). A field left unset
  (MiniCPM-V, BLIP-2, Nemotron-H Omni: the class default is ``None``, a released checkpoint's
  ``config.json`` sets it) is resolved from the processor's ``image_token`` when the adapter is used; with
  neither, the adapter refuses in one line rather than guess the image positions.

Models that are not decoder-only VLMs at all are *out of scope* (:func:`out_of_scope`): encoder-decoders
(Florence-2, Pix2Struct, UDOP, T5Gemma 2, ``VisionEncoderDecoderModel``, ...), whose decoder reads the image
through cross-attention to an encoder, and classes transformers lists under image-text-to-text whose config
has neither a vision config nor an image token (a text-only LM, a protein-text model, a robot-action model).
They are refused with that reason.

It warns once per model class, in one line, naming the layers, vision tower, projector and image token it
chose. Inputs go through the processor's chat template as for :class:`ChatVLMAdapter`.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, ClassVar

from torch import nn

from vlmsafe.adapters.base import FALLBACKS, ModelAdapter
from vlmsafe.adapters.chat import ChatVLMAdapter
from vlmsafe.errors import UnsupportedModelError

#: Where transformers' VLMs keep their language model's decoder layers, most common first.
LAYER_PATHS = (
    "model.language_model.layers",
    "model.text_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
    "language_model.layers",
    "language_model.model.decoder.layers",  # BLIP-2 / InstructBLIP around OPT
    "model.language_model.decoder.layers",
    "text_model.model.layers",  # Kosmos-2 / 2.5
    "text_decoder.bert.encoder.layer",  # BLIP (its blocks cross-attend to the image: refused, with that reason)
)
VISION_PATHS = ("model.vision_tower", "model.visual", "model.vision_model", "model.vision_encoder",
                "vision_tower", "visual", "vision_model", "model.vision")
PROJECTOR_PATHS = ("model.multi_modal_projector", "model.connector", "model.visual.merger", "model.mm_projector",
                   "multi_modal_projector", "model.vision_projection", "model.aligner", "model.merger",
                   "language_projection", "model.embed_vision", "model.vision_embed_tokens")
#: Image-token fields of transformers' VLM configs.
IMAGE_TOKEN_FIELDS = ("image_token_id", "image_token_index")
#: Name fragments of cross-attention blocks (mllama, IDEFICS, BLIP's text decoder).
CROSS_ATTENTION = ("cross_attn", "crossattention", "cross_attention")


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
        """The config's image token id; if the config leaves it unset, the processor's ``image_token``'s id."""
        found = image_token_id(self.model.config)
        if found is None and self.processor is not None:
            found = _processor_image_token_id(self.processor)
        if found is None:
            raise UnsupportedModelError(
                f"{type(self.model).__name__}'s config leaves image_token_id unset and "
                f"{'no processor was given' if self.processor is None else 'its processor names no image_token'}; "
                "set model.config.image_token_id (the id of the token the processor expands into image features)")
        return found

    @property
    def image_placeholder(self) -> str:
        """The processor's ``image_token``, else the token string of the config's image token id."""
        processor = self._require_processor()
        token = getattr(processor, "image_token", None)
        return token or processor.tokenizer.convert_ids_to_tokens(self.image_token_id)


def _processor_image_token_id(processor: Any) -> int | None:
    value = getattr(processor, "image_token_id", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    token, tokenizer = getattr(processor, "image_token", None), getattr(processor, "tokenizer", None)
    if not isinstance(token, str) or tokenizer is None:
        return None
    value = tokenizer.convert_tokens_to_ids(token)
    return value if isinstance(value, int) and value != getattr(tokenizer, "unk_token_id", None) else None


def image_token_id(config: Any) -> int | None:
    for name in IMAGE_TOKEN_FIELDS:
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
                f"projector {found.projector_path}, image token {_token_note(model.config)}",
                GuessedAdapterWarning, stacklevel=4,
            )
    return _CACHE[cls]


def _token_note(config: Any) -> str:
    found = image_token_id(config)
    return f"id {found}" if found is not None else "from the processor (the config leaves it unset)"


def _is_image_text_to_text(model: nn.Module) -> bool:
    """Whether transformers lists ``model``'s class as an image-text-to-text model."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in set(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values())


def _has_image_token_field(config: Any) -> bool:
    return any(hasattr(config, name) for name in IMAGE_TOKEN_FIELDS)


OUT_OF_SCOPE = "is not a decoder-only VLM"


def out_of_scope(model: nn.Module) -> str | None:
    """Why ``model`` is outside what any VLM adapter handles (not a decoder-only vision-language model), else
    None. Used for the refusal and by the support table, which leaves these classes out of the generic
    adapter's coverage count (they are not image-text-to-text chat decoders)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        return None
    if getattr(config, "is_encoder_decoder", False):
        return (f"{name} {OUT_OF_SCOPE}: it is an encoder-decoder (config.is_encoder_decoder), whose decoder reads "
                "the image through cross-attention to an encoder, with no image positions in its own sequence")
    if getattr(config, "vision_config", None) is None and not _has_image_token_field(config):
        return (f"{name} {OUT_OF_SCOPE}: its config has neither a vision config nor an image token (a text-only, "
                "protein-text or robot-action model transformers lists under image-text-to-text)")
    return None


def _inner_generate(model: nn.Module) -> str:
    """The submodule whose ``generate`` a wrapper VLM's ``generate`` calls (named in refusals)."""
    return next((n for n in ("language_model", "text_model") if isinstance(getattr(model, n, None), nn.Module)),
                "its language model")


def _flat_config_reason(model: nn.Module, config: Any) -> str | None:
    """Why a VLM whose config is its own text config (IDEFICS 1, GIT) cannot be read, if a known layout says so."""
    name = type(model).__name__
    if getattr(config, "cross_layer_interval", None) is not None:
        return (f"the generic adapter found gated cross-attention in {name} (config.cross_layer_interval): it reads "
                "the image from the side rather than from image positions in the sequence, so the text-only twin "
                "has nothing to compare; such a family needs an explicit adapter (as Llama 3.2 Vision has)")
    if getattr(config, "num_image_with_embedding", _MISSING) is not _MISSING:
        return (f"the generic adapter needs image positions in input_ids; {name} (GIT) prepends the image "
                "embeddings ahead of the text inside its embedding layer, so the decoder's positions do not line up "
                "with input_ids and no token id marks the image")
    return None


_MISSING = object()


def _inspect(model: nn.Module) -> type[ModelAdapter] | str:
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        return "" if not _is_image_text_to_text(model) else f"the generic adapter found no config on {name}"
    no_vision = getattr(config, "vision_config", None) is None and not _has_image_token_field(config)
    if no_vision and not _is_image_text_to_text(model):
        return ""  # not a VLM: the plain "no adapter" message says it all
    scope = out_of_scope(model)
    if scope is not None:
        return f"the generic adapter handles decoder-only VLMs; {scope}"
    text = config.get_text_config()
    n, width = getattr(text, "num_hidden_layers", None), getattr(text, "hidden_size", None)
    if text is config and _flat_config_reason(model, config):
        return _flat_config_reason(model, config)
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
    cross = next((f"{layers_path}.{m}" for m, _ in _path(model, layers_path).named_modules()
                  if any(c in m.rsplit(".", 1)[-1].lower() for c in CROSS_ATTENTION)), None)
    if cross is not None:  # (a projector's cross-attention, as in BLIP-2's Q-Former or Aria's, is fine)
        return (f"the generic adapter found cross-attention in {name}'s decoder layers ({cross}): it reads the image "
                "from the side rather than from image positions in the sequence, so the text-only twin has nothing to "
                "compare; such a family needs an explicit adapter (as Llama 3.2 Vision has)")
    params = inspect.signature(type(model).forward).parameters
    forward = params.get("pixel_values")
    if forward is not None and forward.default is inspect.Parameter.empty:
        return (f"the generic adapter needs a model that runs without an image (the text-only twin); "
                f"{name}.forward requires pixel_values, and its generate() hands inputs_embeds straight to "
                f"{_inner_generate(model)}.generate, bypassing forward, so no entry hook sees the prompt's "
                "input_ids while it generates")
    if "image_embeds_position_mask" in params:
        return (f"the generic adapter takes image positions from an image token id; {name} marks them with an "
                "image_embeds_position_mask its processor builds, and the ids at those positions also mean text "
                "(Kosmos-2: ordinary vocabulary ids; Kosmos-2.5: its BOS token <s>), so no id tells image from text")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if getattr(embeddings, "embedding_dim", width) != width:
        return (f"the generic adapter found input embeddings {embeddings.embedding_dim} wide in {name}, not "
                f"text_config.hidden_size={width}")
    if not _has_image_token_field(config):
        return (f"the generic adapter found no image-token field in {name}'s config "
                f"({' / '.join(IMAGE_TOKEN_FIELDS)}), so it cannot tell which positions hold the image")
    projector_path = next((p for p in PROJECTOR_PATHS if isinstance(_path(model, p), nn.Module)), None)
    family = f"generic:{getattr(config, 'model_type', name)}"
    return type(f"Generic{name}Adapter", (GenericVLMAdapter,), {
        "family": family, "layers_path": layers_path, "vision_path": vision_path, "projector_path": projector_path,
        "model_classes": (name,), "__doc__": f"Generic adapter for {name} (found by structure).",
    })


FALLBACKS.append(generic_adapter_for)
