"""Streaming checkpoint merge: VLM + aligned LLM -> a new VLM checkpoint, at the speed of the disk.

1. **Plan** from the headers only (:mod:`vlmsafe.merge.plan`): nothing is read or written for a
   merge that cannot succeed, and an existing output is refused before any work unless
   ``overwrite`` (:func:`vlmsafe.io.check_output`).
2. **Stream** in three overlapping threads (:mod:`vlmsafe.merge.pipeline`): a reader loads row
   blocks of the VLM tensor and its counterparts into reused buffers (each input is hashed in the
   same read, by a thread of its own: :class:`~vlmsafe.merge.checkpoint.Checkpoint`), the calling
   thread merges them, a writer appends the result to the output shard
   (:class:`~vlmsafe.merge.writer.ShardedWriter`) and returns the buffers once written and hashed.
   Copied tensors (vision tower, projector, buffers) go from the read buffer to the file unchanged.
   A linear merge of same-dtype inputs runs as one ``torch.lerp`` in the inputs' dtype (computed in
   float32 internally, rounded once) straight into the output buffer; other methods compute in
   float32 and are cast once when written. Memory is a fixed pool of buffers, not the model size.

The output is written into a temporary directory next to the destination and renamed onto it only
when complete (:func:`vlmsafe.io.atomic_path`): a crash or ``kill -9`` leaves the destination as it
was. The output holds the shards, the index, the VLM's config / tokenizer / processor files and
``vlmsafe_merge.json``: the recipe, per-tensor decisions and sha256 of every input file.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import logging
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmsafe.cards import write_card
from vlmsafe.errors import InputError
from vlmsafe.io import atomic_path, check_output
from vlmsafe.merge.checkpoint import Checkpoint
from vlmsafe.merge.config import MergeConfig
from vlmsafe.merge.experts import fused_experts_view
from vlmsafe.merge.keymap import KeyMap
from vlmsafe.merge.methods import PairMethod, apply_mask, merge_pair
from vlmsafe.merge.pipeline import BufferPool, run_pipeline
from vlmsafe.merge.plan import BUFFER_REASON, PASSTHROUGH_PREFIX, MergePlan, PlanItem, plan_merge
from vlmsafe.merge.writer import ShardedWriter, copy_side_files, merge_card
from vlmsafe.reading import read_json

__all__ = ["CHUNK_ELEMENTS", "RECIPE_NAME", "MergeResult", "merge_checkpoints", "plan_merge"]

logger = logging.getLogger(__name__)

RECIPE_NAME = "vlmsafe_merge.json"

#: Methods whose result at an entry depends only on the inputs at that entry: merged in row blocks.
_ELEMENTWISE = frozenset({"linear", "task_arithmetic"})
#: Elements per row block (8 MiB of float16, 16 MiB of float32).
CHUNK_ELEMENTS = 4 << 20
#: Reused read buffers (each CHUNK_ELEMENTS float32 elements; only the bytes a block uses become resident).
READ_BUFFERS = 16
#: Reused output buffers for merges computed in the output dtype.
OUT_BUFFERS = 4
#: Bytes of larger-than-block tensors in flight (whole-tensor methods: TIES, DARE, SLERP).
OVERSIZE_BUDGET = 1 << 30


@dataclass
class MergeResult:
    """What :func:`merge_checkpoints` did."""

    output: Path
    recipe: dict[str, Any]
    seconds: float

    @property
    def num_merged(self) -> int:
        return int(self.recipe["tensors"]["merged"])

    @property
    def num_copied(self) -> int:
        return int(self.recipe["tensors"]["copied"])

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the merged model (with its card) to the Hub repository ``repo_id``: see
        :func:`vlmsafe.cards.push_to_hub` for ``kwargs``."""
        from vlmsafe.cards import CHECKPOINT_PATTERNS, push_to_hub

        return push_to_hub(self.output, repo_id, patterns=CHECKPOINT_PATTERNS, **kwargs)


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF


def _row_blocks(shape: tuple[int, ...], split_at: int | None) -> list[tuple[int, int]]:
    """Row ranges of at most CHUNK_ELEMENTS elements that never straddle row ``split_at``."""
    rows = shape[0]
    per_row = max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, CHUNK_ELEMENTS // per_row)
    cuts = sorted({0, rows, *range(0, rows, step), *([split_at] if split_at else [])})
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


@dataclass
class _Block:
    """Rows ``lo:hi`` of one output tensor with its inputs, as it travels through the pipeline."""

    item: PlanItem
    lo: int
    hi: int
    first: bool
    last: bool
    v: torch.Tensor
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    m: torch.Tensor | None = None
    inputs: list[torch.Tensor] = field(default_factory=list)  # pooled read buffers
    hashing: list[concurrent.futures.Future[None]] = field(default_factory=list)  # the inputs' hashing
    out: torch.Tensor | None = None
    out_buffers: list[torch.Tensor] = field(default_factory=list)  # pooled output buffers


class _Merger:
    """The three pipeline stages of one merge (see the module docstring)."""

    def __init__(self, cfg: MergeConfig, cks: dict[str, Checkpoint], writer: ShardedWriter,
                 on_written: Callable[[int], None]) -> None:
        self.cfg, self.cks, self.writer, self.on_written = cfg, cks, writer, on_written
        self.method = PairMethod(cfg.method, cfg.convention, cfg.normalize)  # the merge's global settings
        nbytes = CHUNK_ELEMENTS * 4
        self.reads = BufferPool(READ_BUFFERS, nbytes, oversize_budget=OVERSIZE_BUDGET)
        self.outs = BufferPool(OUT_BUFFERS, nbytes, oversize_budget=OVERSIZE_BUDGET)
        self.stop = threading.Event()
        self._hashing: list[concurrent.futures.Future[None]] = []

    # -- reader thread ------------------------------------------------------------------------
    def blocks(self, plan: MergePlan) -> Iterator[_Block]:
        cfg = self.cfg
        vlm, aligned, base, mask = (self.cks.get(r) for r in ("vlm", "aligned", "base", "mask"))
        for item in plan.items:
            shape = item.out.shape
            elementwise = item.action == "copy" or cfg.method in _ELEMENTWISE
            blocks = _row_blocks(shape, item.rows) if (shape and elementwise) else []
            blocks = blocks or [(0, shape[0] if shape else 0)]  # whole tensor (or zero rows)
            whole_mask = None
            if item.mask is not None:
                assert mask is not None
                if not (len(blocks) > 1 and mask.info(item.mask).shape == shape):
                    whole_mask = mask.get(item.mask)
            for i, (lo, hi) in enumerate(blocks):
                self._hashing = []
                blk = _Block(item, lo, hi, i == 0, i == len(blocks) - 1, v=self._rows(vlm, item.name, lo, hi, None),
                             hashing=self._hashing)
                blk.inputs.append(blk.v)
                if item.action == "copy" or (item.rows is not None and lo >= item.rows):
                    yield blk  # pass-through, or VLM-only vocabulary rows
                    continue
                blk.a = self._rows(aligned, item.aligned, lo, hi, blk.inputs)
                if base is not None and item.base is not None:
                    blk.b = self._rows(base, item.base, lo, hi, blk.inputs)
                if item.mask is not None:
                    m = whole_mask
                    if m is None:
                        m = self._rows(mask, item.mask, lo, hi, blk.inputs)
                    elif len(blocks) > 1 and m.dim() == len(shape) and m.shape[0] == shape[0]:
                        m = m[lo:hi]
                    blk.m = m
                yield blk

    def _rows(self, ck: Checkpoint | None, name: str | None, lo: int, hi: int,
              held: list[torch.Tensor] | None) -> torch.Tensor:
        assert ck is not None and name is not None
        info = ck.info(name)
        if not info.shape:
            return ck.get(name)
        hi = min(hi, info.shape[0])
        buf = self.reads.take((hi - lo) * (info.nbytes // max(info.shape[0], 1)), self.stop)
        if held is not None:
            held.append(buf)
        out = ck.get_rows(name, lo, hi, out=buf)
        if ck.last_hash is not None:
            self._hashing.append(ck.last_hash)
        return out

    # -- calling thread -----------------------------------------------------------------------
    def compute(self, blk: _Block) -> _Block:
        if blk.a is None:
            blk.out = blk.v  # copied: written from the read buffer
            return blk
        cfg, item = self.cfg, blk.item
        v, a, b = blk.v, blk.a, blk.b
        out_dtype = item.out.dtype
        if cfg.method == "linear" and b is None and blk.m is None and v.dtype == a.dtype == out_dtype:
            buf = self.outs.take(v.numel() * v.element_size(), self.stop)
            blk.out_buffers.append(buf)
            blk.out = torch.lerp(v, a, item.weight, out=buf.view(v.dtype).view(v.shape))
        else:
            kwargs = dict(weight=item.weight, density=item.density, seed=_seed_for(cfg.seed, item.name))
            if item.rows is not None and blk.hi > item.rows:  # whole-tensor method with vocabulary reconciliation
                r = item.rows
                merged = v.to(torch.float64 if v.dtype == torch.float64 else torch.float32, copy=True)
                merged[:r] = merge_pair(self.method, v[:r], a[:r], base=None if b is None else b[:r], **kwargs)
            else:
                merged = merge_pair(self.method, v, a, base=b, **kwargs)
            if blk.m is not None:
                merged = apply_mask(v, merged, blk.m)
            blk.out = merged
        blk.v, blk.a, blk.b, blk.m = blk.out, None, None, None  # the inputs go back to the pool once written
        return blk

    # -- writer thread ------------------------------------------------------------------------
    def write(self, blk: _Block) -> None:
        assert blk.out is not None
        if blk.first:
            self.writer.begin(blk.item.name)
        self.writer.write_block(blk.out)
        if blk.last:
            self.writer.end()
        self.on_written(blk.out.numel() * blk.item.out.dtype.itemsize)
        for h in blk.hashing:  # a read buffer is reused only once its bytes are hashed
            h.result()
        self.reads.give(blk.inputs)
        self.outs.give(blk.out_buffers)


def _check_paths(cfg: MergeConfig) -> None:
    inputs = (("`vlm`", cfg.vlm), ("`aligned`", cfg.aligned), ("`base`", cfg.base), ("`mask`", cfg.mask))
    check_output(cfg.output, kind="dir", overwrite=cfg.overwrite, option="`output`", inputs=inputs)
    # Temporaries of killed merges are removed by atomic_path; any left here belong to a live process.
    busy = sorted(cfg.output.parent.glob(f".{cfg.output.name}.*.tmp")) if cfg.output.parent.is_dir() else []
    if busy:
        logger.warning("temporary directories for the same output exist (another merge may be writing it): %s",
                       ", ".join(map(str, busy)))


def merge_checkpoints(cfg: MergeConfig, *, progress: bool = True) -> MergeResult:
    """Merge ``cfg.vlm``'s language model with ``cfg.aligned`` into ``cfg.output`` (see module doc)."""
    from tqdm.auto import tqdm

    if not isinstance(cfg, MergeConfig):  # a dict or a YAML path would fail deep inside as an AttributeError
        raise InputError(f"`cfg` must be a MergeConfig (MergeConfig.from_dict(...) or MergeConfig.from_yaml(PATH)), "
                         f"got {type(cfg).__name__}")
    start = time.perf_counter()
    _check_paths(cfg)
    with ExitStack() as stack:
        roles = {"vlm": cfg.vlm, "aligned": cfg.aligned, "base": cfg.base, "mask": cfg.mask}
        names = {"vlm": "VLM", "aligned": "aligned model", "base": "base model", "mask": "mask"}
        cks = {r: stack.enter_context(Checkpoint(p, role=names[r], hash_files=cfg.hash_inputs))
               for r, p in roles.items() if p is not None}
        keymap = KeyMap.for_checkpoint(cfg.vlm, cfg.key_rules)
        for role in ("aligned", "base"):  # fused MoE experts (Qwen3-VL-MoE) vs one tensor per expert (Qwen3-MoE)
            if role in cks:
                cks[role] = fused_experts_view(cks["vlm"], cks[role], keymap)
        plan = plan_merge(cfg, cks["vlm"], cks["aligned"], cks.get("base"), cks.get("mask"))

        with atomic_path(cfg.output, overwrite=cfg.overwrite) as tmp:
            tmp.mkdir()
            writer = ShardedWriter(tmp, [i.out for i in plan.items], max_shard_bytes=cfg.max_shard_bytes,
                                   metadata={"vlmsafe_merge_method": cfg.method})
            bar = stack.enter_context(tqdm(total=writer.total_bytes, unit="B", unit_scale=True,
                                           desc=f"merge ({cfg.method})", disable=not progress))
            merger = _Merger(cfg, cks, writer, bar.update)
            threads = torch.get_num_threads()
            if cfg.method in _ELEMENTWISE:
                # The pipeline's threads are the parallelism; intra-op threads on a few MB of lerp mostly
                # spin-wait (measured: a third of the merge's CPU on two cores).
                torch.set_num_threads(1)
            try:
                run_pipeline(merger.blocks(plan), merger.compute, merger.write, stop=merger.stop)
                writer.close()
            finally:
                torch.set_num_threads(threads)
                writer.abort()
            hashes = {role: ck.file_hashes() for role, ck in cks.items()} if cfg.hash_inputs else None
            copy_side_files(cks["vlm"].directory, tmp, skip={RECIPE_NAME})
            if cfg.out_dtype is not None:
                _set_config_dtype(tmp / "config.json", cfg.dtype)
            recipe = _recipe(cfg, plan, writer, hashes, cks)
            (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
            write_card(tmp, merge_card(recipe))  # after the VLM's side files: the VLM's own card is replaced
    return MergeResult(cfg.output, recipe, time.perf_counter() - start)


def _set_config_dtype(path: Path, dtype: str | None) -> None:
    if not path.is_file() or dtype is None:
        return
    name = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
    cfg = read_json(path, what="model config")
    for d in [cfg] + [v for v in cfg.values() if isinstance(v, dict)]:
        for key in ("torch_dtype", "dtype"):
            if key in d:
                d[key] = name
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def _recipe(cfg: MergeConfig, plan: MergePlan, writer: ShardedWriter, hashes: dict[str, dict[str, str]] | None,
            roles: dict[str, Checkpoint]) -> dict[str, Any]:
    import safetensors

    from vlmsafe import __version__

    copied_reasons: dict[str, int] = {}
    for i in plan.copied:
        copied_reasons[i.reason] = copied_reasons.get(i.reason, 0) + 1
    return {
        "format": "vlmsafe-merge-recipe/1",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"vlmsafe": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__},
        "config": cfg.to_json(),
        "inputs": {
            role: {"path": str(ck.path.resolve()), "sha256": (hashes or {}).get(role)} for role, ck in roles.items()
        },
        "num_layers": plan.num_layers,
        "tensors": {
            "merged": len(plan.merged),
            "copied": len(plan.copied),
            "copied_by_reason": copied_reasons,
            "passed_through": {i.name: i.reason for i in plan.copied if i.reason.startswith(PASSTHROUGH_PREFIX)},
            "buffers": [i.name for i in plan.copied if i.reason == BUFFER_REASON],
            "vocab_reconciled": {i.name: i.rows for i in plan.merged if i.rows is not None},
            "ignored_aligned": plan.ignored_aligned,
            "per_tensor": {i.name: {"weight": i.weight, "density": i.density} for i in plan.merged},
        },
        "output": {"files": writer.filenames, "total_bytes": writer.total_bytes},
    }
