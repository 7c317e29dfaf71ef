"""What a folder handed to a model loader is when it is not what the command needs, said in one line.

:mod:`vlmsafe.loading` checks a model folder's weights (:mod:`vlmsafe.weights`); this module names the
other ways a folder a user brings can be wrong, each before (or instead of) transformers' own message,
which names a class or a hub URL rather than the file and the fix:

* a folder with no ``config.json`` that is something else vlmsafe knows: a PEFT adapter, steering
  vectors, ShiftDC directions, an open_clip checkpoint (:func:`not_a_model`);
* a ``config.json`` transformers cannot read: an original LLaVA checkpoint, a ``model_type`` this
  transformers does not know (:func:`config_error`);
* a model of another kind than the command loads: a text-only LM where a vision-language model is
  needed, a VLM or a CLIP encoder where a causal LM is (:func:`check_kind`, :func:`check_model_type`);
* a processor that cannot be built because its files are missing (:func:`processor_error`);
* a PEFT adapter that is pickled, truncated or of another base model (:func:`check_adapter_folder`,
  :func:`check_adapter_fits`): peft would load a ``.bin`` with ``torch.load``, fail with a safetensors
  traceback, or load an adapter of a deeper model by silently dropping the weights it has no place for.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vlmsafe.errors import FileFormatError
from vlmsafe.reading import read_json
from vlmsafe.weights import check_no_remote_code, read_safetensors_header

#: ``architectures`` of checkpoints in the original LLaVA repository's own layout.
ORIGINAL_LLAVA_ARCHITECTURES = ("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: Files a tokenizer is built from (one is enough; ``tokenizer_config.json`` alone is not).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model", "tekken.json")


def _config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = read_json(os.path.join(folder, "config.json"), what="model config")
    except FileFormatError:
        return {}
    return data if isinstance(data, dict) else {}


def architectures(folder: str | os.PathLike[str]) -> list[str]:
    """``architectures`` of the folder's ``config.json`` ([] when unreadable)."""
    archs = _config(folder).get("architectures") or []
    return [str(a) for a in archs] if isinstance(archs, list) else []


def not_a_model(folder: str | os.PathLike[str]) -> str | None:
    """What ``folder`` (which has no ``config.json``) holds instead of a model, with the fix; None if unknown."""
    root = Path(folder)
    if (root / ADAPTER_CONFIG).is_file():
        base = ""
        with contextlib.suppress(FileFormatError, AttributeError):
            base = read_json(root / ADAPTER_CONFIG, what="adapter config").get("base_model_name_or_path") or ""
        of = f" of {base}" if base else ""
        return (f"is a PEFT adapter{of} (adapter_config.json), not a model; pass its base model as the model and this "
                "folder as `adapter` where the command takes one, or merge it into the base first (peft's "
                "merge_and_unload, then save_pretrained) and pass that folder")
    if (root / "vectors.json").is_file():
        return ("holds CMRM steering vectors (vectors.json), not a model; pass the model they were calibrated on as "
                "the model and this folder as `vectors`")
    if (root / "directions.json").is_file():
        return ("holds ShiftDC safety directions (directions.json), not a model; pass the model they were "
                "calibrated on as the model and this folder as `shiftdc`")
    if (root / "open_clip_config.json").is_file():
        return "is an open_clip checkpoint (open_clip_config.json), which only the `vlmsafe safeclip` commands read"
    return None


def config_error(location: str, exc: Exception) -> FileFormatError:
    """The one-line error for a ``config.json`` that ``AutoConfig`` refused with ``exc``."""
    archs = architectures(location)
    if any(a in ORIGINAL_LLAVA_ARCHITECTURES for a in archs):
        return FileFormatError(
            f"{location}: an original LLaVA checkpoint ({', '.join(archs)}) that transformers cannot load; "
            "convert it with vlmsafe.convert.convert_llava(ORIGINAL_DIR, vision=CLIP_DIR, out=DIR) (the `vlmsafe "
            "convert-llava` command) and load DIR"
        )
    if os.path.isfile(os.path.join(location, "config.json")):  # malformed JSON: named by line and column
        try:
            read_json(os.path.join(location, "config.json"), what="model config",
                      fix="restore the config.json saved with the weights (re-download it or re-save the model)")
        except FileFormatError as err:
            return err
    model_type = _config(location).get("model_type")
    if isinstance(model_type, str) and model_type:
        import transformers
        from transformers import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            return FileFormatError(
                f"{location}: config.json has model_type {model_type!r}, which transformers "
                f"{transformers.__version__} does not ship; if the model is newer than this transformers, upgrade "
                "it (pip install -U transformers), else use a checkpoint of an architecture transformers ships "
                "(vlmsafe never runs code from a model folder)"
            )
    first = str(exc).split("\n")[0]
    if "couldn't connect" in first.lower() and not os.path.isdir(location):
        return FileFormatError(
            f"{location}: not a local folder, and the Hugging Face Hub cannot be reached to fetch it (no network?) "
            "nor is it in the cache; download it where there is a network "
            f"(`hf download {location}`) and pass the folder, or set HF_HUB_OFFLINE=1 to read the cache without "
            "trying the network"
        )
    return FileFormatError(f"{location}: cannot read a model config ({first}); pass a save_pretrained directory")


_NEEDS = {"vlm": "a vision-language model (image-text-to-text, e.g. a llava-hf checkpoint)",
          "causal_lm": "a text-only causal LM"}


def _what(config: Any) -> str:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    if type(config) in AutoModelForImageTextToText._model_mapping:
        return "a vision-language model"
    if type(config) in AutoModelForCausalLM._model_mapping:
        return "a text-only causal LM"
    if getattr(config, "model_type", None) in ("clip", "siglip", "siglip2", "chinese_clip", "clip_text_model"):
        return "an image-text encoder (CLIP): the `vlmsafe safeclip` commands read it"
    return "a model of neither kind"


def check_kind(location: str, config: Any, kind: str) -> None:
    """Refuse a model that the loader of ``kind`` (``"vlm"``/``"causal_lm"``) has no class for, saying what it is."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if kind == "vlm" else AutoModelForCausalLM
    if type(config) in auto._model_mapping:
        return
    arch = (getattr(config, "architectures", None) or [None])[0] or getattr(config, "model_type", "?")
    raise FileFormatError(f"{location}: holds {arch}, {_what(config)}, but this needs {_NEEDS[kind]}; pass such a "
                          "model's folder")


def check_model_type(folder: str | os.PathLike[str], model_types: tuple[str, ...], what: str) -> None:
    """Refuse a local folder whose ``config.json`` has a ``model_type`` other than ``model_types``."""
    model_type = _config(folder).get("model_type")
    if model_type not in model_types:
        arch = (architectures(folder) or [model_type])[0]
        raise FileFormatError(f"{folder}: holds {arch} (model_type {model_type!r}), not {what}; pass such a folder "
                              "written by save_pretrained")


def processor_error(location: str, kind: str, exc: Exception) -> FileFormatError:
    """The one-line error for a processor (VLM) or tokenizer (causal LM) that could not be built, naming the
    files the folder lacks when that is why."""
    what = "processor" if kind == "vlm" else "tokenizer"
    root = Path(location)
    missing = []
    if root.is_dir():
        if not any((root / n).is_file() for n in TOKENIZER_FILES) and not any(root.glob("*.tiktoken")):
            missing.append(f"tokenizer file ({', '.join(TOKENIZER_FILES[:3])}, ...)")
        if kind == "vlm" and not (root / "preprocessor_config.json").is_file() and not _has_image_processor(root):
            missing.append("image processor config (preprocessor_config.json, or processor_config.json with an "
                           "image_processor entry)")
    if missing:
        return FileFormatError(
            f"{location}: cannot build the {what}: the folder has no {' and no '.join(missing)}; save the {what} "
            f"next to the weights ({what}.save_pretrained(DIR)) or copy those files from the checkpoint the weights "
            "came from"
        )
    first = str(exc).split("\n")[0]
    return FileFormatError(f"{location}: cannot build the {what} ({first}); check that the directory holds the "
                           f"{what} files saved with the model")


def _has_image_processor(root: Path) -> bool:
    try:
        data = read_json(root / "processor_config.json", what="processor config")
    except FileFormatError:
        return False
    return isinstance(data, dict) and isinstance(data.get("image_processor"), dict)


# -- PEFT adapters --------------------------------------------------------------------------


def check_adapter_folder(adapter: str | os.PathLike[str]) -> set[str]:
    """A PEFT adapter folder as :mod:`vlmsafe.weights` checks a model folder: ``adapter_config.json``, no code,
    safetensors only, a valid header. Returns the names of the adapter's tensors."""
    root = Path(adapter)
    if not (root / ADAPTER_CONFIG).is_file():
        raise FileFormatError(f"{adapter}: no {ADAPTER_CONFIG}; pass a folder written by a peft model's "
                              "save_pretrained")
    check_no_remote_code(root, "adapter folder")
    weights = root / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = sorted(p.name for p in root.glob("adapter_model*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise FileFormatError(
                f"adapter {adapter}: holds {pickled[0]} but no {ADAPTER_WEIGHTS}; vlmsafe loads safetensors only (a "
                "pickle file can run code when loaded), so convert the adapter to safetensors with a tool you trust"
            )
        raise FileFormatError(f"adapter {adapter}: has no {ADAPTER_WEIGHTS}; pass a folder written by a peft "
                              "model's save_pretrained")
    return set(read_safetensors_header(weights, "adapter")[0])


def check_adapter_fits(model: Any, adapter: str | os.PathLike[str], stored: set[str]) -> None:
    """Refuse an adapter loaded onto ``model`` (a peft model) when its tensors and the model's adapter slots
    differ: peft drops the tensors it has no place for (an adapter of a deeper model) without a word."""
    from peft.utils import get_peft_model_state_dict
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    # Without the embedding layers: "auto" would look the base model up on the Hub (base_model_name_or_path).
    slots = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    embedding = tuple(f"{name}." for name in EMBEDDING_LAYER_NAMES)
    extra = sorted(k for k in stored - slots if not any(e in k for e in embedding))  # saved whole: not slots
    missing = sorted(slots - stored)
    if not extra and not missing:
        return
    base = ""
    with contextlib.suppress(FileFormatError, AttributeError):
        base = read_json(Path(adapter) / ADAPTER_CONFIG, what="adapter config").get("base_model_name_or_path") or ""
    parts = []
    if extra:
        parts.append(f"{len(extra)} of its tensors have no place in the model (e.g. {extra[0]})")
    if missing:
        parts.append(f"{len(missing)} of the model's adapter weights are not in it (e.g. {missing[0]})")
    raise FileFormatError(
        f"adapter {adapter} does not fit the model: {'; '.join(parts)}; it was trained on another base model"
        f"{f' ({base})' if base else ''}, so pass that model"
    )


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Without the FutureWarning transformers 5 raises inside peft (which reads the deprecated
    ``is_gradient_checkpointing``): noise on stderr that the user cannot act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
