"""Which layers did VL adaptation move? Per-layer, per-module relative weight change.

Compares two checkpoints tensor by tensor through vlmsafe's one checkpoint reader
(:class:`vlmsafe.merge.Checkpoint`: safetensors or PyTorch ``.bin``, sharded or not, one tensor
pair in memory at a time, so 7B+ checkpoints fit in a laptop's RAM). Names are mapped onto the
language model's with the merge's layout table (:func:`vlmsafe.merge.canonical_name`:
``model.language_model.layers.N.*``, ``language_model.model.layers.N.*`` and the original LLaVA
``model.layers.N.*`` -> ``model.layers.N.*``), so an aligned LLM and the LLM inside a VLM compare
directly; tensors with no counterpart (vision tower, projector) are listed as unmatched. Stored
buffers (rotary ``inv_freq``, ``position_ids``) are not weights and are left out.

The figure of merit is the relative Frobenius change ``||B - A|| / ||A||`` with ``A`` the
``before`` checkpoint. Groups (a layer, a module type, a layer x module cell) aggregate as
``sqrt(sum ||B - A||^2 / sum ||A||^2)``, i.e. the relative change of the concatenated tensors;
a layer's total covers its weight matrices (norm scales and biases are reported per module type
but left out of the total, where their all-ones norm would swamp the denominator).
"""

from __future__ import annotations

import math
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from vlmsafe.errors import InputError
from vlmsafe.merge import Checkpoint, canonical_name, is_buffer, is_vocab_tensor

__all__ = ["WeightChangeReport", "canonical_name", "classify", "weight_change"]

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$")


def classify(name: str) -> tuple[int | None, str]:
    """``(layer index or None, module type)`` of a canonical tensor name.

    >>> classify("model.layers.3.self_attn.q_proj.weight")
    (3, 'self_attn.q_proj')
    >>> classify("model.embed_tokens.weight")
    (None, 'embed_tokens')
    """
    m = _LAYER_RE.match(name)
    if m:
        return int(m.group(1)), m.group(2)
    base = re.sub(r"\.(weight|bias)$", "", name)
    if base.startswith("model.") and base.count(".") == 1:
        base = base[len("model.") :]
    return None, {"norm": "final_norm"}.get(base, base)


# --------------------------------------------------------------------------- comparison
@dataclass
class WeightChangeReport:
    """Relative weight change ``||after - before|| / ||before||`` per tensor, layer and module type."""

    tensors: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    module_types: list[dict[str, Any]]
    matrix: dict[str, Any]
    other: list[dict[str, Any]]
    unmatched: dict[str, list[str]]
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "analysis": "weights",
            "config": self.config,
            "layers": self.layers,
            "module_types": self.module_types,
            "matrix": self.matrix,
            "other": self.other,
            "tensors": self.tensors,
            "unmatched": self.unmatched,
        }


def _zero() -> dict[str, float]:
    return {"diff_sq": 0.0, "base_sq": 0.0, "numel": 0, "tensors": 0}


def _rel(diff_sq: float, base_sq: float) -> float | None:
    return math.sqrt(diff_sq / base_sq) if base_sq > 0 else (0.0 if diff_sq == 0 else None)


def _pairs(before: Checkpoint, after: Checkpoint) -> tuple[list[tuple[str, str, str]], dict[str, list[str]]]:
    b_map: dict[str, str] = {}
    for name in before:
        if not is_buffer(name):
            b_map.setdefault(canonical_name(name), name)
    a_map: dict[str, str] = {}
    for name in after:
        if not is_buffer(name):
            a_map.setdefault(canonical_name(name), name)
    common = sorted(set(b_map) & set(a_map), key=_sort_key)
    unmatched = {
        "before": sorted(b_map[c] for c in set(b_map) - set(a_map)),
        "after": sorted(a_map[c] for c in set(a_map) - set(b_map)),
    }
    return [(c, b_map[c], a_map[c]) for c in common], unmatched


def _sort_key(name: str) -> tuple:
    layer, module = classify(name)
    return (layer if layer is not None else 10**9, module, name)


@torch.no_grad()
def weight_change(
    before: str | os.PathLike[str],
    after: str | os.PathLike[str],
    *,
    progress: bool = True,
) -> WeightChangeReport:
    """Compare two checkpoints (see the module docstring).

    Vocabulary tensors (embeddings, LM head) whose row counts differ (a VLM adds ``<image>`` and
    friends) are compared on their shared leading rows; any other shape mismatch is reported in
    ``unmatched`` with the two shapes. Raises :class:`InputError` when no tensor names match.
    """
    with Checkpoint(before, role="before checkpoint") as ckpt_b, Checkpoint(after, role="after checkpoint") as ckpt_a:
        pairs, unmatched = _pairs(ckpt_b, ckpt_a)
        if not pairs:
            raise InputError(
                f"no tensor of {before} matches a tensor of {after}, even after mapping LLaVA names "
                "(model.language_model.layers.N.* -> model.layers.N.*); are these checkpoints of the same model "
                "family?"
            )
        unmatched["shape_mismatch"] = []
        tensors = []
        for canon, name_b, name_a in tqdm(pairs, desc="comparing weights", unit="tensor", disable=not progress):
            tb, ta = ckpt_b.get(name_b), ckpt_a.get(name_a)
            rows = None
            if tb.shape != ta.shape:
                if is_vocab_tensor(canon) and tb.dim() == ta.dim() and tb.shape[1:] == ta.shape[1:]:
                    rows = min(tb.shape[0], ta.shape[0])
                    tb, ta = tb[:rows], ta[:rows]
                else:
                    unmatched["shape_mismatch"].append(f"{canon}: {tuple(tb.shape)} vs {tuple(ta.shape)}")
                    continue
            if not (tb.is_floating_point() and ta.is_floating_point()):
                continue
            tb, ta = tb.float(), ta.float()
            diff_sq = float(torch.linalg.vector_norm(ta - tb) ** 2)
            base_sq = float(torch.linalg.vector_norm(tb) ** 2)
            layer, module = classify(canon)
            entry = {"name": canon, "layer": layer, "module": module, "ndim": tb.dim(), "numel": int(tb.numel()),
                     "diff_norm": math.sqrt(diff_sq), "base_norm": math.sqrt(base_sq),
                     "relative_change": _rel(diff_sq, base_sq)}
            if rows is not None:
                entry["rows_compared"] = rows
            tensors.append(entry)
            del tb, ta

    def aggregate(key_fn) -> dict[Any, dict[str, float]]:
        acc: dict[Any, dict[str, float]] = defaultdict(_zero)
        for t in tensors:
            key = key_fn(t)
            if key is None:
                continue
            a = acc[key]
            a["diff_sq"] += t["diff_norm"] ** 2
            a["base_sq"] += t["base_norm"] ** 2
            a["numel"] += t["numel"]
            a["tensors"] += 1
        return acc

    def row(key_name: str, key: Any, a: dict[str, float]) -> dict[str, Any]:
        return {key_name: key, "relative_change": _rel(a["diff_sq"], a["base_sq"]),
                "diff_norm": math.sqrt(a["diff_sq"]), "base_norm": math.sqrt(a["base_sq"]), "numel": int(a["numel"]),
                "tensors": int(a["tensors"])}

    # Layer totals cover the weight matrices only: a norm's scale vector (~1s) has a norm comparable
    # to a whole projection matrix at small init, so it would dominate the denominator.
    by_layer = aggregate(lambda t: t["layer"] if t["ndim"] >= 2 else None)
    by_module = aggregate(lambda t: t["module"] if t["layer"] is not None else None)
    by_cell = aggregate(lambda t: (t["layer"], t["module"]) if t["layer"] is not None else None)
    layer_ids = sorted(by_layer)
    modules = sorted(by_module)
    matrix = {
        "layers": layer_ids,
        "modules": modules,
        "relative_change": [
            [_rel(by_cell[(l, m)]["diff_sq"], by_cell[(l, m)]["base_sq"]) if (l, m) in by_cell else None
             for l in layer_ids]
            for m in modules
        ],
    }
    other = [t for t in tensors if t["layer"] is None]
    config = {"before": str(before), "after": str(after), "tensors_compared": len(tensors),
              "total": row("scope", "all matched tensors", aggregate(lambda t: "all").get("all", _zero()))}
    return WeightChangeReport(
        tensors=tensors,
        layers=[row("layer", l, by_layer[l]) for l in layer_ids],
        module_types=[row("module", m, by_module[m]) for m in modules],
        matrix=matrix,
        other=other,
        unmatched=unmatched,
        config=config,
    )

