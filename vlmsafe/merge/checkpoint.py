"""The one checkpoint reader: (sharded) safetensors and PyTorch ``.bin`` files, tensor by tensor.

Every tensor is located by a byte range in its file and read with plain ``readinto`` calls into a
fresh buffer. ``safetensors.safe_open`` would memory-map the shards instead, and every mapped page a
merge touches stays resident and counts toward the process's RSS until the file is closed: merging
two 2 GB checkpoints that way peaks near 5 GB. With plain reads, memory is released as soon as a
tensor is dropped, and a checkpoint of any size is read with a few tensors in memory.

* **safetensors**: the byte ranges come from each shard's JSON header.
* **PyTorch ``.bin``** (``pytorch_model.bin`` or shards with ``pytorch_model.bin.index.json``, as
  the original LLaVA checkpoints are published): the one place vlmsafe reads a pickle-based format.
  The pickle is read with ``torch.load(..., weights_only=True)``, which refuses anything but
  tensors and plain containers, onto the ``meta`` device: no tensor data is loaded, and torch
  records where each storage starts in the zip archive. Contiguous tensors are then read by byte
  range like safetensors; any other tensor (a strided view, a big-endian file, a torch without
  storage offsets) is read through ``torch.load(..., weights_only=True, mmap=True)``. Legacy
  (pre-zip) ``torch.save`` files are refused.

**Hashing in the same read.** With ``hash_files=True`` every file gets a running sha256 that
follows the reads: bytes read in file order are hashed as they arrive, gaps (headers, tensors read
later or never) are read and hashed when a later read skips over them, and :meth:`Checkpoint.file_hashes`
hashes whatever was never reached. A merge reads each input in storage order, so each input is read
once, not once to merge and once more to hash. The hashing runs in a thread of its own per
checkpoint (``hashlib`` releases the GIL), so it costs CPU on another core, not time on the reading
thread; a buffer passed as ``out=`` must not be reused before :attr:`Checkpoint.last_hash` (the
future of the latest read's hashing) is done.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import zipfile
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.reading import read_json, sha256_file
from vlmsafe.weights import TensorInfo, read_safetensors_header, st_dtype, torch_dtype  # noqa: F401 - re-exported

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
# Backwards-compatible names.
INDEX_NAME, SINGLE_NAME = SAFETENSORS_INDEX, SAFETENSORS_SINGLE

_BLOCK = 8 << 20


@dataclass(frozen=True)
class _Entry:
    file: Path
    start: int | None  # absolute offset of the data in ``file``; None: read through torch.load(mmap=True)
    info: TensorInfo


class _RunningHash:
    """sha256 of one file that follows the reads made from it (see the module docstring).

    Gaps are read through a handle of its own, so the hashing thread never moves the reader's file
    position.
    """

    def __init__(self, path: Path) -> None:
        self.path, self.pos, self.digest = path, 0, hashlib.sha256()
        self._f: BinaryIO | None = None

    def feed(self, lo: int, data: memoryview) -> None:
        """Account for ``data`` read at offset ``lo`` of the file."""
        if lo > self.pos:
            self._fill(lo)
        hi = lo + len(data)
        if hi > self.pos:
            self.digest.update(data[self.pos - lo :])
            self.pos = hi

    def _fill(self, upto: int) -> None:
        if self._f is None:
            self._f = open(self.path, "rb", buffering=0)  # noqa: SIM115 - closed in hexdigest()/close()
        self._f.seek(self.pos)
        while self.pos < upto:
            chunk = self._f.read(min(_BLOCK, upto - self.pos))
            if not chunk:
                raise FileFormatError(f"{self.path} shrank while it was read; do not modify inputs during a merge")
            self.digest.update(chunk)
            self.pos += len(chunk)

    def hexdigest(self) -> str:
        self._fill(self.path.stat().st_size)
        self.close()
        return self.digest.hexdigest()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Checkpoint:
    """A Hugging Face model directory (or one weight file), opened lazily; see the module docstring.

    Accepts a directory with ``model.safetensors.index.json`` / ``pytorch_model.bin.index.json``
    (sharded), a directory with one ``model.safetensors`` / ``pytorch_model.bin`` (or exactly one
    ``*.safetensors``), or the path of a ``.safetensors`` / ``.bin`` file. safetensors win when a
    directory holds both. Use as a context manager so file handles are closed.
    """

    def __init__(self, path: str | os.PathLike[str], *, role: str = "checkpoint", hash_files: bool = False) -> None:
        self.path = Path(path)
        self.role = role
        self._stack = ExitStack()
        self._files: dict[Path, BinaryIO] = {}
        self._hashes: dict[Path, _RunningHash] | None = {} if hash_files else None
        self._hash_thread = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="vlmsafe-hash")
                             if hash_files else None)
        #: Future of the latest read's hashing (None without ``hash_files``); see the module docstring.
        self.last_hash: concurrent.futures.Future[None] | None = None
        self._mmapped: dict[Path, dict[str, torch.Tensor]] = {}
        wanted = _weight_files(self.path, role)
        entries: dict[str, _Entry] = {}
        for file in sorted(set(wanted.values())) if isinstance(wanted, dict) else wanted:
            found = _bin_entries(file, role) if file.suffix == ".bin" else _st_entries(file, role)
            for name, entry in found.items():
                if not isinstance(wanted, dict) or wanted.get(name) == file:
                    entries[name] = entry
        if isinstance(wanted, dict):
            missing = sorted(set(wanted) - set(entries))
            if missing:
                raise FileFormatError(
                    f"{role} {self.path}: the index lists {len(missing)} tensors its shards lack (e.g. {missing[0]}); "
                    "re-download the checkpoint"
                )
        # Storage order (file, then byte offset): reads stream sequentially through each file.
        self._entries = dict(sorted(entries.items(), key=lambda kv: (kv[1].file, kv[1].start or 0)))
        self.weight_map = {n: e.file for n, e in self._entries.items()}

    # -- metadata --------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names in storage order (file by file)."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def info(self, name: str) -> TensorInfo:
        return self._entries[name].info

    @property
    def files(self) -> list[Path]:
        return sorted(set(self.weight_map.values()))  # tensor-less shards hold nothing to hash

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    # -- reading ---------------------------------------------------------------------------
    def get(self, name: str) -> torch.Tensor:
        """Load one tensor into memory (a fresh buffer, not a view of a memory map)."""
        info = self._entries[name].info
        return self.get_rows(name, 0, info.shape[0]) if info.shape else self._read(name, 0, info.nbytes).reshape(())

    def get_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Load rows ``start:stop`` (along dim 0) of a tensor: a contiguous byte range of the file.

        ``out`` (a uint8 tensor of at least the rows' size) is filled and viewed instead of a new buffer.
        """
        entry = self._entries[name]
        info = entry.info
        if not info.shape:
            raise InputError(f"{name} is a scalar and has no rows; read it with get({name!r})")
        stop = min(stop, info.shape[0])
        row = info.nbytes // info.shape[0] if info.shape[0] else 0
        return self._read(name, start * row, stop * row, out).reshape((stop - start, *info.shape[1:]))

    def _read(self, name: str, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
        entry = self._entries[name]
        buf = torch.empty(hi - lo, dtype=torch.uint8) if out is None else out[: hi - lo]
        if entry.start is None:
            buf.copy_(self._mmap_tensor(entry, name).reshape(-1).view(torch.uint8)[lo:hi])
        elif hi > lo:
            f = self._file(entry.file)
            f.seek(entry.start + lo)
            view = memoryview(buf.numpy())
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise FileFormatError(
                        f"{self.role} file {entry.file} is truncated (reading {name}); re-download it"
                    )
                got += n
            if self._hash_thread is not None:
                self.last_hash = self._hash_thread.submit(self._hasher(entry.file).feed, entry.start + lo, view)
        return buf.view(entry.info.dtype)

    def _file(self, file: Path) -> BinaryIO:
        f = self._files.get(file)
        if f is None:
            f = self._stack.enter_context(open(file, "rb", buffering=0))  # noqa: SIM115 - closed by the stack
            self._files[file] = f
        return f

    def _hasher(self, file: Path) -> _RunningHash:
        assert self._hashes is not None
        h = self._hashes.get(file)
        if h is None:
            h = self._hashes[file] = _RunningHash(file)
        return h

    def _mmap_tensor(self, entry: _Entry, name: str) -> torch.Tensor:
        state = self._mmapped.get(entry.file)
        if state is None:
            state = self._mmapped[entry.file] = _torch_load(entry.file, self.role, mmap=True)
        return state[name]

    # -- provenance ------------------------------------------------------------------------
    def file_hashes(self) -> dict[str, str]:
        """sha256 of every weight file and of ``config.json``.

        With ``hash_files=True`` this completes the running hashes (reading only what the reads so
        far skipped); otherwise every file is hashed from scratch.
        """
        if self._hash_thread is not None:
            out = self._hash_thread.submit(lambda: {f.name: self._hasher(f).hexdigest() for f in self.files}).result()
        else:
            out = {f.name: sha256_file(f) for f in self.files}
        cfg = self.directory / "config.json"
        if cfg.is_file():
            out[cfg.name] = sha256_file(cfg)
        return out

    def close(self) -> None:
        if self._hash_thread is not None:
            self._hash_thread.shutdown(wait=True, cancel_futures=True)
        for h in (self._hashes or {}).values():
            h.close()
        self._stack.close()
        self._files.clear()
        self._mmapped.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- locating the weight files --------------------------------------------------------------


def _weight_files(path: Path, role: str) -> dict[str, Path] | list[Path]:
    """The index's name -> file map for a sharded checkpoint, else the one weight file (as a list)."""
    if not path.exists():
        raise FileFormatError(f"{role} path {path} does not exist; pass a model directory or a weight file")
    if path.is_file():
        if path.suffix not in (".safetensors", ".bin"):
            raise FileFormatError(
                f"{role} {path} is neither a .safetensors nor a .bin file; pass a model directory or its weight file"
            )
        return [path]
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = path / index_name
        if index.is_file():
            return _read_index(path, index)
    for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
        if (path / single).is_file():
            return [path / single]
    files = sorted(path.glob("*.safetensors"))
    if len(files) != 1:
        hint = "several .safetensors files but no index" if files else "no .safetensors or pytorch_model.bin weights"
        raise FileFormatError(
            f"{role} directory {path} has {hint}; expected {SAFETENSORS_INDEX}, {BIN_INDEX}, {SAFETENSORS_SINGLE} "
            f"or {BIN_SINGLE}"
        )
    return files


def _read_index(directory: Path, index: Path) -> dict[str, Path]:
    fix = "re-download the checkpoint or re-save it with save_pretrained"
    weight_map = read_json(index, what="checkpoint index", fix=fix)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FileFormatError(f"{index}: no `weight_map` of tensor name -> file; {fix}")
    out: dict[str, Path] = {}
    for name, file in weight_map.items():
        f = directory / file
        if not f.is_file():
            raise FileFormatError(f"{index} names shard {file}, which is missing; re-download the checkpoint")
        out[name] = f
    return out


# -- safetensors ----------------------------------------------------------------------------


def read_header(file: Path, role: str = "checkpoint") -> tuple[dict[str, tuple[TensorInfo, int, int]], int]:
    """Parse and validate a safetensors header with the one validator every reader uses
    (:func:`vlmsafe.weights.read_safetensors_header`): ``{name: (info, begin, end)}`` and the data start."""
    return read_safetensors_header(file, role)


def _st_entries(file: Path, role: str) -> dict[str, _Entry]:
    header, data_start = read_header(file, role)
    return {name: _Entry(file, data_start + begin, info) for name, (info, begin, _) in header.items()}


# -- PyTorch .bin ---------------------------------------------------------------------------


def _torch_load(file: Path, role: str, *, mmap: bool) -> dict[str, torch.Tensor]:
    """``torch.load`` restricted to tensors: onto ``meta`` (no data) or memory-mapped."""
    import pickle

    if not zipfile.is_zipfile(file):
        raise FileFormatError(
            f"{role} file {file} is not a zip-format torch checkpoint (legacy torch.save before 1.6, or damaged); "
            "re-save it with a current torch or convert it to safetensors"
        )
    kwargs: dict[str, Any] = {"mmap": True} if mmap else {"map_location": "meta"}
    try:
        state = torch.load(file, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False; quote only what it refused.
        why = next((ln.strip() for ln in str(exc).splitlines() if "GLOBAL" in ln or "Unpickler error" in ln),
                   "an object that is not a tensor")
        raise FileFormatError(
            f"{role} file {file} holds objects other than tensors; vlmsafe never unpickles code ({why[:160]}), so "
            "re-save the weights alone (a state dict) or convert them to safetensors"
        ) from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise FileFormatError(
            f"{role} file {file} is not a readable torch checkpoint ({exc}); re-download it"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise FileFormatError(
            f"{role} file {file} is not a flat state dict of named tensors; save `model.state_dict()` instead"
        )
    return state


def _little_endian(file: Path) -> bool:
    with zipfile.ZipFile(file) as z:
        order = next((n for n in z.namelist() if n.endswith("/byteorder")), None)
        return order is None or z.read(order).strip() == b"little"


def _bin_entries(file: Path, role: str) -> dict[str, _Entry]:
    state = _torch_load(file, role, mmap=False)
    direct = _little_endian(file)
    out = {}
    for name, t in state.items():
        info = TensorInfo(t.dtype, tuple(t.shape))
        offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        if direct and isinstance(offset, int) and t.is_contiguous():
            start = offset + t.storage_offset() * t.element_size()
            if start + info.nbytes > file.stat().st_size:
                raise FileFormatError(f"{role} file {file} is truncated ({name}); re-download it")
            out[name] = _Entry(file, start, info)
        else:
            out[name] = _Entry(file, None, info)
    return out
