"""Which layers did VL adaptation move? Per-layer, per-module relative weight change.

Compares two checkpoints tensor by tensor, streamed from safetensors with ``safe_open`` (one
tensor pair in memory at a time, so 7B+ checkpoints fit in a laptop's RAM). LLaVA names are
mapped onto the language model's (``model.language_model.layers.N.*`` and the older
``language_model.model.layers.N.*`` -> ``model.layers.N.*``), so an aligned LLM and the LLM
inside a VLM compare directly; tensors with no counterpart (vision tower, projector) are listed
as unmatched.

The figure of merit is the relative Frobenius change ``||B - A|| / ||A||`` with ``A`` the
``before`` checkpoint. Groups (a layer, a module type, a layer x module cell) aggregate as
``sqrt(sum ||B - A||^2 / sum ||A||^2)``, i.e. the relative change of the concatenated tensors;
a layer's total covers its weight matrices (norm scales and biases are reported per module type
but left out of the total, where their all-ones norm would swamp the denominator).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from vlmsafe.errors import FileFormatError, InputError

from vlmsafe.merge.keymap import KeyMap

_KEYMAP = KeyMap()  # the merge's LLaVA -> LLM name table: one source of truth

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$")
_VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "lm_head.bias")


def canonical_name(name: str) -> str:
    """Map a VLM tensor name onto its text-only LLM name (names of other tensors pass through)."""
    return _KEYMAP.lm_name(name) or name


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


# --------------------------------------------------------------------------- reading
class SafetensorsCheckpoint:
    """Lazy reader of a safetensors checkpoint: a file, a folder with ``model.safetensors``, or a
    sharded folder with ``model.safetensors.index.json``. Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self.files = _checkpoint_files(self.path)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self.locations: dict[str, Path] = {}
        for f in self.files:
            for key in self._handle(f).keys():
                self.locations[key] = f

    def _handle(self, f: Path) -> Any:
        if f not in self._handles:
            try:
                self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt"))
            except (SafetensorError, OSError) as exc:
                raise FileFormatError(f"{f} is not a readable safetensors file ({exc}); re-save the checkpoint with save_pretrained") from None
        return self._handles[f]

    def keys(self) -> list[str]:
        return list(self.locations)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.locations[name]).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.locations[name]).get_tensor(name)

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self) -> "SafetensorsCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FileFormatError(f"{path} is not a .safetensors file; only safetensors checkpoints are read (nothing is unpickled)")
        return [path]
    if not path.is_dir():
        raise FileFormatError(f"checkpoint {path} does not exist; pass a .safetensors file or a save_pretrained folder")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise FileFormatError(f"{index} is not a valid safetensors index ({exc!r}); re-save the checkpoint") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise FileFormatError(f"{index} lists shard {missing[0].name}, which is missing; download/copy every shard")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    hint = " (it holds .bin files: convert them with save_pretrained(..., safe_serialization=True))" if any(path.glob("*.bin")) else ""
    raise FileFormatError(f"no safetensors weights in {path}{hint}")


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


def _rel(diff_sq: float, base_sq: float) -> float | None:
    return math.sqrt(diff_sq / base_sq) if base_sq > 0 else (0.0 if diff_sq == 0 else None)


def _pairs(before: SafetensorsCheckpoint, after: SafetensorsCheckpoint) -> tuple[list[tuple[str, str, str]], dict[str, list[str]]]:
    b_map: dict[str, str] = {}
    for name in before.keys():
        b_map.setdefault(canonical_name(name), name)
    a_map: dict[str, str] = {}
    for name in after.keys():
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
    """Compare two safetensors checkpoints (see the module docstring).

    Vocabulary tensors (embeddings, LM head) whose row counts differ (a VLM adds ``<image>`` and
    friends) are compared on their shared leading rows; any other shape mismatch is reported in
    ``unmatched`` with the two shapes. Raises :class:`InputError` when no tensor names match.
    """
    with SafetensorsCheckpoint(before) as ckpt_b, SafetensorsCheckpoint(after) as ckpt_a:
        pairs, unmatched = _pairs(ckpt_b, ckpt_a)
        if not pairs:
            raise InputError(
                f"no tensor of {before} matches a tensor of {after}, even after mapping LLaVA names "
                "(model.language_model.layers.N.* -> model.layers.N.*); are these checkpoints of the same model family?"
            )
        unmatched["shape_mismatch"] = []
        tensors = []
        for canon, name_b, name_a in tqdm(pairs, desc="comparing weights", unit="tensor", disable=not progress):
            tb, ta = ckpt_b.get(name_b), ckpt_a.get(name_a)
            rows = None
            if tb.shape != ta.shape:
                if canon.endswith(_VOCAB_SUFFIXES) and tb.dim() == ta.dim() and tb.shape[1:] == ta.shape[1:]:
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
                     "diff_norm": math.sqrt(diff_sq), "base_norm": math.sqrt(base_sq), "relative_change": _rel(diff_sq, base_sq)}
            if rows is not None:
                entry["rows_compared"] = rows
            tensors.append(entry)
            del tb, ta

    def aggregate(key_fn) -> dict[Any, dict[str, float]]:
        acc: dict[Any, dict[str, float]] = defaultdict(lambda: {"diff_sq": 0.0, "base_sq": 0.0, "numel": 0, "tensors": 0})
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
        return {key_name: key, "relative_change": _rel(a["diff_sq"], a["base_sq"]), "diff_norm": math.sqrt(a["diff_sq"]),
                "base_norm": math.sqrt(a["base_sq"]), "numel": int(a["numel"]), "tensors": int(a["tensors"])}

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
        "relative_change": [[_rel(by_cell[(l, m)]["diff_sq"], by_cell[(l, m)]["base_sq"]) if (l, m) in by_cell else None
                             for l in layer_ids] for m in modules],
    }
    other = [t for t in tensors if t["layer"] is None]
    config = {"before": str(before), "after": str(after), "tensors_compared": len(tensors),
              "total": row("scope", "all matched tensors", aggregate(lambda t: "all").get("all", {"diff_sq": 0, "base_sq": 0, "numel": 0, "tensors": 0}))}
    return WeightChangeReport(
        tensors=tensors,
        layers=[row("layer", l, by_layer[l]) for l in layer_ids],
        module_types=[row("module", m, by_module[m]) for m in modules],
        matrix=matrix,
        other=other,
        unmatched=unmatched,
        config=config,
    )

