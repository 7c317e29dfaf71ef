"""How far multimodal representations drift from text-only ones: distances, CKA, shift projections.

All functions take *paired* arrays: row ``i`` of ``X`` (e.g. text-only) and row ``i`` of ``Y``
(e.g. the same prompt with an image) describe the same prompt.

* :func:`cosine_distance` / :func:`l2_distance` measure per-prompt drift (mean over prompts);
* :func:`linear_cka` (Kornblith et al., 2019) compares the *geometry* of the two sets: it is 1
  when one is an orthogonal transform plus isotropic scaling of the other, so a large drift that
  keeps the geometry (a constant offset) scores 1 while a drift that scrambles neighbourhoods
  scores lower;
* :func:`shift_on_direction` projects a shift vector onto a probe's harmful direction and
  expresses it in units of the harmful-minus-benign gap along that direction: ``-1`` means the
  image moves representations as far towards "benign" as harmful and benign prompts are apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vlmsafe.errors import InputError

_EPS = 1e-12


def _paired(X: np.ndarray, Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise InputError(f"expected paired (n, features) arrays with the same n; got {X.shape} and {Y.shape}")
    if X.shape[0] == 0:
        raise InputError("no rows to compare; pass at least one prompt")
    return X, Y


# Copied from vlmsafe.safeclip.losses.cosine_distance: the same measure on numpy arrays (a probe reads
# recorded activations, no autograd), with checked inputs; tests/test_copies.py checks that they agree.
def cosine_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """Mean over rows of ``1 - cos(x_i, y_i)`` (0 = same direction, 2 = opposite)."""
    X, Y = _paired(X, Y)
    if X.shape[1] != Y.shape[1]:
        raise InputError(f"cosine distance needs equal widths; got {X.shape[1]} and {Y.shape[1]}")
    num = (X * Y).sum(axis=1)
    den = np.linalg.norm(X, axis=1) * np.linalg.norm(Y, axis=1)
    return float(np.mean(1.0 - num / np.maximum(den, _EPS)))


def l2_distance(X: np.ndarray, Y: np.ndarray) -> float:
    """Mean over rows of ``||x_i - y_i||``."""
    X, Y = _paired(X, Y)
    if X.shape[1] != Y.shape[1]:
        raise InputError(f"L2 distance needs equal widths; got {X.shape[1]} and {Y.shape[1]}")
    return float(np.linalg.norm(X - Y, axis=1).mean())


def linear_cka(X: np.ndarray, Y: np.ndarray) -> float:
    """Linear centred kernel alignment between paired representations (widths may differ).

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc, Yc``.
    Computed through whichever of the feature-space or the (n x n) Gram-space form is smaller;
    both give the same value. Returns 0 when either set has no variance.
    """
    X, Y = _paired(X, Y)
    X = X - X.mean(axis=0, keepdims=True)
    Y = Y - Y.mean(axis=0, keepdims=True)
    n = X.shape[0]
    if n <= min(X.shape[1], Y.shape[1]):
        K, L = X @ X.T, Y @ Y.T
        hsic, kx, ky = float((K * L).sum()), float(np.linalg.norm(K)), float(np.linalg.norm(L))
    else:
        hsic = float(np.linalg.norm(Y.T @ X) ** 2)
        kx, ky = float(np.linalg.norm(X.T @ X)), float(np.linalg.norm(Y.T @ Y))
    if kx < _EPS or ky < _EPS:
        return 0.0
    return hsic / (kx * ky)


def shift_on_direction(
    shift: np.ndarray,
    direction: np.ndarray,
    *,
    harmful_mean: np.ndarray | None = None,
    benign_mean: np.ndarray | None = None,
) -> dict[str, float | None]:
    """Project ``shift`` onto ``direction`` (normalised here).

    Returns ``projection`` (signed length along the unit direction; negative = towards benign),
    ``cosine`` (between shift and direction), and, given class means, ``gap_ratio``: the projection
    divided by the harmful-minus-benign gap along the same direction.
    """
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    d = np.asarray(direction, dtype=np.float64).reshape(-1)
    if shift.shape != d.shape:
        raise InputError(f"shift has {shift.size} features but the direction has {d.size}")
    d_norm = float(np.linalg.norm(d))
    if d_norm < _EPS:
        return {"projection": None, "cosine": None, "gap_ratio": None}
    unit = d / d_norm
    proj = float(shift @ unit)
    s_norm = float(np.linalg.norm(shift))
    out: dict[str, float | None] = {"projection": proj, "cosine": proj / s_norm if s_norm > _EPS else 0.0,
                                    "gap_ratio": None}
    if harmful_mean is not None and benign_mean is not None:
        gap = float((np.asarray(harmful_mean, dtype=np.float64) - np.asarray(benign_mean, dtype=np.float64)) @ unit)
        out["gap_ratio"] = proj / gap if abs(gap) > _EPS else None
    return out


def layer_shift_metrics(text: np.ndarray, mm: np.ndarray) -> dict[str, Any]:
    """Drift between the text-only and multimodal activations of the same prompts at one layer."""
    text, mm = _paired(text, mm)
    text_norm = float(np.linalg.norm(text, axis=1).mean())
    l2 = l2_distance(text, mm)
    return {
        "cosine_distance": cosine_distance(text, mm),
        "l2_distance": l2,
        "relative_l2": l2 / text_norm if text_norm > _EPS else None,
        "cka": linear_cka(text, mm),
        "text_norm": text_norm,
        "mm_norm": float(np.linalg.norm(mm, axis=1).mean()),
    }
