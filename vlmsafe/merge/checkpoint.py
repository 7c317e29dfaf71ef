"""Lazy reading and streaming writing of (sharded) safetensors checkpoints.

Reading parses each shard's safetensors header (dtype, shape and byte range of every tensor) and
reads one tensor at a time with ``readinto`` into a fresh buffer. ``safetensors.safe_open`` would
memory-map the shards instead, and every mapped page a merge touches stays resident and counts
toward the process's RSS until the file is closed: merging two 2 GB checkpoints that way peaks
near 5 GB. With plain reads, memory is released as soon as a tensor is dropped.

Writing streams too. ``safetensors.torch.save_file`` needs a whole shard in memory; here the
output plan (names, dtypes, shapes) is known before the first tensor is merged, so each shard's
header is computed up front and each tensor's bytes are appended as soon as it is merged. Peak
memory is then a few tensors, independent of the shard size. The files are standard safetensors
(8-byte little-endian header length, JSON header padded with spaces to 8 bytes, contiguous
little-endian data) and are read back with ``safe_open`` in the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Sequence

import torch
from vlmsafe.errors import FileFormatError, InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors dtype strings <-> torch dtypes (those torch can hold).
_ST_TO_TORCH: dict[str, torch.dtype] = {
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
_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}


def torch_dtype(st_dtype: str) -> torch.dtype:
    try:
        return _ST_TO_TORCH[st_dtype]
    except KeyError:
        raise FileFormatError(f"unsupported safetensors dtype {st_dtype!r}; convert the checkpoint to F16/BF16/F32.")


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise InputError(f"cannot write dtype {dtype} to safetensors; choose float16, bfloat16 or float32.")


@dataclass(frozen=True)
class TensorInfo:
    """Header information of one stored tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class Checkpoint:
    """A Hugging Face model directory (or a single ``.safetensors`` file), opened lazily.

    Accepts a directory with ``model.safetensors.index.json`` (sharded), a directory with one
    ``model.safetensors`` (or exactly one ``*.safetensors``), or a path to a ``.safetensors`` file.
    Use as a context manager so file handles are closed.
    """

    def __init__(self, path: str | os.PathLike[str], *, role: str = "checkpoint") -> None:
        self.path = Path(path)
        self.role = role
        files = _weight_files(self.path, role)
        self._stack = ExitStack()
        self._files: dict[Path, BinaryIO] = {}
        self._entries: dict[str, tuple[Path, int, int]] = {}  # name -> (file, start, end)
        self._info: dict[str, TensorInfo] = {}
        wanted = files if isinstance(files, dict) else None
        for file in sorted(set(files.values())) if wanted is not None else files:
            header, data_start = read_header(file, role)
            for name, (info, begin, end) in header.items():
                if wanted is not None and wanted.get(name) != file:
                    continue
                self._entries[name] = (file, data_start + begin, data_start + end)
                self._info[name] = info
        if wanted is not None:
            missing = sorted(set(wanted) - set(self._entries))
            if missing:
                raise FileFormatError(
                    f"{role} index lists {len(missing)} tensors its shards lack (e.g. {missing[0]}); re-download "
                    "the checkpoint."
                )
        # Storage order (shard, then byte offset): reads stream sequentially through each file.
        self._entries = dict(sorted(self._entries.items(), key=lambda kv: (kv[1][0], kv[1][1])))
        self.weight_map = {n: e[0] for n, e in self._entries.items()}

    # -- reading ---------------------------------------------------------------------------
    def _file(self, file: Path) -> BinaryIO:
        f = self._files.get(file)
        if f is None:
            f = self._stack.enter_context(open(file, "rb", buffering=0))
            self._files[file] = f
        return f

    def keys(self) -> list[str]:
        """Tensor names in storage order (shard by shard)."""
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor into memory (a fresh buffer, not a view of a memory map)."""
        info = self._info[name]
        return self.get_rows(name, 0, info.shape[0]) if info.shape else self._read(name, 0, info.nbytes).reshape(())

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Load rows ``start:stop`` (along dim 0) of a tensor: a contiguous byte range of the file."""
        info = self._info[name]
        if not info.shape:
            raise ValueError(f"{name} is a scalar; use get()")
        stop = min(stop, info.shape[0])
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        return self._read(name, start * row, stop * row).reshape((stop - start, *info.shape[1:]))

    def _read(self, name: str, lo: int, hi: int) -> torch.Tensor:
        file, begin, _ = self._entries[name]
        buf = torch.empty(hi - lo, dtype=torch.uint8)
        if hi > lo:
            f = self._file(file)
            f.seek(begin + lo)
            view = memoryview(buf.numpy())
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise FileFormatError(f"{self.role} shard {file} is truncated (reading {name}); re-download it.")
                got += n
        return buf.view(self._info[name].dtype)

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))  # tensor-less shards hold nothing to hash

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight file and of ``config.json`` (read in 8 MiB blocks)."""
        out = {f.name: sha256_file(f) for f in self.files}
        cfg = self.directory / "config.json"
        if cfg.is_file():
            out[cfg.name] = sha256_file(cfg)
        return out

    def close(self) -> None:
        self._stack.close()
        self._files.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sha256_file(path: Path, block: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def _weight_files(path: Path, role: str) -> dict[str, Path] | list[Path]:
    """The index's name -> shard map for a sharded checkpoint, else the one weight file (as a list)."""
    if not path.exists():
        raise FileFormatError(f"{role} path {path} does not exist; pass a model directory or .safetensors file.")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FileFormatError(
                f"{role} {path} is not a .safetensors file; only safetensors are read (never pickles). Convert "
                "with `model.save_pretrained(dir)` in transformers."
            )
        return [path]
    index = path / INDEX_NAME
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not a mapping")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FileFormatError(f"{index} is not a valid safetensors index ({exc}); re-save the checkpoint.") from exc
        out: dict[str, Path] = {}
        for name, file in wm.items():
            f = path / file
            if not f.is_file():
                raise FileFormatError(f"{index} names shard {file}, which is missing; re-download the checkpoint.")
            out[name] = f
        return out
    single = path / SINGLE_NAME
    files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        hint = "several .safetensors files but no index" if files else "no .safetensors weights"
        extra = " (found pytorch .bin weights: re-save with safetensors)" if list(path.glob("*.bin")) else ""
        raise FileFormatError(f"{role} directory {path} has {hint}{extra}; expected {INDEX_NAME} or {SINGLE_NAME}.")
    return files


def read_header(file: Path, role: str = "checkpoint") -> tuple[dict[str, tuple[TensorInfo, int, int]], int]:
    """Parse a safetensors header: ``{name: (info, begin, end)}`` (offsets into the data) and the data start."""
    bad = f"{role} file {file} is not a readable safetensors file"
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n <= 0 or n > min(size - 8, 1 << 28):
            raise FileFormatError(f"{bad} (bad header length); re-download or re-save it.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FileFormatError(f"{bad} (corrupted header: {exc}); re-download or re-save it.") from exc
    if not isinstance(header, dict):
        raise FileFormatError(f"{bad} (header is not a mapping).")
    header.pop("__metadata__", None)
    out: dict[str, tuple[TensorInfo, int, int]] = {}
    for name, entry in header.items():
        try:
            info = TensorInfo(torch_dtype(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FileFormatError(f"{bad} (bad entry for {name}: {exc}).") from exc
        if end - begin != info.nbytes or begin < 0 or 8 + n + end > size:
            raise FileFormatError(f"{bad}: tensor {name} has a bad byte range (truncated file?); re-download it.")
        out[name] = (info, begin, end)
    return out, 8 + n


# -- writing -------------------------------------------------------------------------------


def parse_size(size: int | str) -> int:
    """``"2GB"``, ``"500MB"``, ``"64KiB"`` or an int number of bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise InputError(f"cannot parse size {size!r}; write e.g. 2GB, 500MB or a number of bytes.")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return TensorInfo(self.dtype, self.shape).nbytes


def plan_shards(tensors: Sequence[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Greedy split in order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def _header_bytes(tensors: Sequence[OutputTensor], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": st_dtype(t.dtype), "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class ShardedWriter:
    """Write tensors, in plan order, into sharded safetensors files plus an index.

    ``write(name, tensor)`` must be called once per planned tensor in the planned order; the
    tensor is cast to the planned dtype and its bytes appended. ``close()`` checks completeness
    and writes ``model.safetensors.index.json`` when there is more than one shard.
    """

    def __init__(
        self,
        directory: Path,
        tensors: Sequence[OutputTensor],
        *,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        single_name: str = SINGLE_NAME,
    ) -> None:
        self.directory = Path(directory)
        self.shards = plan_shards(tensors, max_shard_bytes)
        n = len(self.shards)
        self.filenames = [single_name] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(si, t) for si, shard in enumerate(self.shards) for t in shard]
        self._pos = 0
        self._file: BinaryIO | None = None
        self._shard = -1
        self._metadata = {"format": "pt", **(metadata or {})}
        self.total_bytes = sum(t.nbytes for t in tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor in one piece."""
        self.write_chunks(name, [tensor])

    def write_chunks(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor as consecutive row blocks (their bytes concatenated)."""
        if self._pos >= len(self._order):
            raise RuntimeError(f"unexpected tensor {name}: all planned tensors were written")
        si, planned = self._order[self._pos]
        if planned.name != name:
            raise RuntimeError(f"out-of-plan write: got {name}, expected {planned.name}")
        if si != self._shard:
            self._open_shard(si)
        if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
            raise RuntimeError("big-endian hosts are not supported")
        assert self._file is not None
        written = 0
        for chunk in chunks:
            data = chunk.detach().to(planned.dtype).contiguous().reshape(-1).view(torch.uint8)
            written += data.numel()
            if written > planned.nbytes:
                break
            self._file.write(memoryview(data.numpy()))
        if written != planned.nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {planned.nbytes} ({planned.shape})")
        self._pos += 1

    def _open_shard(self, si: int) -> None:
        if self._file is not None:
            self._file.close()
        self._shard = si
        self._file = open(self.directory / self.filenames[si], "wb")
        self._file.write(_header_bytes(self.shards[si], self._metadata))

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self._pos != len(self._order):
            raise RuntimeError(f"only {self._pos} of {len(self._order)} planned tensors were written")
        if len(self.shards) > 1:
            weight_map = {t.name: self.filenames[si] for si, t in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def copy_side_files(src: Path, dst: Path, *, skip: Iterable[str] = ()) -> list[str]:
    """Copy config, tokenizer and processor files (everything but weights) from ``src`` to ``dst``."""
    import shutil

    weight_suffixes = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
    skip = set(skip)
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in skip or f.name.endswith(weight_suffixes) or f.name.endswith(".index.json"):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied
