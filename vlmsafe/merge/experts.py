"""Fused MoE expert tensors on one side of a merge, one tensor per expert on the other.

Qwen3-VL-MoE stores each layer's experts fused, ``...mlp.experts.gate_up_proj`` (``E`` experts, gate and up
projections concatenated, gate first) and ``...mlp.experts.down_proj``; its aligned LLM, Qwen3-MoE, is saved by
transformers one tensor per expert (``model.layers.N.mlp.experts.K.{gate,up,down}_proj.weight``, ``nn.Linear``
layout ``(out, in)``). The fused tensors come in two orientations, both of which transformers loads
(``conversion_mapping``: a checked transpose of the last two dimensions):

* transformers' in-memory layout (what ``save_pretrained`` of transformers 5 writes): ``gate_up_proj``
  ``(E, 2I, H)``, ``down_proj`` ``(E, H, I)``: per expert, the ``nn.Linear`` weights stacked;
* the released checkpoints' layout (``Qwen/Qwen3-VL-30B-A3B-*``): ``gate_up_proj`` ``(E, H, 2I)``,
  ``down_proj`` ``(E, I, H)``: the same, transposed.

:class:`FusedExpertsView` wraps the aligned (or base) checkpoint so that it *also* offers the fused names,
assembled from the per-expert tensors in the VLM's orientation, and hides the per-expert names. The merge plan
then pairs each fused VLM tensor with its fused counterpart by the ordinary key map, and every element is merged
with the LLM element it multiplies the same input with. The orientation is read from the VLM's shapes
(``gate_up_proj`` where ``2I != H``, else ``down_proj``); a VLM tensor that fits neither is left alone (the plan
then reports it as having no counterpart).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import torch

from vlmsafe.merge.checkpoint import Checkpoint, TensorInfo
from vlmsafe.merge.keymap import KeyMap

_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


class FusedExpertsView:
    """``checkpoint`` plus fused expert tensors named as the VLM names them (after the key map); see the module."""

    def __init__(self, checkpoint: Checkpoint, fused: dict[str, tuple[str, list[list[str]], bool]]):
        #: fused name -> (kind, per expert: the source names, concatenated along dim 0; transposed?)
        self._ck, self._fused = checkpoint, fused
        hidden = {n for _, sources, _ in fused.values() for group in sources for n in group}
        self._keys = [k for k in checkpoint if k not in hidden] + list(fused)
        self._infos: dict[str, TensorInfo] = {}
        for name, (_, sources, transposed) in fused.items():
            first = [checkpoint.info(n) for n in sources[0]]
            rows = sum(i.shape[0] for i in first)
            cols = first[0].shape[1]
            shape = (len(sources), cols, rows) if transposed else (len(sources), rows, cols)
            self._infos[name] = replace(first[0], shape=tuple(shape))

    def __getattr__(self, name: str) -> Any:  # path, role, files, directory, last_hash, file_hashes, close ...
        return getattr(self._ck, name)

    def __enter__(self) -> FusedExpertsView:
        return self

    def __exit__(self, *exc: object) -> None:
        self._ck.close()

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: str) -> bool:
        return name in self._infos or (name in self._ck and name in set(self._keys))

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def info(self, name: str) -> TensorInfo:
        return self._infos[name] if name in self._infos else self._ck.info(name)

    def get(self, name: str) -> torch.Tensor:
        if name not in self._fused:
            return self._ck.get(name)
        return self.get_rows(name, 0, self._infos[name].shape[0])

    def get_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        if name not in self._fused:
            return self._ck.get_rows(name, start, stop, out=out)
        _, sources, transposed = self._fused[name]
        stop = min(stop, len(sources))
        experts = []
        for group in sources[start:stop]:
            w = torch.cat([self._ck.get(n) for n in group], dim=0)
            experts.append(w.t() if transposed else w)
        stacked = torch.stack(experts) if experts else torch.empty((0, *self._infos[name].shape[1:]))
        if out is None:
            return stacked.contiguous()
        view = out[: stacked.numel() * stacked.element_size()].view(stacked.dtype).view(stacked.shape)
        view.copy_(stacked)
        return view


def fused_experts_view(vlm: Checkpoint, other: Checkpoint, keymap: KeyMap) -> Checkpoint | FusedExpertsView:
    """``other`` wrapped in a :class:`FusedExpertsView` when the VLM has fused expert tensors whose counterparts
    ``other`` stores one per expert; else ``other`` itself."""
    other_keys = set(other.keys())
    fused: dict[str, tuple[str, list[list[str]], bool]] = {}
    for name in vlm:
        lm = keymap.lm_name(name)
        m = _FUSED.match(lm or "")
        if m is None or lm in other_keys:
            continue
        prefix, kind = m["prefix"], m["kind"]
        parts = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
        sources = []
        while all(f"{prefix}.{len(sources)}.{p}.weight" in other_keys for p in parts):
            sources.append([f"{prefix}.{len(sources)}.{p}.weight" for p in parts])
        shape = tuple(vlm.info(name).shape)
        if not sources or len(shape) != 3 or shape[0] != len(sources):
            continue
        per_expert = [other.info(n).shape for n in sources[0]]
        rows, cols = sum(s[0] for s in per_expert), per_expert[0][1]
        transposed = _orientation(vlm, keymap, name, kind, shape, rows, cols)
        if transposed is not None:
            fused[lm] = (kind, sources, transposed)
    return FusedExpertsView(other, fused) if fused else other


def _orientation(vlm: Checkpoint, keymap: KeyMap, name: str, kind: str, shape: tuple, rows: int,
                 cols: int) -> bool | None:
    """Whether the VLM stores this fused tensor transposed (the released layout), None if it fits neither."""
    plain, transposed = shape[1:] == (rows, cols), shape[1:] == (cols, rows)
    if plain != transposed:
        return transposed
    if not plain:
        return None
    # square (2I == H for gate_up, I == H for down): the sibling tensor of the same layer decides
    sibling = name[: -len(kind)] + ("down_proj" if kind == "gate_up_proj" else "gate_up_proj")
    if sibling not in vlm:
        return None
    s = tuple(vlm.info(sibling).shape)[1:]
    if kind == "gate_up_proj":  # down is (H, I) plain, (I, H) transposed; H = cols, I = rows // 2
        return {(cols, rows // 2): False, (rows // 2, cols): True}.get(s) if cols != rows // 2 else None
    return {(2 * cols, rows): False, (rows, 2 * cols): True}.get(s) if rows != 2 * cols else None
