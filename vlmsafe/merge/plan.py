"""Plan a merge from the checkpoint headers alone: what happens to every tensor, and why.

No output is created for a merge that cannot succeed: every VLM tensor is mapped to its LLM
counterpart (:mod:`vlmsafe.merge.keymap`), shapes, dtypes, masks and leftovers are checked and the
per-tensor weight / density schedules are resolved before the first byte is read. All problems are
reported together in one error.

Every tensor the plan does not merge is copied from the VLM with a reason that the merge recipe
reports (``copied_by_reason``): no LLM counterpart (vision tower, projector), a buffer (rotary
``inv_freq``, ``position_ids``: derived from the config, never merged and never in need of a
counterpart), a non-floating tensor, weight 0, outside the mask, or passed through on request
(``allow_passthrough``) where a counterpart is missing or mismatched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmsafe.errors import InputError
from vlmsafe.merge.checkpoint import Checkpoint, st_dtype
from vlmsafe.merge.config import MergeConfig
from vlmsafe.merge.keymap import KeyMap, is_buffer, is_vocab_tensor, layer_index
from vlmsafe.merge.writer import OutputTensor
from vlmsafe.weights import fingerprint

_MAX_LISTED = 12
#: Reason recorded for stored buffers.
BUFFER_REASON = "buffer, not a weight (kept from the VLM)"
PASSTHROUGH_PREFIX = "passed through: "


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


def _fmt(info) -> str:
    return f"{st_dtype(info.dtype)}{list(info.shape)}"


def _compatible(
    name: str, lm: str | None, v, o, role: str, cfg: MergeConfig, problems: list[str]
) -> int | bool | None:
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
                "`vocab_rows='shared'` (config `vocab_rows: shared`) to merge the shared token rows and keep the "
                "VLM's rows for the rest"
            )
            return False
        else:
            problems.append(f"{name}: shape mismatch, VLM {_fmt(v)} vs {role} {_fmt(o)}")
            return False
    if o.dtype != v.dtype and not cfg.cast_dtype:
        problems.append(
            f"{name}: dtype mismatch, VLM {_fmt(v)} vs {role} {_fmt(o)}; pass `cast_dtype=True` (config "
            "`cast_dtype: true`) to merge in float32 and write the VLM's dtype"
        )
        return False
    return rows


def check_roles(vlm: Checkpoint, aligned: Checkpoint, keymap: KeyMap) -> None:
    """Refuse the two mix-ups that otherwise "succeed": one model given twice (every tensor merged with
    itself, the vision tower included: a copy presented as a safety merge) and ``--vlm`` / ``--aligned``
    swapped (the text-only LLM as the VLM: dozens of "no counterpart" problems and a hint at
    ``--allow-passthrough``, which would write the LLM back unchanged)."""
    same = vlm.path.resolve() == aligned.path.resolve()
    stored = all(f.suffix == ".safetensors" for f in vlm.files + aligned.files)
    if not same and stored and set(vlm.keys()) == set(aligned.keys()):
        same = fingerprint(vlm.files, vlm.role) == fingerprint(aligned.files, aligned.role)
    if same:
        raise InputError(
            f"`vlm` {vlm.path} and `aligned` {aligned.path} are the same model (same weights), so the merge would "
            "change nothing; pass the safety-aligned text-only LLM the VLM was built from as `aligned`"
        )
    vision = [k for k in aligned if keymap.lm_name(k) is None and not is_buffer(k)]
    if vision and all(keymap.lm_name(k) is not None or is_buffer(k) for k in vlm):
        raise InputError(
            f"`vlm` and `aligned` look swapped: `vlm` {vlm.path} has no vision tower (a text-only LLM) while "
            f"`aligned` {aligned.path} has one ({len(vision)} tensors such as {vision[0]}); pass the VLM as `vlm` "
            "and the text-only LLM as `aligned`"
        )


def plan_merge(cfg: MergeConfig, vlm: Checkpoint, aligned: Checkpoint, base: Checkpoint | None = None,
               mask: Checkpoint | None = None) -> MergePlan:
    """Decide, from headers only, what happens to every VLM tensor; raise one clear error if anything is off."""
    for param, schedule in (("weight", cfg.weight), ("density", cfg.density)):
        for rule in schedule.rules:  # a typo in a pattern would silently merge those tensors at the default
            if not any(rule.regex.search(name) for name in vlm):
                raise InputError(f"{param} rule {rule.pattern!r} matches no tensor name of {vlm.path} (they look "
                                 f"like {next(iter(vlm.keys()), '?')}); fix the pattern")
    keymap = KeyMap.for_checkpoint(vlm.path, cfg.key_rules)
    check_roles(vlm, aligned, keymap)
    problems: list[str] = []
    items: list[PlanItem] = []
    used_aligned: set[str] = set()
    used_mask: set[str] = set()
    aligned_keys, base_keys = set(aligned.keys()), set(base.keys()) if base else set()
    mask_keys = set(mask.keys()) if mask else set()

    lm_layers = [layer_index(keymap.lm_name(k)) for k in vlm]
    num_layers = max((i for i in lm_layers if i is not None), default=-1) + 1

    for name, layer in zip(vlm.keys(), lm_layers):
        v = vlm.info(name)
        buffer = is_buffer(name)
        cast = cfg.out_dtype is not None and v.dtype.is_floating_point and not buffer
        item = PlanItem(name, OutputTensor(name, cfg.out_dtype if cast else v.dtype, v.shape), "copy")
        items.append(item)
        if buffer:
            item.reason = BUFFER_REASON
            continue
        lm = keymap.lm_name(name)
        a_name = keymap.find(name, aligned_keys)
        if a_name is None:
            if lm is None:
                item.reason = "no LLM counterpart (vision tower / projector)"
            else:
                tried = " or ".join(keymap.candidates(name))
                msg = f"{name}: language-model tensor has no counterpart in the aligned model (looked for {tried})"
                if not cfg.allow_passthrough:
                    problems.append(msg)
                item.reason = PASSTHROUGH_PREFIX + "no counterpart in the aligned model"
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
                item.reason = PASSTHROUGH_PREFIX + local[0].split(": ", 1)[1]
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

    ignored = sorted(k for k in aligned_keys - used_aligned if not is_buffer(k))  # buffers need no partner
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
            "Fix the inputs, or pass `allow_passthrough=True` (config `allow_passthrough: true`) to keep the VLM's "
            "tensor wherever there is no usable counterpart."
        )
    return MergePlan(items, num_layers, ignored_aligned=ignored, unused_mask=unused_mask)
