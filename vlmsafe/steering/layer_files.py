"""The one on-disk format of per-layer steering artefacts (CMRM shift vectors, ShiftDC safety directions).

Tensors as float32 safetensors (``<prefix>.<layer>``), metadata as JSON with the tensor file's sha256; on load
every file, tensor and metadata field is checked (:func:`read_layer_tables`, :func:`check_meta`), and
:func:`check_fits` says whether the tables fit a model's residual stream. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmsafe.adapters import ModelAdapter
from vlmsafe.errors import FileFormatError, IncompatibleVectorsError
from vlmsafe.loading import warn_if_other_model
from vlmsafe.reading import parse_json, sha256_file

FORMAT_VERSION = 1


def write_layer_tables(
    folder: Path,
    tables: Mapping[str, Mapping[int, torch.Tensor]],
    meta: Mapping[str, Any],
    *,
    tensor_file: str,
    meta_file: str,
    fmt: str,
) -> None:
    """Write ``{prefix.layer: tensor}`` as float32 safetensors and ``meta`` (+ the tensor file's sha256) as JSON.

    The one on-disk format of per-layer artifacts (shift vectors, ShiftDC directions): tensors only,
    nothing pickled, with a checksum so a truncated copy is refused on load.
    """
    tensors = {f"{prefix}.{layer}": vec.detach().to("cpu", torch.float32).contiguous()
               for prefix, table in tables.items() for layer, vec in table.items()}
    save_file(tensors, str(folder / tensor_file), metadata={"format": fmt, "version": str(FORMAT_VERSION)})
    meta = {**meta, "tensor_sha256": sha256_file(folder / tensor_file)}
    (folder / meta_file).write_text(json.dumps(meta, indent=2) + "\n")


def read_layer_tables(
    root: Path, prefixes: tuple[str, ...], *, tensor_file: str, meta_file: str, what: str, fix: str,
    schema: Mapping[str, Field] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[int, torch.Tensor]]]:
    """``(meta, {prefix: {layer: tensor}})`` written by :func:`write_layer_tables`, checked on the way.

    Refused with a :class:`FileFormatError` naming the file and ``fix``: a missing file, meta that is not
    a JSON object, a tensor file whose sha256 differs from the recorded one (corrupted or truncated), an
    unreadable safetensors file, an unknown tensor name, or no ``<prefixes[0]>.<layer>`` tensor at all;
    and, whether or not a checksum was recorded (a hand-made or edited folder has none), a tensor that is
    not a vector of floats, non-finite values, or vectors of a size other than the others' and the
    recorded ``hidden_size``; and metadata whose fields do not match ``schema`` (default :data:`META_SCHEMA`,
    see :func:`check_meta`).
    """
    tensor_path, meta_path = root / tensor_file, root / meta_file
    for path in (tensor_path, meta_path):
        if not path.is_file():
            raise FileFormatError(f"{path} not found: {what} holds {tensor_file} and {meta_file}; {fix}")
    meta = parse_json(meta_path.read_text(encoding="utf-8", errors="replace"), where=str(meta_path), fix=fix)
    if not isinstance(meta, dict):
        raise FileFormatError(f"{meta_path}: expected a JSON object; {fix}")
    expected = meta.get("tensor_sha256")
    if expected and sha256_file(tensor_path) != expected:
        raise FileFormatError(f"{tensor_path} is corrupted or truncated: its sha256 does not match the one "
                              f"recorded in {meta_file}; {fix}")
    try:
        raw = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{tensor_path} is not a readable safetensors file ({exc}); {fix}") from None
    tables: dict[str, dict[int, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    for key, value in raw.items():
        prefix, _, layer = key.rpartition(".")
        if prefix not in tables or not layer.isdigit():
            expected_names = ", ".join(f"{p}.<layer>" for p in prefixes)
            raise FileFormatError(f"{tensor_path}: unexpected tensor {key!r}; expected {expected_names}; {fix}")
        tables[prefix][int(layer)] = value
    if not tables[prefixes[0]]:
        raise FileFormatError(f"{tensor_path} holds no {prefixes[0]}.<layer> tensors; {fix}")
    check_meta(meta, META_SCHEMA if schema is None else schema, meta_path, layers=sorted(tables[prefixes[0]]))
    _check_vectors(raw, meta.get("hidden_size"), tensor_path, fix)
    return meta, tables


def _check_vectors(raw: Mapping[str, torch.Tensor], hidden_size: Any, path: Path, fix: str) -> None:
    """Every tensor a finite float vector of one size (``hidden_size`` where recorded): a NaN vector would steer
    every answer into NaN, a wrong size fails inside the model's forward."""
    sizes = {hidden_size} if isinstance(hidden_size, int) and not isinstance(hidden_size, bool) else set()
    for key, value in raw.items():
        if value.dim() != 1 or not value.is_floating_point():
            raise FileFormatError(f"{path}: {key} is a {value.dtype} tensor of shape {list(value.shape)}, not a "
                                  f"vector of floats; {fix}")
        if not bool(torch.isfinite(value).all()):
            raise FileFormatError(f"{path}: {key} holds non-finite values (NaN or inf); {fix}")
        sizes.add(value.shape[0])
        if len(sizes) > 1:
            what = f"the recorded hidden_size {hidden_size}" if hidden_size in sizes else "the other vectors'"
            raise FileFormatError(f"{path}: {key} has {value.shape[0]} values, unlike {what}; {fix}")


# --------------------------------------------------------------------------- metadata schema
#: A metadata field: ``(check(value) -> ok, what a valid value is)``.
Field = tuple[Callable[[Any], bool], str]


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_sha256(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) == 64
                             and all(c in "0123456789abcdef" for c in value.lower()))


def _int_list(length: int | None = None, low: int = 0, high: int | None = None) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return (isinstance(value, list) and (length is None or len(value) == length)
                and all(_is_int(v, low) and (high is None or v <= high) for v in value))
    return check


def _stats_problem(stats: dict) -> str | None:
    """What is wrong with ``stats`` (``{"<layer>": {"<statistic>": number, "count": int}}``), or ``None``."""
    for key, entry in stats.items():
        if not (isinstance(key, str) and key.isdigit()):
            return f"has the key {json.dumps(key)}, not a layer number"
        if not isinstance(entry, dict):
            return f"entry {key!r} must be an object {{statistic: number}}, got {json.dumps(entry)[:40]}"
        for name, value in entry.items():
            if not _is_number(value):
                return f"entry {key!r}: {name!r} must be a number, got {json.dumps(value)[:40]}"
        if "count" in entry and not _is_int(entry["count"]):
            return f"entry {key!r}: 'count' must be a non-negative integer, got {json.dumps(entry['count'])}"
    return None


#: Every field vlmsafe writes in ``vectors.json``, with the values it accepts on load (types and ranges). A field
#: may be absent (older or hand-made vectors hold fewer); fields it does not know are kept as they are, so
#: provenance added later (a model fingerprint, ...) loads in this version too.
META_SCHEMA: dict[str, Field] = {
    "format_version": (lambda v: _is_int(v, 1), f"an integer from 1 to {FORMAT_VERSION}"),
    "method": (_is_str, "a string such as 'cmrm'"),
    "model_class": (_optional_str, "a model class name such as 'LlavaForConditionalGeneration'"),
    "model_name": (_optional_str, "a string (the model's path or hub id)"),
    "family": (_optional_str, "an adapter family such as 'llava'"),
    "hidden_size": (lambda v: _is_int(v, 1), "a positive integer"),
    "num_layers": (lambda v: _is_int(v, 1), "a positive integer"),
    "layers": (_int_list(), "a list of layer indices (integers >= 0)"),
    "positions": (_is_str, "a string such as 'last'"),
    "dtype": (_is_str, "a dtype name such as 'float32'"),
    "vlmsafe_version": (_is_str, "a version string"),
    "system_prompt": (_optional_str, "a string or null"),
    "calibration_sha256": (_is_sha256, "64 hex digits or null"),
    "calibration_data": (_optional_str, "a path string or null"),
    "num_items": (lambda v: _is_int(v, 1), "a positive integer"),
    "aggregate": (lambda v: v in ("mean", "pca") or (_is_str(v) and v.startswith("custom:") and len(v) > 7),
                  "'mean', 'pca' or 'custom:NAME'"),
    "anchor": (lambda v: v in ("real", "blank", "noise", "image"), "one of 'real', 'blank', 'noise', 'image'"),
    "anchor_colour": (_int_list(3, 0, 255), "three integers in 0..255"),
    "anchor_seed": (lambda v: _is_int(v), "a non-negative integer"),
    "anchor_size": (_int_list(2, 1), "[width, height], positive integers"),
    "anchor_sha256": (_is_sha256, "64 hex digits"),
    "stats": (lambda v: isinstance(v, dict), "an object {layer: {statistic: number}}"),
    "derived": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "tensor_sha256": (_is_sha256, "64 hex digits"),
    "alpha": (lambda v: _is_number(v) and v is not None and 0 <= v < float("inf"), "a number >= 0"),
}


def check_meta(meta: Mapping[str, Any], schema: Mapping[str, Field], path: Path, *,
               layers: list[int] | None = None) -> None:
    """Refuse metadata (``vectors.json``, ``directions.json``) that an edit by hand or another tool left with a
    field of the wrong type or range, with one :class:`FileFormatError` naming the field, the file and what the
    field must be -- not a ``ValueError`` from deep inside a later step. Also: a ``format_version`` newer than
    this vlmsafe reads, ``num_layers`` below a stored layer, and ``layers`` / ``stats`` naming layers the tensor
    file does not hold (``layers``: the stored ones)."""
    fix = "correct it, or re-create the folder with `vlmsafe calibrate`"

    def refuse(name: str, problem: str) -> FileFormatError:
        return FileFormatError(f"{path}: field {name!r} {problem}; {fix}")

    for name, (ok, expected) in schema.items():
        if name in meta and not ok(meta[name]):
            raise refuse(name, f"must be {expected}, got {json.dumps(meta[name])[:60]}")
    problem = _stats_problem(meta["stats"]) if isinstance(meta.get("stats"), dict) else None
    if problem:
        raise refuse("stats", problem)
    version = meta.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise FileFormatError(f"{path}: format_version {version} is newer than this vlmsafe reads ({FORMAT_VERSION}); "
                              "upgrade vlmsafe")
    if layers is None:
        return
    n = meta.get("num_layers")
    if isinstance(n, int) and layers and max(layers) >= n:
        raise refuse("num_layers", f"is {n}, but the tensor file holds layer {max(layers)}")
    if "layers" in meta and sorted(set(meta["layers"])) != layers:
        raise refuse("layers", f"lists {meta['layers']}, but the tensor file holds layers {layers}")
    extra = sorted(int(k) for k in meta.get("stats", {}) if int(k) not in layers)
    if extra:
        raise refuse("stats", f"has statistics for layer(s) {extra} that the tensor file does not hold ({layers})")


def check_fits(meta: Mapping[str, Any], hidden_size: int, layers: list[int], adapter: ModelAdapter, *, what: str,
               fix: str, title: str | None = None, strict: bool = False) -> None:
    """Raise :class:`IncompatibleVectorsError` unless per-layer tensors read from a model (described by
    ``meta``: ``num_layers``, ``model_class``, ``family``, ``model_name``) fit ``adapter``'s residual stream."""
    problems = []
    if adapter.hidden_size != hidden_size:
        problems.append(f"hidden size: {what} have {hidden_size}, model has {adapter.hidden_size}")
    n = meta.get("num_layers")
    if n is not None and int(n) != adapter.num_layers:
        problems.append(f"layer count: {what} were calibrated on a model with {n} layers, "
                        f"model has {adapter.num_layers}")
    cls = meta.get("model_class")
    if cls and cls != type(adapter.model).__name__:
        problems.append(f"model class: {what} were calibrated on {cls}, model is {type(adapter.model).__name__}")
    fam = meta.get("family")
    if fam and fam != adapter.family:
        problems.append(f"family: {what} are for {fam!r}, model is {adapter.family!r} "
                        f"({type(adapter.model).__name__})")
    bad = [l for l in layers if l >= adapter.num_layers]
    if bad and n is None:
        problems.append(f"layers {bad} do not exist in a model with {adapter.num_layers} layers")
    if problems:
        source = meta.get("model_name") or meta.get("model_class") or "another model"
        raise IncompatibleVectorsError(
            f"{title or what} calibrated on {source} do not fit {type(adapter.model).__name__}: "
            + "; ".join(problems) + ". " + fix
        )
    warn_if_other_model(meta, adapter.model, what=title or what, strict=strict)  # same shapes, other weights
