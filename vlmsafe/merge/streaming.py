"""Streaming checkpoint merge: VLM + aligned LLM -> a new VLM checkpoint, one tensor at a time.

The merge runs in two phases so that no output is created for a merge that cannot succeed:

1. **Plan** from the safetensors headers only: map every VLM tensor to its LLM counterpart
   (:mod:`vlmsafe.merge.keymap`), check shapes, dtypes, masks and leftovers, resolve the per-tensor
   weight / density schedules. All problems are reported together in one error.
2. **Stream**: load the VLM tensor and its counterparts, merge in float32, write the bytes into the
   output shard (:class:`~vlmsafe.merge.checkpoint.ShardedWriter`), free them. Peak memory is a
   small multiple of the largest tensor.

The output is written into a temporary directory next to the destination and renamed onto it only
when complete (:func:`vlmsafe.io.atomic_path`): a crash or ``kill -9`` leaves the destination as it
was. The output holds the shards, the index, the VLM's config / tokenizer / processor files and
``vlmsafe_merge.json``: the recipe, per-tensor decisions and sha256 of every input file.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import time
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from vlmsafe.errors import InputError
from vlmsafe.io import atomic_path
from vlmsafe.merge.checkpoint import Checkpoint, OutputTensor, ShardedWriter, copy_side_files, st_dtype
from vlmsafe.merge.config import MergeConfig
from vlmsafe.merge.keymap import KeyMap, is_vocab_tensor
from vlmsafe.merge.methods import apply_mask, merge_pair
from vlmsafe.merge.schedule import layer_index

logger = logging.getLogger(__name__)

RECIPE_NAME = "vlmsafe_merge.json"
_MAX_LISTED = 12


@dataclass
class PlanItem:
    """What happens to one output tensor."""

    name: str
    out: OutputTensor
    action: str  # "merge" | "copy"
    reason: str = ""
    aligned: str | None = None
    base: str | None = None
    mask: str | None = None
    rows: int | None = None  # vocab rows merged when reconciling vocabularies
    weight: float = 0.0
    density: float = 1.0


@dataclass
class MergePlan:
    items: list[PlanItem]
    num_layers: int
    ignored_aligned: list[str] = field(default_factory=list)
    unused_mask: list[str] = field(default_factory=list)

    @property
    def merged(self) -> list[PlanItem]:
        return [i for i in self.items if i.action == "merge"]

    @property
    def copied(self) -> list[PlanItem]:
        return [i for i in self.items if i.action == "copy"]


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


def _fmt(info) -> str:
    return f"{st_dtype(info.dtype)}{list(info.shape)}"


def _compatible(name: str, lm: str | None, v, o, role: str, cfg: MergeConfig, problems: list[str]) -> int | None | bool:
    """Check ``o`` (aligned/base tensor info) against the VLM's ``v``.

    Returns False after recording a problem, None if shapes match, or the number of shared rows
    for a vocabulary-size mismatch that ``vocab_rows: shared`` reconciles.
    """
    rows: int | None = None
    if o.shape != v.shape:
        vocab = is_vocab_tensor(lm or name) and len(v.shape) == len(o.shape) and v.shape[1:] == o.shape[1:]
        if vocab and cfg.vocab_rows == "shared":
            rows = min(v.shape[0], o.shape[0])
        elif vocab:
            problems.append(
                f"{name}: vocabulary sizes differ (VLM {v.shape[0]} rows, {role} {o.shape[0]} rows); pass "
                "--vocab-rows shared (config `vocab_rows: shared`) to merge the shared token rows and keep the "
                "VLM's rows for the rest"
            )
            return False
        else:
            problems.append(f"{name}: shape mismatch, VLM {_fmt(v)} vs {role} {_fmt(o)}")
            return False
    if o.dtype != v.dtype and not cfg.cast_dtype:
        problems.append(
            f"{name}: dtype mismatch, VLM {_fmt(v)} vs {role} {_fmt(o)}; pass --cast-dtype (config "
            "`cast_dtype: true`) to merge in float32 and write the VLM's dtype"
        )
        return False
    return rows


def plan_merge(cfg: MergeConfig, vlm: Checkpoint, aligned: Checkpoint, base: Checkpoint | None = None,
               mask: Checkpoint | None = None) -> MergePlan:
    """Decide, from headers only, what happens to every VLM tensor; raise one clear error if anything is off."""
    keymap = KeyMap(cfg.key_rules)
    problems: list[str] = []
    items: list[PlanItem] = []
    used_aligned: set[str] = set()
    used_mask: set[str] = set()
    aligned_keys, base_keys = set(aligned.keys()), set(base.keys()) if base else set()
    mask_keys = set(mask.keys()) if mask else set()

    lm_layers = [layer_index(keymap.lm_name(k)) for k in vlm.keys()]
    num_layers = max((i for i in lm_layers if i is not None), default=-1) + 1

    for name, layer in zip(vlm.keys(), lm_layers):
        v = vlm.info(name)
        out = OutputTensor(name, cfg.out_dtype if (cfg.out_dtype and v.dtype.is_floating_point) else v.dtype, v.shape)
        lm = keymap.lm_name(name)
        a_name = keymap.find(name, aligned_keys)
        item = PlanItem(name, out, "copy")
        items.append(item)
        if a_name is None:
            if lm is None:
                item.reason = "no LLM counterpart (vision tower / projector)"
            else:
                tried = " or ".join(keymap.candidates(name))
                msg = f"{name}: language-model tensor has no counterpart in the aligned model (looked for {tried})"
                if not cfg.allow_passthrough:
                    problems.append(msg)
                item.reason = "unmatched in aligned model (passed through)"
            continue
        used_aligned.add(a_name)
        if not v.dtype.is_floating_point:
            item.reason = "non-floating tensor"
            continue
        local: list[str] = []
        rows = _compatible(name, lm, v, aligned.info(a_name), "aligned", cfg, local)
        b_name = None
        if base is not None and rows is not False:
            b_name = keymap.find(name, base_keys)
            if b_name is None:
                tried = " or ".join(keymap.candidates(name))
                local.append(f"{name}: no counterpart in the base model (looked for {tried})")
            else:
                b_rows = _compatible(name, lm, v, base.info(b_name), "base", cfg, local)
                if b_rows is not False and (rows is not None or b_rows is not None):
                    rows = min(r for r in (rows, b_rows, v.shape[0]) if r is not None)
        if local:
            if cfg.allow_passthrough:
                item.reason = "passed through: " + local[0].split(": ", 1)[1]
            else:
                problems.extend(local)
            continue
        weight = cfg.weight.value(name, layer, num_layers)
        density = cfg.density.value(name, layer, num_layers)
        if not 0.0 <= density <= 1.0:
            problems.append(f"{name}: density {density} outside [0, 1]")
            continue
        if weight == 0.0 and cfg.method in ("linear", "slerp"):
            item.reason = "weight 0 (VLM kept)"
            continue
        if mask is not None:
            m_name = next((c for c in (name, lm) if c in mask_keys), None)
            if m_name is None and cfg.mask_missing == "keep":
                item.reason = "not in mask (VLM kept)"
                continue
            if m_name is not None:
                used_mask.add(m_name)
                m_shape = mask.info(m_name).shape
                try:
                    torch.broadcast_shapes(m_shape, v.shape)
                except RuntimeError:
                    problems.append(f"{name}: mask {m_name} has shape {list(m_shape)}, tensor {list(v.shape)}")
                    continue
                item.mask = m_name
        item.action, item.reason = "merge", ""
        item.aligned, item.base, item.rows = a_name, b_name, rows
        item.weight, item.density = weight, density

    ignored = sorted(aligned_keys - used_aligned)
    if ignored and not cfg.allow_passthrough:
        problems.append(
            f"{len(ignored)} aligned-model tensors match no VLM tensor (e.g. {', '.join(ignored[:3])}); the models "
            "probably differ in depth or architecture"
        )
    known = set(vlm.keys()) | {n for n in map(keymap.lm_name, vlm.keys()) if n is not None}
    unused_mask = sorted(mask_keys - used_mask)
    foreign = [m for m in unused_mask if m not in known]
    if foreign and not cfg.allow_passthrough:
        problems.append(
            f"{len(foreign)} mask entries name no VLM tensor (e.g. {', '.join(foreign[:3])}); the mask was made "
            "for another model"
        )
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise InputError(
            f"cannot merge {vlm.path} with {aligned.path}: {len(problems)} problem(s):\n  {listed}{more}\n"
            "Fix the inputs, or pass --allow-passthrough (config `allow_passthrough: true`) to keep the VLM's "
            "tensor wherever there is no usable counterpart."
        )
    return MergePlan(items, num_layers, ignored_aligned=ignored, unused_mask=unused_mask)


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF


#: Methods whose result at an entry depends only on the inputs at that entry: merged in row blocks.
_ELEMENTWISE = frozenset({"linear", "task_arithmetic"})
#: Elements per row block (32 MiB of float32 scratch).
CHUNK_ELEMENTS = 8 << 20


def _row_blocks(shape: tuple[int, ...], split_at: int | None) -> list[tuple[int, int]]:
    """Row ranges of at most CHUNK_ELEMENTS elements that never straddle row ``split_at``."""
    rows = shape[0]
    per_row = max(1, int(torch.Size(shape[1:]).numel()))
    step = max(1, CHUNK_ELEMENTS // per_row)
    cuts = sorted({0, rows, *range(0, rows, step), *([split_at] if split_at else [])})
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _merge_item(item: PlanItem, cfg: MergeConfig, vlm: Checkpoint, aligned: Checkpoint, base: Checkpoint | None,
                mask: Checkpoint | None) -> Iterator[torch.Tensor]:
    """Yield the output tensor of ``item`` as consecutive row blocks (one block unless streamable).

    Copies and element-wise methods stream in row blocks straight from the files, so memory does not
    grow with the tensor; TIES / DARE / SLERP need whole-tensor statistics and load it whole.
    """
    shape = item.out.shape
    elementwise = item.action == "copy" or cfg.method in _ELEMENTWISE
    blocks = _row_blocks(shape, item.rows) if (shape and elementwise) else [(0, shape[0] if shape else 0)]
    whole_mask = None
    if item.mask is not None:
        assert mask is not None
        m_shape = mask.info(item.mask).shape
        if not (len(blocks) > 1 and m_shape == shape):
            whole_mask = mask.get(item.mask)
    for lo, hi in blocks:
        rows = (lambda ck, n: ck.get_rows(n, lo, hi)) if shape else (lambda ck, n: ck.get(n))
        v = rows(vlm, item.name)
        if item.action == "copy" or (item.rows is not None and lo >= item.rows):
            yield v  # pass-through, or VLM-only vocabulary rows
            continue
        assert item.aligned is not None
        a = rows(aligned, item.aligned)
        b = rows(base, item.base) if (base is not None and item.base is not None) else None
        kwargs = dict(weight=item.weight, density=item.density, normalize=cfg.normalize, convention=cfg.convention,
                      seed=_seed_for(cfg.seed, item.name))
        if item.rows is not None and hi > item.rows:  # whole-tensor method with vocabulary reconciliation
            r = item.rows
            merged = v.to(torch.float64 if v.dtype == torch.float64 else torch.float32, copy=True)
            merged[:r] = merge_pair(cfg.method, v[:r], a[:r], base=None if b is None else b[:r], **kwargs)
        else:
            merged = merge_pair(cfg.method, v, a, base=b, **kwargs)
        del a, b
        if item.mask is not None:
            m = whole_mask if whole_mask is not None else mask.get_rows(item.mask, lo, hi)  # type: ignore[union-attr]
            if whole_mask is not None and len(blocks) > 1 and m.dim() == len(shape) and m.shape[0] == shape[0]:
                m = m[lo:hi]
            merged = apply_mask(v, merged, m)
        yield merged


def _hashes(cks: dict[str, Checkpoint]) -> dict[str, dict[str, str]]:
    return {role: ck.file_hashes() for role, ck in cks.items()}


def _check_output(cfg: MergeConfig) -> None:
    out = cfg.output.resolve()
    for role, p in (("vlm", cfg.vlm), ("aligned", cfg.aligned), ("base", cfg.base), ("mask", cfg.mask)):
        if p is None:
            continue
        p = p.resolve()
        if out == p or out in p.parents or p in out.parents:
            raise InputError(f"output {cfg.output} overlaps the {role} input {p}; choose another --out directory.")
    if cfg.output.exists() and not cfg.overwrite:
        raise InputError(f"output {cfg.output} already exists; pass --overwrite or choose another --out.")
    # Temporaries of killed merges are removed by atomic_path; any left here belong to a live process.
    busy = sorted(cfg.output.parent.glob(f".{cfg.output.name}.*.tmp")) if cfg.output.parent.is_dir() else []
    if busy:
        logger.warning("temporary directories for the same output exist (another merge may be writing it): %s",
                       ", ".join(map(str, busy)))


def merge_checkpoints(cfg: MergeConfig, *, progress: bool = True) -> MergeResult:
    """Merge ``cfg.vlm``'s language model with ``cfg.aligned`` into ``cfg.output`` (see module doc)."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    _check_output(cfg)
    with ExitStack() as stack:
        vlm = stack.enter_context(Checkpoint(cfg.vlm, role="VLM"))
        aligned = stack.enter_context(Checkpoint(cfg.aligned, role="aligned model"))
        base = stack.enter_context(Checkpoint(cfg.base, role="base model")) if cfg.base else None
        mask = stack.enter_context(Checkpoint(cfg.mask, role="mask file")) if cfg.mask else None
        plan = plan_merge(cfg, vlm, aligned, base, mask)

        pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(max_workers=1))
        roles = {"vlm": vlm, "aligned": aligned, **({"base": base} if base else {}), **({"mask": mask} if mask else {})}
        hashes = pool.submit(_hashes, roles) if cfg.hash_inputs else None

        with atomic_path(cfg.output, overwrite=cfg.overwrite) as tmp:
            tmp.mkdir()
            writer = ShardedWriter(tmp, [i.out for i in plan.items], max_shard_bytes=cfg.max_shard_bytes,
                                   metadata={"vlmsafe_merge_method": cfg.method})
            bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc=f"merge ({cfg.method})",
                       disable=not progress)
            try:
                for item in plan.items:
                    writer.write_chunks(item.name, _merge_item(item, cfg, vlm, aligned, base, mask))
                    bar.update(item.out.nbytes)
                writer.close()
            finally:
                writer.abort()
                bar.close()
            copy_side_files(vlm.directory, tmp, skip={RECIPE_NAME})
            if cfg.out_dtype is not None:
                _set_config_dtype(tmp / "config.json", cfg.dtype)
            recipe = _recipe(cfg, plan, writer, hashes.result() if hashes else None, roles)
            (tmp / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
    return MergeResult(cfg.output, recipe, time.perf_counter() - start)


def _set_config_dtype(path: Path, dtype: str | None) -> None:
    if not path.is_file() or dtype is None:
        return
    name = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}.get(dtype, dtype)
    cfg = json.loads(path.read_text())
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
            "passed_through": {i.name: i.reason for i in plan.copied if "pass" in i.reason},
            "vocab_reconciled": {i.name: i.rows for i in plan.merged if i.rows is not None},
            "ignored_aligned": plan.ignored_aligned,
            "per_tensor": {i.name: {"weight": i.weight, "density": i.density} for i in plan.merged},
        },
        "output": {"files": writer.filenames, "total_bytes": writer.total_bytes},
    }
