"""Safety-parameter localisation: score weights by how much they matter for safety, keep the top k%.

A mask written here (safetensors, one boolean tensor per weight) confines a merge to the selected
entries (``vlmsafe merge ... --mask FILE``): there the weights move toward the aligned LLM, everywhere
else the VLM's weights, and with them its multimodal skill, are kept.

Scores (higher = more safety-relevant):

* :func:`weight_difference_scores` -- ``|W_aligned - W_vlm|``: how far VL adaptation moved each
  weight away from the safety-aligned LLM. SOMF / SIL-style methods find that the safety loss
  sits in a small fraction (~20%) of the changed parameters; the most-changed entries are the
  cheap, data-free proxy for them.
* :func:`wanda_scores` -- ``|W_ij| * ||X_j||_2``: Wanda's pruning score as Antidote uses it, where
  ``||X_j||`` is the L2 norm of input feature ``j`` of the linear layer over all tokens of a set of
  harmful prompts (and answers). It measures how much each weight contributes to the layer's
  output *on harmful inputs*; :func:`collect_input_norms` gathers the norms with forward
  pre-hooks on ``nn.Linear`` modules.
* :func:`magnitude_scores` -- ``|W|``: Antidote's fallback when no prompts are given.

:func:`topk_mask` keeps the top fraction per output row (``scope="row"``, Wanda/Antidote) or per
tensor (``scope="tensor"``). Mask names are stored in the LLM's naming (``model.layers.N.*``) so
one mask fits both LLaVA checkpoint layouts and the aligned LLM.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from vlmsafe.errors import InputError
from vlmsafe.inputs import check_file_name
from vlmsafe.io import atomic_path, check_output
from vlmsafe.merge.checkpoint import Checkpoint
from vlmsafe.merge.keymap import DECODER_LAYERS, KeyMap, canonical_name
from vlmsafe.merge.plan import check_roles
from vlmsafe.merge.writer import OutputTensor, ShardedWriter
from vlmsafe.validation import check_float

Scope = Literal["row", "tensor"]

#: Default parameter selection: the weights of the decoder layers (in every layout of :mod:`~vlmsafe.merge.keymap`).
DEFAULT_INCLUDE = DECODER_LAYERS + r".*\.weight$"


def _selected(name: str, include: str | None) -> bool:
    return include is None or re.search(include, name) is not None


# -- scores --------------------------------------------------------------------------------


def weight_difference_scores(
    vlm: str | os.PathLike[str],
    aligned: str | os.PathLike[str],
    *,
    include: str | None = DEFAULT_INCLUDE,
    keymap: KeyMap | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(vlm_name, |W_aligned - W_vlm|)`` tensor by tensor, streaming both checkpoints.

    Only VLM tensors whose name matches ``include`` and that have a same-shape counterpart are scored.
    """
    km = keymap or KeyMap()
    with Checkpoint(vlm, role="VLM") as v, Checkpoint(aligned, role="aligned model") as a:
        check_roles(v, a, km)
        keys = set(a.keys())
        for name in v:
            if not _selected(name, include) or not v.info(name).dtype.is_floating_point:
                continue
            other = km.find(name, keys)
            if other is None or a.info(other).shape != v.info(name).shape:
                continue
            yield name, (a.get(other).float() - v.get(name).float()).abs_()


def magnitude_scores(model: nn.Module, *, include: str | None = DEFAULT_INCLUDE) -> dict[str, torch.Tensor]:
    """``|W|`` for every selected parameter."""
    return {n: p.detach().float().abs() for n, p in model.named_parameters() if _selected(n, include)}


@torch.no_grad()
def collect_input_norms(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any] | torch.Tensor],
    *,
    include: str | None = DECODER_LAYERS,
) -> dict[str, torch.Tensor]:
    """L2 norm of every input feature of the selected ``nn.Linear`` modules over all tokens seen.

    ``batches`` are model inputs: dicts of keyword arguments (``input_ids``, ``attention_mask``,
    ``pixel_values`` ...) or bare ``input_ids`` tensors, e.g. tokenized harmful prompts with
    their answers. Returns ``{module_name: norm of shape [in_features]}``. Padding tokens count
    too, so batch prompts of similar length or use batch size 1.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).float()
            acc = sums.get(name)
            sq = x.pow(2).sum(dim=0)
            sums[name] = sq if acc is None else acc + sq
            counts[name] = counts.get(name, 0) + x.shape[0]

        return hook

    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and _selected(name, include):
            hooks.append(module.register_forward_pre_hook(make_hook(name)))
    if not hooks:
        raise InputError(f"no nn.Linear module matches include={include!r}; loosen the pattern.")
    was_training = model.training
    model.eval()
    try:
        n = 0
        for batch in batches:
            if isinstance(batch, torch.Tensor):
                model(input_ids=batch)
            else:
                model(**batch)
            n += 1
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if n == 0:
        raise InputError("collect_input_norms got no batches; pass tokenized harmful prompts.")
    return {k: v.sqrt() for k, v in sums.items()}


def wanda_scores(model: nn.Module, norms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``|W| * ||X_j||`` (broadcast over output rows) for every module in ``norms``."""
    modules = dict(model.named_modules())
    out = {}
    for name, norm in norms.items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise InputError(f"{name} is not an nn.Linear of this model; collect the norms on the same model.")
        if norm.shape != (module.in_features,):
            raise InputError(f"norm for {name} has shape {tuple(norm.shape)}, expected ({module.in_features},).")
        out[f"{name}.weight"] = module.weight.detach().float().abs() * norm.to(torch.float32)[None, :]
    return out


# -- masks ---------------------------------------------------------------------------------


def topk_mask(score: torch.Tensor, fraction: float, *, scope: Scope = "row") -> torch.Tensor:
    """Boolean mask of the top ``fraction`` of ``score`` per output row (``row``) or per tensor.

    Exactly ``round(fraction * n)`` entries are selected per row / tensor (ties broken by index).
    """
    check_float(fraction, "fraction", low=0.0, high=1.0)
    if scope not in ("row", "tensor"):
        raise InputError(f"scope must be 'row' or 'tensor', got {scope!r}.")
    rows = score.reshape(score.shape[0], -1) if (scope == "row" and score.dim() >= 2) else score.reshape(1, -1)
    k = round(fraction * rows.shape[1])
    mask = torch.zeros(rows.shape, dtype=torch.bool)
    if k > 0:
        idx = torch.topk(rows.float(), k, dim=1, sorted=False).indices
        mask.scatter_(1, idx, True)
    return mask.reshape(score.shape)


def build_masks(
    scores: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    fraction: float,
    *,
    scope: Scope = "row",
    keymap: KeyMap | None = None,
) -> dict[str, torch.Tensor]:
    """Top-``fraction`` masks for every scored tensor, keyed by :func:`canonical_name`."""
    items = scores.items() if isinstance(scores, Mapping) else scores
    return {canonical_name(n, keymap): topk_mask(s, fraction, scope=scope) for n, s in items}


def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *,
               metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> Path:
    """Write masks to a safetensors file atomically (an existing file only with ``overwrite=True``)."""
    from safetensors.torch import save_file

    check_file_name(path, example="mask.safetensors")
    p = check_output(path, kind="file", overwrite=overwrite)
    with atomic_path(p, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in masks.items()}, str(tmp), metadata=dict(metadata or {}))
    return p


def load_masks(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a mask file written by :func:`save_masks` or :func:`weight_difference_mask`."""
    with Checkpoint(path, role="mask") as ck:
        return {k: ck.get(k) for k in ck}


def weight_difference_mask(
    vlm: str | os.PathLike[str],
    aligned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    fraction: float = 0.2,
    scope: Scope = "row",
    include: str | None = DEFAULT_INCLUDE,
    progress: bool = False,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Stream both checkpoints and write the top-``fraction`` weight-difference mask to ``out``.

    Memory stays at a few tensors: each mask is written as soon as it is computed. An existing
    ``out`` is refused before any work unless ``overwrite=True``. Returns a small summary (tensors,
    selected fraction).
    """
    from tqdm.auto import tqdm

    check_float(fraction, "fraction", low=0.0, high=1.0, low_open=True)
    if include is not None:
        try:
            re.compile(include)
        except re.error as exc:
            raise InputError(f"include pattern {include!r} is not a valid regex ({exc}); fix the pattern") from None
    check_file_name(out, example="mask.safetensors")
    outp = check_output(out, kind="file", overwrite=overwrite, option="`out`",
                        inputs=(("`vlm`", vlm), ("`aligned`", aligned)))
    km = KeyMap()
    with Checkpoint(vlm, role="VLM") as v, Checkpoint(aligned, role="aligned model") as a:
        check_roles(v, a, km)
        keys = set(a.keys())
        plan = [
            OutputTensor(canonical_name(n, km), torch.bool, v.info(n).shape)
            for n in v
            if _selected(n, include)
            and v.info(n).dtype.is_floating_point
            and (o := km.find(n, keys)) is not None
            and a.info(o).shape == v.info(n).shape
        ]
    if not plan:
        raise InputError(f"no tensor of {vlm} matches include={include!r} with a same-shape counterpart in {aligned}.")
    selected = total = 0
    with atomic_path(outp, overwrite=overwrite) as tmp:
        writer = ShardedWriter(tmp.parent, plan, max_shard_bytes=1 << 62, single_name=tmp.name,
                               metadata={"score": "weight_difference", "fraction": str(fraction), "scope": scope})
        try:
            it = weight_difference_scores(vlm, aligned, include=include, keymap=km)
            for (_, score), planned in tqdm(zip(it, plan), total=len(plan), desc="scoring", disable=not progress):
                m = topk_mask(score, fraction, scope=scope)
                writer.write(planned.name, m)
                selected += int(m.sum())
                total += m.numel()
            writer.close()
        finally:
            writer.abort()
    return {"path": str(outp), "tensors": len(plan), "selected_fraction": selected / max(total, 1)}
