"""Merge methods on plain tensors: linear, task arithmetic, TIES, DARE (linear / TIES), SLERP.

Every function takes in-memory tensors and returns the merged tensor in the *compute dtype*
(float32, or float64 when an input is float64); callers cast to the output dtype. The task-vector
methods reuse ``peft.utils.merge_utils`` (task arithmetic, sign election, pruning) instead of
re-implementing them, imported lazily because importing ``peft`` costs ~250 MB of RSS.

TIES and DARE come in two numerical conventions, chosen with ``convention=``:

* ``"mergekit"`` (default, what most published merges use): deltas are pruned (TIES: top-k by
  magnitude, ``k = max(1, int(density * n))``; DARE: Bernoulli keep-mask, rescaled so the L1
  norm of each delta is preserved), *weighted*, then the sign is elected on the weighted sum;
  with ``normalize=True`` the agreeing weighted deltas are divided by the sum of their weights.
  Equal to ``mergekit.merge_methods.merge_tensors`` within 1e-6 (see ``tests/test_merge_methods.py``).
* ``"peft"``: exactly ``peft.utils.merge_utils.ties`` / ``dare_linear`` / ``dare_ties``: the sign
  is elected on the *unweighted* pruned deltas, DARE rescales by ``1 / density``, and TIES divides
  the agreeing weighted deltas by their *count*. ``normalize`` does not apply.

Randomised methods (DARE) take ``seed``: the draw then runs in a forked RNG so the global torch RNG
is untouched and a streaming merge is reproducible tensor by tensor.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from vlmsafe.errors import InputError
from vlmsafe.merge.choices import METHODS

Convention = Literal["mergekit", "peft"]



def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: half precision loses too much in a sum."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _peft():
    from peft.utils import merge_utils  # lazy: see module docstring

    return merge_utils


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Run the block with a fixed torch CPU RNG seed without disturbing the caller's RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_density(density: float) -> None:
    if not 0.0 <= density <= 1.0 or math.isnan(density):
        raise InputError(f"density must be in [0, 1], got {density}; it is the fraction of each delta to keep.")


def _check_convention(convention: str) -> None:
    if convention not in ("mergekit", "peft"):
        raise InputError(f"unknown convention {convention!r}; use 'mergekit' or 'peft'.")


def _weights(weights: Sequence[float], n: int, dtype: torch.dtype) -> torch.Tensor:
    if len(weights) != n:
        raise InputError(f"got {len(weights)} weights for {n} tensors; give one weight per input tensor.")
    return torch.tensor([float(w) for w in weights], dtype=dtype)


def linear(tensors: Sequence[torch.Tensor], weights: Sequence[float], *, normalize: bool = True) -> torch.Tensor:
    """Weighted average ``sum(w_i * t_i) / sum(w_i)`` (plain weighted sum if ``normalize=False``).

    With two models and weights ``(1 - lam, lam)`` this is the LLaVA safety-merge recipe
    ``lam * LLM + (1 - lam) * LLM_in_LLaVA``.
    """
    if not tensors:
        raise InputError("linear merge needs at least one tensor.")
    dtype = compute_dtype(*tensors)
    w = _weights(weights, len(tensors), torch.float64)
    out = torch.zeros(tensors[0].shape, dtype=dtype)
    for t, wi in zip(tensors, w.tolist()):
        out.add_(t, alpha=wi)  # mixed-dtype in-place add: no float32 copy of the half-precision input
    if normalize:
        total = float(w.sum())
        if abs(total) < 1e-12:
            raise InputError("linear merge weights sum to 0; give weights with a non-zero sum or normalize=False.")
        out.div_(total)
    return out


def task_arithmetic(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float], *, scale: float = 1.0
) -> torch.Tensor:
    """``base + scale * sum(w_i * (t_i - base))`` via ``peft.utils.merge_utils.task_arithmetic``."""
    dtype = compute_dtype(base, *tensors)
    b = base.to(dtype)
    deltas = [t.to(dtype) - b for t in tensors]
    mixed = _peft().task_arithmetic(deltas, _weights(weights, len(tensors), dtype))
    return b + scale * mixed


def magnitude_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``max(1, int(density * n))`` largest-magnitude entries (mergekit's rule), zero the rest."""
    _check_density(density)
    if density >= 1.0:
        return delta
    if density <= 0.0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.argsort(flat.abs(), descending=True)[:k]
    mask = torch.zeros_like(flat)
    mask[keep] = 1
    return (flat * mask).reshape(delta.shape)


def random_prune(delta: torch.Tensor, density: float, *, rescale: Literal["l1", "density", None]) -> torch.Tensor:
    """DARE drop: keep each entry with probability ``density``; rescale by L1 ratio or ``1 / density``."""
    _check_density(density)
    if density >= 1.0:
        return delta
    mask = torch.bernoulli(torch.full_like(delta, density))
    kept = delta * mask
    if rescale == "density":
        return kept / density if density > 0 else kept
    if rescale == "l1":
        before, after = delta.abs().sum(), kept.abs().sum()
        if before < 1e-7 or after < 1e-7:
            return kept
        return kept * (before / after)
    return kept


def _consensus_merge(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: torch.Tensor,
    *,
    elect_sign: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """mergekit's generalized task arithmetic: weight, elect sign on the weighted sum, merge, normalise."""
    stacked = torch.stack(deltas, dim=0)
    del deltas
    w = weights.reshape(weights.shape + (1,) * (stacked.dim() - 1))
    stacked.mul_(w)
    if elect_sign:
        mask = _peft().calculate_majority_sign_mask(stacked, method="total").to(stacked.dtype)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    return base + scale * mixed


def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    *,
    convention: Convention = "mergekit",
    normalize: bool = True,
    scale: float = 1.0,
) -> torch.Tensor:
    """TIES: trim each task vector to its top-``density`` magnitudes, elect a sign, disjoint-merge.

    See the module docstring for how the two conventions differ.
    """
    _check_density(density)
    _check_convention(convention)
    dtype = compute_dtype(base, *tensors)
    b = base.to(dtype)
    w = _weights(weights, len(tensors), dtype)
    if convention == "peft":
        deltas = [t.to(dtype) - b for t in tensors]
        if density >= 1.0:  # peft warns and skips pruning; same result without the warning
            mu = _peft()
            stacked = torch.stack(deltas)
            mask = mu.calculate_majority_sign_mask(stacked, method="total")
            mixed = mu.disjoint_merge(stacked * mu.reshape_weight_task_tensors(stacked, w), mask)
        else:
            mixed = _peft().ties(deltas, w, density, majority_sign_method="total")
        return b + scale * mixed
    deltas = [magnitude_prune(t.to(dtype) - b, density) for t in tensors]
    return _consensus_merge(b, deltas, w, elect_sign=True, normalize=normalize, scale=scale)


def dare(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    density: float,
    *,
    elect_sign: bool = False,
    convention: Convention = "mergekit",
    normalize: bool = False,
    scale: float = 1.0,
    seed: int | None = None,
) -> torch.Tensor:
    """DARE: randomly drop ``1 - density`` of each delta and rescale, then merge with task arithmetic
    (``elect_sign=False``, :data:`dare_linear`) or with TIES sign election (``elect_sign=True``, :data:`dare_ties`).

    As in mergekit, the two published methods are one sparsification followed by one of two consensus rules.
    """
    _check_density(density)
    _check_convention(convention)
    dtype = compute_dtype(base, *tensors)
    b = base.to(dtype)
    w = _weights(weights, len(tensors), dtype)
    with _seeded(seed):
        if convention == "peft":
            deltas = [t.to(dtype) - b for t in tensors]
            mu = _peft()
            if density >= 1.0:
                return task_arithmetic(b, tensors, weights, scale=scale) if not elect_sign else ties(
                    b, tensors, weights, 1.0, convention="peft", scale=scale
                )
            fn = mu.dare_ties if elect_sign else mu.dare_linear
            return b + scale * fn(deltas, w, density)
        deltas = [random_prune(t.to(dtype) - b, density, rescale="l1") for t in tensors]
    return _consensus_merge(b, deltas, w, elect_sign=elect_sign, normalize=normalize, scale=scale)


dare_linear = functools.partial(dare, elect_sign=False)
"""DARE + task arithmetic: randomly drop ``1 - density`` of each delta, rescale, weighted sum (:func:`dare`)."""

dare_ties = functools.partial(dare, elect_sign=True)
"""DARE + TIES sign election: randomly drop and rescale each delta, then elect sign and merge (:func:`dare`)."""


def slerp(
    v0: torch.Tensor, v1: torch.Tensor, t: float, *, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t=0) to ``v1`` (t=1), treating each tensor as one vector.

    The angle comes from the normalised tensors; the coefficients are applied to the originals, so
    norms interpolate too (mergekit's convention). Nearly collinear inputs fall back to linear.
    """
    if v0.shape != v1.shape:
        raise InputError(f"slerp needs equal shapes, got {tuple(v0.shape)} and {tuple(v1.shape)}.")
    dtype = compute_dtype(v0, v1)
    a, b = v0.to(dtype), v1.to(dtype)
    af, bf = a.reshape(-1), b.reshape(-1)
    na, nb = torch.linalg.vector_norm(af), torch.linalg.vector_norm(bf)
    na = na if na > eps else torch.ones_like(na)
    nb = nb if nb > eps else torch.ones_like(nb)
    dot = float((torch.dot(af, bf) / (na * nb)).clamp(-1, 1))
    if abs(dot) > dot_threshold:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b


def apply_mask(original: torch.Tensor, merged: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Confine a merge to a mask: ``original + mask * (merged - original)``.

    A boolean mask selects the merged value where True and keeps ``original`` elsewhere; a float
    mask blends (1 = fully merged). The mask must broadcast to the tensor's shape (e.g. a per-row
    ``[out, 1]`` mask), and a non-boolean one must hold finite values in ``[0, 1]``: NaN would write
    NaN weights, and 5 would extrapolate five times past the merge.
    """
    try:
        torch.broadcast_shapes(mask.shape, merged.shape)
    except RuntimeError as exc:
        raise InputError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to tensor shape {tuple(merged.shape)}; "
            "regenerate the mask for this model."
        ) from exc
    if mask.dtype == torch.bool:
        return torch.where(mask, merged, original.to(merged.dtype))
    ok = torch.isfinite(mask) & (mask >= 0) & (mask <= 1)
    if not bool(ok.all()):
        bad = mask[~ok].flatten()[0].item()
        raise InputError(f"mask entries must be finite and in [0, 1] (1 = fully merged), found {bad}; "
                         "regenerate the mask (vlmsafe merge-mask) or clamp it")
    o = original.to(merged.dtype)
    return o + mask.to(merged.dtype) * (merged - o)


@dataclass(frozen=True)
class PairMethod:
    """How :func:`merge_pair` merges every tensor of a merge: the method and, for TIES / DARE, the numerical
    ``convention`` and ``normalize`` (see the module docstring). These are the merge's global settings, as in
    mergekit; the weight, the density and the seed are per tensor (schedules, per-tensor seeds).

    ``normalize=None`` picks mergekit's TIES normalisation only when there are two task vectors (with a single
    task vector it would cancel the weight) and no normalisation for DARE (mergekit's default).
    """

    method: str = "linear"
    convention: Convention = "mergekit"
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown merge method {self.method!r}; choose one of {', '.join(METHODS)}.")
        _check_convention(self.convention)


def merge_pair(
    method: str | PairMethod,
    vlm: torch.Tensor,
    aligned: torch.Tensor,
    *,
    weight: float,
    base: torch.Tensor | None = None,
    density: float = 1.0,
    seed: int | None = None,
) -> torch.Tensor:
    """Merge one tensor of the VL-adapted model with its counterpart in the aligned LM.

    ``method``: a method name (mergekit's convention, ``normalize=None``) or a :class:`PairMethod`.
    ``weight`` (lam) is the share of the *aligned* model: 0 keeps the VLM, 1 takes the aligned LM.

    * ``linear``: ``(1 - lam) * vlm + lam * aligned``.
    * ``slerp``: spherical interpolation from ``vlm`` to ``aligned`` at ``t = lam``.
    * task-vector methods: with no ``base``, the aligned model is the base and the only task vector
      is ``vlm - aligned`` with weight ``1 - lam`` (so at density 1 every method equals linear);
      with a ``base`` (e.g. the pre-trained LM both were tuned from), the task vectors are
      ``vlm - base`` (weight ``1 - lam``) and ``aligned - base`` (weight ``lam``).
    """
    spec = method if isinstance(method, PairMethod) else PairMethod(method)
    method, convention, normalize = spec.method, spec.convention, spec.normalize
    lam = float(weight)
    if method == "linear":
        return linear([vlm, aligned], [1.0 - lam, lam])
    if method == "slerp":
        return slerp(vlm, aligned, lam)
    if base is None:
        base_t, tensors, weights = aligned, [vlm], [1.0 - lam]
    else:
        base_t, tensors, weights = base, [vlm, aligned], [1.0 - lam, lam]
    norm = (len(tensors) > 1) if normalize is None else normalize
    if method == "task_arithmetic":
        return task_arithmetic(base_t, tensors, weights)
    if method == "ties":
        return ties(base_t, tensors, weights, density, convention=convention, normalize=norm)
    norm = False if normalize is None else normalize  # mergekit's DARE default
    return dare(base_t, tensors, weights, density, elect_sign=method == "dare_ties", convention=convention,
                normalize=norm, seed=seed)
