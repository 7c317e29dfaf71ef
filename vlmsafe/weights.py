"""The one validator of model folders and weight files, used by every reader vlmsafe has.

Every command that reads weights -- ``generate`` / ``calibrate`` / ``evaluate`` / ``probe`` (through
:func:`vlmsafe.loading.load_model`), ``merge``, ``merge-mask``, ``convert-llava`` and ``probe weights``
(through :class:`vlmsafe.merge.Checkpoint`) -- checks a safetensors file with
:func:`read_safetensors_header`, so a file one command refuses is refused by all of them, before any
work and with one line naming the problem:

* the header: its length, UTF-8, JSON, a mapping of tensor entries and a ``__metadata__`` of strings;
* every entry: a known dtype, a shape of non-negative integers, two ``data_offsets`` whose span is
  exactly the tensor's size;
* the offsets together: tensors tile the data area without overlapping and without gaps, and the
  last one ends where the file ends. This is the rule of the safetensors reference implementation
  (what transformers loads with); a file whose tensors share bytes is malformed or crafted.

A model folder is checked by :func:`check_model_folder` before transformers sees it:

* **No code from a model folder.** A JSON file with ``auto_map`` makes transformers import Python
  files shipped in the folder (after a ``[y/N]`` question on a terminal: one "y" runs them). vlmsafe
  never needs remote code, so such a folder is refused before anything is loaded, terminal or not;
  the loaders also pass ``trust_remote_code=False``.
* **safetensors only.** A folder holding only pickle weights (``pytorch_model.bin``) is refused:
  unpickling is how a model file runs code, and torch's own error advises ``weights_only=False``,
  the one thing a user must not do with a stranger's file.

:func:`fingerprint` identifies the weights a model was loaded from (cheaply, for multi-GB
checkpoints), so steering vectors can tell when they are applied to a model other than the one they
were calibrated on.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.reading import parse_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "model.ckpt.index",
                  "flax_model.msgpack")

#: safetensors dtype strings <-> torch dtypes (those torch can hold).
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in ST_TO_TORCH.items()}
_MAX_HEADER = 100 << 20  # the reference implementation's limit
_RESAVE = "re-download it or re-save the model with save_pretrained"


def torch_dtype(st_dtype: str) -> torch.dtype:
    try:
        return ST_TO_TORCH[st_dtype]
    except (KeyError, TypeError):
        raise FileFormatError(
            f"unsupported safetensors dtype {st_dtype!r}; convert the checkpoint to F16/BF16/F32"
        ) from None


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return TORCH_TO_ST[dtype]
    except KeyError:
        raise InputError(f"cannot write dtype {dtype} to safetensors; choose float16, bfloat16 or float32") from None


@dataclass(frozen=True)
class TensorInfo:
    """Header information of one stored tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


# -- safetensors ----------------------------------------------------------------------------


def read_safetensors_header(
    file: str | os.PathLike[str], role: str = "checkpoint"
) -> tuple[dict[str, tuple[TensorInfo, int, int]], int]:
    """Validate a safetensors file's header (see the module docstring).

    Returns ``{name: (info, begin, end)}`` (offsets into the data area, in file order) and the
    absolute offset where the data area starts.
    """
    file = Path(file)
    bad = f"{role} file {file} is not a readable safetensors file"
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
            if n <= 0 or n > min(size - 8, _MAX_HEADER):
                raise FileFormatError(f"{bad} (bad header length: truncated or not safetensors); {_RESAVE}")
            text = f.read(n).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{bad} (corrupted header: {exc}); {_RESAVE}") from None
    except OSError as exc:
        raise FileFormatError(f"{role} file {file} cannot be read ({exc.strerror or exc}); check the path") from None
    header = parse_json(text, where=f"{bad}: header", fix=_RESAVE)
    if not isinstance(header, dict):
        raise FileFormatError(f"{bad} (header is not a mapping); {_RESAVE}")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise FileFormatError(f"{bad} (__metadata__ is not a mapping of strings); {_RESAVE}")
    data_size = size - 8 - n
    out: dict[str, tuple[TensorInfo, int, int]] = {}
    for name, entry in header.items():
        try:
            shape = entry["shape"]
            offsets = entry["data_offsets"]
            if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
                raise FileFormatError(f"shape {shape!r} is not a list of non-negative integers")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)):
                raise FileFormatError(f"data_offsets {offsets!r} is not two integers")
            info = TensorInfo(torch_dtype(entry["dtype"]), tuple(shape))
        except (KeyError, TypeError, ValueError, FileFormatError) as exc:
            raise FileFormatError(f"{bad} (bad entry for tensor {name}: {exc}); {_RESAVE}") from None
        begin, end = offsets
        if begin < 0 or end - begin != info.nbytes or end > data_size:
            raise FileFormatError(
                f"{bad}: tensor {name} has a bad byte range (data_offsets {offsets} for {info.nbytes} bytes of "
                f"{st_dtype(info.dtype)}{list(info.shape)}, {data_size} bytes of data: truncated file?); {_RESAVE}"
            )
        out[name] = (info, begin, end)
    ordered = sorted(out.items(), key=lambda kv: (kv[1][1], kv[1][2]))
    pos, prev = 0, None
    for name, (_, begin, end) in ordered:  # overlaps first: they are what a crafted file looks like
        if begin < pos:
            raise FileFormatError(
                f"{bad}: tensors {prev} and {name} overlap (their data_offsets share bytes {begin}..{min(pos, end)}), "
                f"a malformed or crafted file; {_RESAVE}"
            )
        if end > pos:
            pos, prev = end, name
    pos, prev = 0, None
    for name, (_, begin, end) in ordered:
        if begin > pos:
            raise FileFormatError(
                f"{bad}: bytes {pos}..{begin} of its data belong to no tensor (before {name}); {_RESAVE}"
            )
        pos, prev = end, name
    if pos != data_size:
        raise FileFormatError(f"{bad}: its last {data_size - pos} bytes belong to no tensor; {_RESAVE}")
    return dict(ordered), 8 + n


# -- model folders --------------------------------------------------------------------------


def check_no_remote_code(folder: str | os.PathLike[str], what: str = "model folder") -> None:
    """Refuse a folder whose JSON files point transformers (``auto_map``) or diffusers at code inside it.

    Reads the folder's JSON files and those of its direct subfolders (a diffusers pipeline keeps
    one config per component); large files (a tokenizer's vocabulary) hold no such settings.
    """
    root = Path(folder)
    if not root.is_dir():
        return
    files = sorted(root.glob("*.json")) + sorted(root.glob("*/*.json"))
    for f in files:
        try:
            if f.stat().st_size > (8 << 20) or f.name.endswith(".index.json"):
                continue
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            continue  # what no parser reads cannot point anywhere; the loaders report the bad file
        key = _code_reference(data)
        if key is not None:
            raise InputError(
                f"{what} {root}: {f.relative_to(root)} has `{key}`, which makes transformers run Python code shipped "
                "in the folder; vlmsafe never runs code from a model folder, so use a checkpoint of an architecture "
                "transformers ships (or one re-saved without custom code)"
            )


def _code_reference(data: object, depth: int = 0) -> str | None:
    if depth > 4:
        return None
    if isinstance(data, dict):
        for key in ("auto_map", "custom_pipeline"):
            if key in data:
                return key
        for v in data.values():
            found = _code_reference(v, depth + 1)
            if found:
                return found
    return None


def safetensors_files(folder: str | os.PathLike[str], role: str = "model") -> list[Path]:
    """The safetensors files transformers would load from ``folder`` (index shards or ``model.safetensors``).

    A folder with pickle weights only is refused (see the module docstring); one with no weights
    at all is named as such.
    """
    root = Path(folder)
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        return sorted(set(_index_map(root, index).values()))
    if (root / SAFETENSORS_SINGLE).is_file():
        return [root / SAFETENSORS_SINGLE]
    pickled = [n for n in PICKLE_WEIGHTS if (root / n).exists()] or sorted(
        p.name for p in root.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    if pickled:
        raise FileFormatError(
            f"{role} {root}: holds {pickled[0]} but no {SAFETENSORS_SINGLE}; vlmsafe loads safetensors only (a pickle "
            "file can run code when loaded), so convert the weights to safetensors with a tool you trust"
        )
    raise FileFormatError(
        f"{role} {root}: has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}; pass a folder written by save_pretrained"
    )


def _index_map(root: Path, index: Path) -> dict[str, Path]:
    fix = "re-download the checkpoint or re-save it with save_pretrained"
    text = _read_text(index, fix)
    data = parse_json(text, where=str(index), fix=fix)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FileFormatError(f"{index}: no `weight_map` of tensor name -> file; {fix}")
    out: dict[str, Path] = {}
    for name, file in weight_map.items():
        f = root / file
        if os.path.isabs(file) or ".." in Path(file).parts or not f.is_file():
            raise FileFormatError(f"{index} names shard {file}, which is not a file of {root}; {fix}")
        out[name] = f
    return out


def _read_text(path: Path, fix: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{path}: cannot be read ({exc}); {fix}") from None


def check_model_folder(folder: str | os.PathLike[str], role: str = "model") -> dict[Path, dict[str, tuple]]:
    """Everything :mod:`vlmsafe.loading` checks in a local model folder before transformers reads it.

    No code (:func:`check_no_remote_code`), safetensors only (:func:`safetensors_files`), every
    file's header valid (:func:`read_safetensors_header`) and, for a sharded checkpoint, every
    tensor the index names present in its shard. Returns each file's validated header.
    """
    root = Path(folder)
    check_no_remote_code(root, role)
    files = safetensors_files(root, role)
    headers = {f: read_safetensors_header(f, role)[0] for f in files}
    index = root / SAFETENSORS_INDEX
    if index.is_file():
        for name, f in _index_map(root, index).items():
            if name not in headers[f]:
                raise FileFormatError(
                    f"{role} {root}: the index places {name} in {f.name}, which lacks it; re-download the checkpoint"
                )
    return headers


def shape_mismatch_error(location: str, mismatched: object, stored_shapes: dict[str, tuple[int, ...]] | None = None
                         ) -> FileFormatError | None:
    """The one-line error for transformers' ``mismatched_keys`` (name, checkpoint shape, model shape), or None.

    transformers names the tensor as its module tree does (``model.language_model.layers.0...``); with
    ``stored_shapes`` (the files' name -> shape) the name the user finds in the file
    (``language_model.model.layers.0...``) is given.
    """
    items = sorted(mismatched or [], key=lambda m: str(m[0]))  # type: ignore[attr-defined]
    if not items:
        return None
    name, stored, expected = items[0]
    parts = str(name).split(".")
    for i in range(len(parts)):  # the longest suffix of the module name that names exactly one stored tensor
        suffix = ".".join(parts[i:])
        found = [k for k, shape in (stored_shapes or {}).items()
                 if (k == suffix or k.endswith("." + suffix)) and list(shape) == list(stored)]
        if len(found) == 1:
            name = found[0]
            break
    more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
    return FileFormatError(
        f"{location}: tensor {name} has shape {list(stored)} in the weights but config.json implies "
        f"{list(expected)}{more}; the weights and config.json are of different models, so restore the config.json "
        "saved with these weights (or re-save the model with save_pretrained)"
    )


# -- fingerprint ----------------------------------------------------------------------------

#: Bytes read from the middle of every tensor for :func:`fingerprint`.
FINGERPRINT_SAMPLE = 4096


def fingerprint(files: list[Path] | dict[Path, dict[str, tuple]], role: str = "model") -> str:
    """A cheap identity of the weights in ``files`` (paths, or :func:`check_model_folder`'s headers).

    sha256 over every tensor's name, dtype and shape and up to :data:`FINGERPRINT_SAMPLE` bytes
    from the middle of its data, in name order: independent of sharding and file metadata, so a
    copy or a re-sharded save has the same fingerprint, while a fine-tune or a merge (which moves
    every merged tensor) does not. Costs one small read per tensor, not a read of the checkpoint.
    """
    headers = files if isinstance(files, dict) else {f: read_safetensors_header(f, role)[0] for f in files}
    located: dict[str, tuple[Path, TensorInfo, int, int]] = {}
    starts = {}
    for f, header in headers.items():
        with open(f, "rb") as fh:
            starts[f] = 8 + int.from_bytes(fh.read(8), "little")
        for name, (info, begin, end) in header.items():
            located[name] = (f, info, begin, end)
    digest = hashlib.sha256(b"vlmsafe-fingerprint/1")
    handles: dict[Path, object] = {}
    try:
        for name in sorted(located):
            f, info, begin, end = located[name]
            digest.update(f"{name}\0{st_dtype(info.dtype)}\0{list(info.shape)}\0".encode())
            n = min(FINGERPRINT_SAMPLE, end - begin)
            if n:
                fh = handles.get(f) or handles.setdefault(f, open(f, "rb"))  # noqa: SIM115 - closed below
                fh.seek(starts[f] + begin + (end - begin - n) // 2)  # type: ignore[attr-defined]
                digest.update(fh.read(n))  # type: ignore[attr-defined]
    finally:
        for fh in handles.values():
            fh.close()  # type: ignore[attr-defined]
    return "sha256:" + digest.hexdigest()
