"""Streaming writer of sharded safetensors checkpoints.

``safetensors.torch.save_file`` needs a whole shard in memory. Here the output plan (names, dtypes,
shapes) is known before the first tensor is computed, so each shard's header is written up front
and each tensor's bytes are appended straight from the buffer that holds them. Peak memory is a few
tensors, independent of the shard size. The files are standard safetensors (8-byte little-endian
header length, JSON header padded with spaces to 8 bytes, contiguous little-endian data).

Durability without a stall at the end: while a shard is written, the data already written is
flushed to disk in the background (``fdatasync`` every ``flush_bytes``) so the final ``fsync``
of a multi-GB output does not wait for all of it at once.

:func:`merge_card` is the merged model's ``README.md``: a Hugging Face model card whose metadata and body
carry the merge recipe (as mergekit's output does), written by the merge inside its atomic output.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vlmsafe.cards import digest_lines, display_name, render_card
from vlmsafe.errors import InternalError, VlmsafeError
from vlmsafe.merge.checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TensorInfo, st_dtype
from vlmsafe.validation import parse_size  # noqa: F401  (re-exported: the writer's shard-size rule)

#: Bytes written between background ``fdatasync`` calls.
FLUSH_BYTES = 256 << 20
#: Weight-file suffixes never copied as side files.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


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

    ``write(name, tensor)`` (or ``write_chunks`` / ``begin`` + ``write_block``) must be called once
    per planned tensor in the planned order; tensors of another dtype are cast to the planned one.
    ``close()`` checks completeness, syncs the files and writes ``model.safetensors.index.json``
    when there is more than one shard.
    """

    def __init__(
        self,
        directory: Path,
        tensors: Sequence[OutputTensor],
        *,
        max_shard_bytes: int,
        metadata: dict[str, str] | None = None,
        single_name: str = SAFETENSORS_SINGLE,
        flush_bytes: int = FLUSH_BYTES,
    ) -> None:
        if sys.byteorder != "little":  # pragma: no cover - safetensors data is little-endian
            raise VlmsafeError("big-endian hosts are not supported (safetensors data is little-endian); run the merge "
                               "on a little-endian machine such as x86-64 or ARM64")
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
        self._flush_bytes = flush_bytes
        self._unflushed = 0
        self._syncer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmsafe-fsync")
        self._syncs: list[concurrent.futures.Future[None]] = []
        self._open: list[BinaryIO] = []
        self._current: OutputTensor | None = None
        self._written = 0

    # -- tensor-level API ---------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor in one piece."""
        self.write_chunks(name, [tensor])

    def write_chunks(self, name: str, chunks: Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor as consecutive row blocks (their bytes concatenated)."""
        self.begin(name)
        for chunk in chunks:
            self.write_block(chunk)
        self.end()

    # -- block-level API (used by the pipelined merge) ----------------------------------------
    def begin(self, name: str) -> OutputTensor:
        """Start the next planned tensor; returns its plan entry."""
        if self._current is not None:
            raise InternalError(f"begin({name}) while {self._current.name} is unfinished")
        if self._pos >= len(self._order):
            raise InternalError(f"unexpected tensor {name}: all planned tensors were written")
        si, planned = self._order[self._pos]
        if planned.name != name:
            raise InternalError(f"out-of-plan write: got {name}, expected {planned.name}")
        if si != self._shard:
            self._open_shard(si)
        self._current, self._written = planned, 0
        return planned

    def write_block(self, block: torch.Tensor) -> None:
        """Append the bytes of the next row block of the current tensor."""
        planned = self._current
        assert planned is not None and self._file is not None, "write_block() outside begin()/end()"
        if block.dtype != planned.dtype:
            block = block.to(planned.dtype)
        data = block.detach().contiguous().reshape(-1).view(torch.uint8)
        self._written += data.numel()
        if self._written > planned.nbytes:
            raise InternalError(f"{planned.name}: more than the planned {planned.nbytes} bytes ({planned.shape})")
        self._file.write(memoryview(data.numpy()))
        self._unflushed += data.numel()
        if self._unflushed >= self._flush_bytes:
            self._unflushed = 0
            self._background_sync(self._file)

    def end(self) -> None:
        planned = self._current
        assert planned is not None
        if self._written != planned.nbytes:
            raise InternalError(
                f"{planned.name}: wrote {self._written} bytes, planned {planned.nbytes} ({planned.shape})"
            )
        self._current = None
        self._pos += 1

    # -- files --------------------------------------------------------------------------------
    def _background_sync(self, f: BinaryIO) -> None:
        self._syncs = [s for s in self._syncs if not s.done()] + [self._syncer.submit(os.fdatasync, f.fileno())]

    def _open_shard(self, si: int) -> None:
        if self._file is not None:
            self._background_sync(self._file)  # closed in close(), after its sync
        self._shard = si
        self._file = open(self.directory / self.filenames[si], "wb")  # noqa: SIM115 - closed in close()/abort()
        self._open.append(self._file)
        self._file.write(_header_bytes(self.shards[si], self._metadata))

    def close(self) -> None:
        """Check completeness, make every shard durable, write the index."""
        if self._pos != len(self._order):
            raise InternalError(f"only {self._pos} of {len(self._order)} planned tensors were written")
        for s in self._syncs:
            s.result()
        for f in self._open:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._open, self._file = [], None
        self._syncer.shutdown()
        if len(self.shards) > 1:
            weight_map = {t.name: self.filenames[si] for si, t in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        """Close the files without checks (the caller discards the directory)."""
        self._syncer.shutdown(wait=True, cancel_futures=True)
        for f in self._open:
            f.close()
        self._open, self._file = [], None


def copy_side_files(src: Path, dst: Path, *, skip: Iterable[str] = ()) -> list[str]:
    """Copy config, tokenizer and processor files (everything but weights) from ``src`` to ``dst``."""
    skip = set(skip)
    copied = []
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in skip or f.name.endswith(WEIGHT_SUFFIXES) or f.name.endswith(".index.json"):
            continue
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied


#: Recipe settings a card leaves out: where the output went and how it was written, not what it is.
_NOT_SETTINGS = ("vlm", "aligned", "base", "output", "overwrite", "max_shard_size", "hash_inputs")
#: What each role is, in a card.
_ROLES = {"vlm": "vision-language model (its layout, vision tower and projector are kept)",
          "aligned": "safety-aligned language model", "base": "common base model", "mask": "merge mask"}


def merge_card(recipe: dict[str, Any]) -> str:
    """The model card of a merged model from its ``vlmsafe_merge.json`` recipe: the input models (Hub ids as
    ``base_model``), the method and its settings in the metadata, and the recipe as YAML in the body (what
    ``vlmsafe merge CONFIG.yaml`` reads again), as mergekit writes its configuration into its cards."""
    import yaml

    config = dict(recipe.get("config", {}))
    inputs = recipe.get("inputs", {})
    names = {role: str(config.get(role)) for role in ("vlm", "aligned", "base") if config.get(role)}
    method = str(config.get("method", "linear"))
    settings = {k: v for k, v in config.items() if k not in _NOT_SETTINGS}
    tensors = recipe.get("tensors", {})
    settings["tensors_merged"] = tensors.get("merged")
    settings["tensors_copied"] = tensors.get("copied")
    role_digests: dict[str, Any] = {}
    for role, entry in inputs.items():
        hashes = entry.get("sha256") if isinstance(entry, dict) else None
        role_digests[role] = {
            "name": str(config.get(role)) if config.get(role) else entry.get("path"),
            "files": len(hashes) if isinstance(hashes, dict) else None,
            "sha256": (digest_lines(f"{n} {h}" for n, h in sorted(hashes.items())) if isinstance(hashes, dict)
                       else None),
        }
    recorded = all(d["sha256"] for d in role_digests.values()) and bool(role_digests)
    data = {
        "sha256": digest_lines(f"{r} {d['sha256']}" for r, d in sorted(role_digests.items())) if recorded else None,
        "description": ("no training data: the inputs are the models merged; sha256 over each input's weight and "
                        "config files (per-file hashes in vlmsafe_merge.json)" if recorded else
                        "no training data: the inputs are the models merged (file hashes not recorded: "
                        "hash_inputs was false)"),
        "inputs": role_digests,
    }
    models = "\n".join(f"* {_ROLES.get(role, role)}: `{d['name']}`" + (f" (sha256 `{d['sha256'][:16]}...`)"
                                                                    if d["sha256"] else "")
                       for role, d in role_digests.items())
    recipe_yaml = yaml.safe_dump({k: v for k, v in config.items() if k != "overwrite"}, sort_keys=False).strip()
    details = (f"This model was merged with the `{method}` method: the language model of `{names.get('vlm')}` and "
               f"`{names.get('aligned')}` were combined tensor by tensor (the aligned model's share is `weight`); "
               f"the vision tower and projector were copied unchanged.\n\n### Models Merged\n\n{models}\n\n"
               f"### Configuration\n\nThe following YAML configuration was used to produce this model "
               f"(`vlmsafe merge CONFIG.yaml` reads it):\n\n```yaml\n{recipe_yaml}\n```")
    usage = """```python
from vlmsafe.loading import load_model  # or transformers' AutoModelForImageTextToText / AutoProcessor

model, processor = load_model("THIS_FOLDER_OR_HUB_ID")
```"""
    return render_card(
        artifact="merged-model", method=method,
        title=f"{display_name(config.get('output')) or 'merged'}: a safety merge of {display_name(names.get('vlm'))}",
        summary=("A vision-language model whose language model was merged with a safety-aligned language model "
                 "by vlmsafe, to bring back the aligned model's refusals without retraining."),
        base_model=[names[r] for r in ("vlm", "aligned", "base") if r in names], relation="merge",
        library_name="transformers", pipeline_tag="image-text-to-text", tags=["merge", "safety"],
        settings=settings, data=data, sections=[("Merge Details", details), ("Usage", usage)],
    )
