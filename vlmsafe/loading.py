"""The one loading path for models vlmsafe runs: VLMs and causal LMs, with their processors.

:func:`load_model` is what ``SafeVLM.from_pretrained``, the judges, the Safe-CLIP caption converter,
the testbed and every CLI command use, so every model gets the same device default, the same
dtype handling and the same errors:

* a local path that does not exist -> "no such directory" at once, with a close sibling's name when
  there is one (``assets/testbd``: never a minute of hub retries); offline, a hub id not in the cache
  -> says so;
* a directory without ``config.json`` -> says what a model directory holds, or what the folder is instead
  (a PEFT adapter, steering vectors: :func:`vlmsafe.model_folders.not_a_model`);
* a model of the wrong kind (a text-only LM where a VLM is needed, a CLIP encoder), a ``model_type`` this
  transformers does not ship, a processor whose files are missing -> one line naming it
  (:mod:`vlmsafe.model_folders`); the processor is built before the weights are read;
* a PEFT adapter (``adapter=``) that is pickled, truncated, or of another base model -> refused (peft would
  drop the tensors it has no place for without a word);
* a folder whose JSON files point at code (``auto_map``), with pickle weights only, or with a
  malformed safetensors file -> refused before transformers reads it (:mod:`vlmsafe.weights`); every
  ``from_pretrained`` passes ``trust_remote_code=False``;
* a tensor whose shape differs from what ``config.json`` implies -> names the tensor and both shapes;
* an original LLaVA checkpoint (``LlavaLlamaForCausalLM``, not a transformers class) -> says how to
  convert it (``vlmsafe convert-llava``).

Dtype: float32 unless ``dtype`` says otherwise (``"auto"``: the checkpoint's own); transformers 5 alone would
load a bf16 folder in bf16.

A model loaded from a folder carries :func:`model_fingerprint` (:func:`vlmsafe.weights.fingerprint`
of its weights), which calibrated vectors record and check (:func:`warn_if_other_model`).

Devices: ``device=None`` keeps the model where transformers loads it (CPU), ``"auto"`` picks CUDA
when available; ``device_map`` (e.g. ``"auto"``) dispatches a large model over several GPUs / CPU
offload with accelerate, and is exclusive with ``device``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from vlmsafe.dtypes import dtype_name, torch_dtype
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.model_folders import (
    ORIGINAL_LLAVA_ARCHITECTURES,
    architectures,
    check_adapter_fits,
    check_adapter_folder,
    check_kind,
    check_model_type,
    config_error,
    not_a_model,
    processor_error,
    quiet_peft,
)
from vlmsafe.options import with_overrides
from vlmsafe.weights import check_model_folder, check_no_remote_code, fingerprint, shape_mismatch_error

ModelKind = Literal["auto", "vlm", "causal_lm"]


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | str | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16``; ``None`` and ``"auto"`` pass through.

    The names are those of :mod:`vlmsafe.dtypes`, the one dtype table.
    """
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    return torch_dtype(dtype)


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """``"auto"`` -> ``cuda`` when available else ``cpu``; a string is checked against what exists."""
    if device is None or isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use e.g. cpu, cuda, cuda:1 or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} was requested but CUDA is not available; use `device='cpu'`")
    return dev


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_model_path(path: str | os.PathLike[str]) -> str:
    """Validate a model location before loading: an existing model directory, or a hub id.

    A string that exists on disk must be a directory holding ``config.json``, and passes
    :func:`vlmsafe.weights.check_model_folder` (no code, safetensors only, valid headers). One that
    does not exist is refused at once when it looks local: absolute, ``./``, ``~``, not one ``/``,
    or ``org/name`` whose ``org`` is a local folder (``assets/testbd``, a typo) -- never sent to the
    hub for a minute of retries. A hub id in offline mode must be in the Hugging Face cache.
    """
    text = os.fspath(path)
    expanded = os.path.expanduser(text)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise FileFormatError(
                f"{text}: is a file, not a model directory; pass the folder written by save_pretrained"
            )
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise FileFormatError(f"{text}: " + (not_a_model(expanded) or "has no config.json; pass a directory "
                                                 "written by save_pretrained (model + processor)"))
        return expanded
    parent = os.path.dirname(expanded.rstrip("/\\"))
    looks_local = (os.path.isabs(expanded) or text.startswith((".", "~")) or not _HUB_ID.match(text)
                   or (parent and os.path.isdir(parent)))
    if looks_local:
        hint = _did_you_mean(expanded)
        raise FileFormatError(
            f"{text}: no such directory{hint}; pass the folder of a model saved with save_pretrained"
        )
    if _offline():
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(text, "config.json"), str):
            raise FileFormatError(
                f"{text}: no such local folder, and not a model in the Hugging Face cache (offline mode is on); pass "
                f"a model folder, or download it first (`hf download {text}` with HF_HUB_OFFLINE unset)"
            )
    return text


def check_clip_folder(path: str | os.PathLike[str]) -> None:
    """What :func:`load_model` checks before transformers reads a byte, for the transformers CLIP folder the
    Safe-CLIP commands load with ``CLIPModel`` (:class:`vlmsafe.safeclip.backends.HFCLIPBackend`): the path, no
    code, safetensors only with valid headers, and a ``config.json`` of a CLIP model (``CLIPModel`` reads any
    config, and a VLM folder would load as a CLIP of random weights)."""
    location = check_model_path(path)
    folder = location if os.path.isdir(location) else _cached_snapshot(location)
    if folder is not None:
        check_model_folder(folder, "CLIP model folder")
        check_model_type(folder, ("clip",), "a CLIP model (CLIPModel)")


def _did_you_mean(path: str) -> str:
    import difflib

    parent, name = os.path.split(path.rstrip("/\\"))
    try:
        siblings = [e.name for e in os.scandir(parent or ".") if e.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.75)
    return f" (did you mean {os.path.join(parent, close[0])}?)" if close else ""


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("TRANSFORMERS_OFFLINE", "").upper() in ("1", "ON", "YES",
                                                                                                     "TRUE")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and where its weights run: the settings every model-loading call shares, checked once.

    ``ModelConfig("llava-hf/llava-1.5-7b-hf", dtype="bf16", device_map="auto")``: ``dtype`` is a name of the one
    dtype table (:mod:`vlmsafe.dtypes`, aliases and ``torch`` dtypes accepted and stored as the name) or
    ``"auto"`` (the checkpoint's own), ``None`` meaning float32; ``device`` where the whole model goes
    (``"auto"``: CUDA when available; ``None``: the CPU); ``device_map`` an accelerate device map (``"auto"``,
    ``"balanced"``, or a dict) for a model that does not fit one device, exclusive with ``device``. The command
    line's ``--model --dtype --device --device-map`` build one (:func:`vlmsafe.cli.options.load_model_from_args`).
    """

    path: str | os.PathLike[str]
    dtype: torch.dtype | str | None = None
    device: str | torch.device | None = None
    device_map: str | dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None:
            object.__setattr__(self, "dtype", dtype_name(self.dtype, "dtype", auto=True))
        if self.device is not None and self.device_map is not None:
            raise InputError("pass either `device` or `device_map`, not both (a device map places the model itself)")
        if self.device is not None:
            resolve_device(self.device)  # an unknown device, or CUDA asked for without one: refused here

    def with_overrides(self, **overrides: Any) -> ModelConfig:
        """This config with the given fields replaced (checked again; :func:`vlmsafe.options.with_overrides`)."""
        return with_overrides(ModelConfig, self, overrides)


def load_model(
    path: str | os.PathLike[str] | ModelConfig,
    *,
    kind: ModelKind = "auto",
    adapter: str | os.PathLike[str] | None = None,
    **settings: Any,
) -> tuple[nn.Module, Any]:
    """Load a model and its processor (VLM) or tokenizer (causal LM) in eval mode.

    >>> model, processor = load_model("llava-hf/llava-1.5-7b-hf", dtype="bfloat16", device="cuda")
    >>> model, processor = load_model(ModelConfig("llava-hf/llava-1.5-7b-hf", device_map="auto"))

    Args:
        path: a local directory written by ``save_pretrained`` (or a hub id when online), or a
            :class:`ModelConfig`.
        kind: ``"vlm"`` (``AutoModelForImageTextToText`` + ``AutoProcessor``), ``"causal_lm"``
            (``AutoModelForCausalLM`` + ``AutoTokenizer``) or ``"auto"`` (a ``vision_config`` in the
            config means VLM).
        adapter: a peft adapter directory to load on top (e.g. a LoRA caption converter).
        settings: :class:`ModelConfig`'s ``dtype``, ``device`` and ``device_map`` (replacing the config's fields
            when ``path`` is one).
    """
    config = path.with_overrides(**settings) if isinstance(path, ModelConfig) else ModelConfig(path, **settings)
    dtype, device, device_map = config.dtype, config.device, config.device_map
    from transformers import AutoConfig

    if kind not in ("auto", "vlm", "causal_lm"):
        raise InputError(f"kind must be 'auto', 'vlm' or 'causal_lm', got {kind!r}")
    location = check_model_path(config.path)
    if adapter is not None:
        check_adapter_folder(adapter)  # before the model loads
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    # No code, safetensors only, valid headers: checked before transformers reads a byte, for a local folder
    # and for a hub model already in the cache (offline); one still to be downloaded is checked by transformers.
    folder = location if os.path.isdir(location) else _cached_snapshot(location)
    headers = _local_folder_weights(folder) if folder is not None else None
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise config_error(location, exc) from None
    if kind == "auto":
        kind = "vlm" if hasattr(config, "vision_config") else "causal_lm"
    check_kind(location, config, kind)  # a text-only LM where a VLM is needed, or the other way round
    # float32 unless asked: transformers 5 would load a bf16/fp16 folder in its own dtype ("auto")
    kwargs: dict[str, Any] = {"dtype": torch.float32 if torch_dtype is None else torch_dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    stored = {n: entry[0].shape for header in (headers or {}).values() for n, entry in header.items()}
    model, processor = _from_pretrained(location, kind, kwargs, stored)
    if headers is not None:  # which weights these are: vectors calibrated on them remember it
        set_fingerprint(model, fingerprint(headers))
    if adapter is not None:
        model = _with_adapter(model, adapter)
        set_fingerprint(model, None)  # the adapter changes the weights; an unknown model, not the folder's
    if target is not None:
        model = model.to(target)
    return model.eval(), processor


def _cached_snapshot(repo_id: str) -> str | None:
    """The Hugging Face cache folder of ``repo_id`` when offline (what transformers will load), else None."""
    if not _offline():
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, "config.json")
    return os.path.dirname(cached) if isinstance(cached, str) else None


def _local_folder_weights(location: str) -> dict[Any, Any] | None:
    """:func:`vlmsafe.weights.check_model_folder`, except for an original LLaVA checkpoint, which gets the
    convert-llava advice from :func:`load_model` (it is usually published as pickle ``.bin`` shards)."""
    if any(a in ORIGINAL_LLAVA_ARCHITECTURES for a in architectures(location)):
        check_no_remote_code(location)
        return None
    return check_model_folder(location)


def _from_pretrained(location: str, kind: str, kwargs: dict[str, Any],
                     stored: dict[str, tuple[int, ...]]) -> tuple[nn.Module, Any]:
    from safetensors import SafetensorError  # a truncated or corrupt weights file (not an OSError)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    # Remote code never runs; a tensor whose shape differs from the config is reported by name (transformers
    # would reinitialise it, or raise after a long table), so mismatches are collected rather than raised.
    kwargs = {**kwargs, "trust_remote_code": False, "ignore_mismatched_sizes": True, "output_loading_info": True}
    try:  # the processor first: its missing files are named at once, not after the weights load
        processor = (AutoProcessor if kind == "vlm" else AutoTokenizer).from_pretrained(location,
                                                                                      trust_remote_code=False)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise processor_error(location, kind, exc) from None
    try:
        with _quiet_size_mismatch_report():
            if kind == "vlm":
                model, info = AutoModelForImageTextToText.from_pretrained(location, **kwargs)
            else:
                model, info = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        error = shape_mismatch_error(location, info.get("mismatched_keys"), stored)
        if error is None:
            return model, processor
    except (OSError, ValueError, SafetensorError) as exc:
        first = str(exc).split("\n")[0]
        raise FileFormatError(
            f"{location}: cannot load a {'vision-language model' if kind == 'vlm' else 'causal LM'} ({first}); check "
            "that the directory holds the weights and the processor/tokenizer files"
        ) from None
    raise error


@contextlib.contextmanager
def _quiet_size_mismatch_report() -> Iterator[None]:
    """Drop transformers' load-report table when it reports size mismatches: :func:`_from_pretrained` refuses
    the model with one line instead. Other reports (missing or unexpected keys) still reach the log."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "size mismatch" not in record.getMessage()

    log = logging.getLogger("transformers.modeling_utils")
    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


#: Attribute :func:`load_model` sets on a model: :func:`vlmsafe.weights.fingerprint` of the weights it loaded.
FINGERPRINT_ATTR = "vlmsafe_fingerprint"


def set_fingerprint(model: nn.Module, value: str | None) -> None:
    object.__setattr__(model, FINGERPRINT_ATTR, value)


def model_fingerprint(model: Any) -> str | None:
    """The fingerprint of the weights ``model`` was loaded from by :func:`load_model`; None if unknown (a model
    built in memory, loaded another way, or with an adapter on top)."""
    inner = getattr(model, "model", None)  # a ModelAdapter wraps the model
    for m in (model, inner):
        if FINGERPRINT_ATTR in getattr(m, "__dict__", {}):
            value = m.__dict__[FINGERPRINT_ATTR]
            return value if isinstance(value, str) else None
    return None


def warn_if_other_model(meta: Mapping[str, Any], model: Any, *, what: str, strict: bool = False) -> None:
    """One stderr line (once per pair) when ``meta`` (of vectors or directions) records weights other than
    ``model``'s; :class:`IncompatibleVectorsError` instead with ``strict``. Silent when either side is unknown
    (vectors saved before fingerprints were recorded, a model built in memory)."""
    import sys

    from vlmsafe.errors import IncompatibleVectorsError

    recorded = meta.get("model_fingerprint")
    current = model_fingerprint(model)
    if not isinstance(recorded, str) or current is None or recorded == current:
        return
    source = meta.get("model_name") or "another model"
    msg = (f"{what} were calibrated on {source}, whose weights differ from the model loaded now (same architecture, "
           "other weights: e.g. a merged or fine-tuned copy)")
    if strict:
        raise IncompatibleVectorsError(f"{msg}; calibrate them on this model with `vlmsafe calibrate`")
    if (recorded, current) not in _WARNED:
        _WARNED.add((recorded, current))
        print(f"vlmsafe: warning: {msg}; their effect was measured on the other model, so calibrate on this one "
              "with `vlmsafe calibrate` to be sure", file=sys.stderr)


_WARNED: set[tuple[str, str]] = set()


def _with_adapter(model: nn.Module, adapter: str | os.PathLike[str]) -> nn.Module:
    """``model`` with the PEFT adapter in ``adapter`` on top, refused when the adapter is not of this model."""
    from peft import PeftModel

    stored = check_adapter_folder(adapter)
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(model, os.fspath(adapter))
    except RuntimeError as exc:  # a tensor of another shape: torch's "size mismatch for ..." report
        reason = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
        raise FileFormatError(f"adapter {adapter} does not fit the model ({reason}); it was trained on another "
                              "base model, so pass that model") from None
    check_adapter_fits(peft_model, adapter, stored)
    return peft_model


def inject_lora(model: nn.Module, config: Any) -> Any:
    """``peft.get_peft_model(model, config)``, without the FutureWarning transformers 5 raises inside it
    (:func:`vlmsafe.model_folders.quiet_peft`)."""
    from peft import get_peft_model

    with quiet_peft():
        return get_peft_model(model, config)
