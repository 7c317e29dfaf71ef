"""The eight Safe-CLIP loss terms (Poppi et al., ECCV 2024), and an optional ninth for diffusion text encoders.

A training item is a quadruplet: safe text S, unsafe text U, safe image V, unsafe image G.
``T``/``I`` are the trainable text/vision encoders, ``T0``/``I0`` their frozen originals.

======================  ======================  ======================  ==============
term                    role                    formula                 default weight
======================  ======================  ======================  ==============
``text_safe``           preservation, cosine    d(T(S), T0(S))          0.1
``text_nsfw``           redirection, cosine     d(T(U), T0(S))          0.1
``vision_safe``         preservation, cosine    d(I(V), I0(V))          0.1
``vision_nsfw``         redirection, cosine     d(I(G), I0(V))          0.2
``S_Vref``              preservation, InfoNCE   NCE(T(S), I0(V))        0.25
``U_Vref``              redirection, InfoNCE    NCE(T(U), I0(V))        0.25
``V_Sref``              preservation, InfoNCE   NCE(I(V), T0(S))        0.25
``G_Sref``              redirection, InfoNCE    NCE(I(G), T0(S))        0.5
``text_safe_tokens``    preservation, tokens    e(T(S)_t, T0(S)_t)      0 (not in the paper)
======================  ======================  ======================  ==============

``d(a, b) = 1 - cos(a, b)`` averaged over the batch; ``NCE`` is the symmetric CLIP InfoNCE on
L2-normalised embeddings with a fixed logit scale (100, as in the reference code); ``e`` is the per-token
normalised squared error of the text tower's token states (the ninth term, below).

Items may lack images (ViSU's unsafe images are not public): each term is computed over the rows
that have what it needs (``vision_*`` and the NCE terms need ``V``; ``vision_nsfw`` needs ``V``
and ``G``; ``G_Sref`` needs ``G``). A term with no usable row is 0 for that batch. The weighted
total is divided by the sum of *all* weights (the reference normalisation), a constant, so the
gradient scale does not jump with the batch composition and gradient accumulation stays exact.

**Loss scale.** By default (``loss_scale="weighted_mean"``) the total is ``sum(w_i L_i) / sum(w_i)``.
The reference code divides that once more by the number of terms (8: ``lambdas @ losses /
lambdas.numel()`` after normalising the lambdas), so its loss, and its gradients, are 8x smaller;
``loss_scale="reference"`` reproduces that (by 8 also when the ninth term below is on). Adam's update
hardly depends on a constant gradient factor (only through its ``eps``), so without gradient clipping
both scales train alike. Clipping (``max_grad_norm``, on by default here; the reference does not clip)
compares the gradient norm *of the scaled loss* with the threshold: ``max_grad_norm=c`` with the
reference scale clips like ``8c`` with the weighted mean. Logged losses and ``early_stopping_min_delta``
are in the chosen scale.

**The ninth term, ``text_safe_tokens`` (not in the paper; weight 0 by default).** The eight terms only
see the *pooled* text embedding (the end-of-text state, projected). A Stable Diffusion 1.x/2.x UNet
cross-attends to *every* token state of the text tower's ``last_hidden_state``, padding positions
included (``encode_prompt`` pads to the tokenizer's ``model_max_length`` and passes no attention mask);
SDXL reads ``hidden_states[-2]``. Nothing in the eight terms holds those states still, and a Safe-CLIP
text tower can move a *safe* prompt's token states as much as an unsafe one's while its pooled embedding
stays put, so a generator fed by it drifts on safe prompts. The ninth term keeps them at the reference::

    text_safe_tokens = mean over rows i and positions t of  ||h_t(S_i) - h0_t(S_i)||^2 / ||h0_t(S_i)||^2

``h`` / ``h0`` are the token states of ``T`` / ``T0`` for the safe caption padded to the full context
length, run as diffusers runs them (:meth:`~vlmsafe.safeclip.backends.CLIPBackend.encode_text_states`).
It is a *normalised squared error* rather than a cosine distance because cross-attention reads the
states' magnitude too (keys set the attention logits' scale, values are summed as they are), and it is
normalised per token so that every position counts alike whatever its norm and the weight means the same
for any hidden width. Its square root is the RMS relative change of a token state, the unit conditioning
augmentation is set in: Gaussian noise of ``sigma`` times each state's RMS has an expected term value of
``sigma**2``, a yardstick for how much (random) drift a generator saw in training. Unsafe captions' token
states are left free: redirection needs them to move. :func:`token_drift` computes the per-row value;
the trainer passes it in :attr:`SafeCLIPEmbeddings.text_safe_token_drift`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmsafe.errors import InputError
from vlmsafe.safeclip.terms import (  # noqa: F401  (the names and weights of the terms; re-exported)
    ALL_LOSS_NAMES,
    LOSS_NAMES,
    LOSS_SCALES,
    LOSS_WEIGHT_MAX,
    TERMS_BY_EMBEDDING,
    TEXT_ONLY_TERMS,
    TOKEN_TERM,
    SafeCLIPLossWeights,
)


def token_drift(states: torch.Tensor, ref_states: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per row, the mean over positions of ``||h_t - h0_t||^2 / ||h0_t||^2`` (``[B, T, D]`` -> ``[B]``).

    The value of the ``text_safe_tokens`` term for each caption; see the module docstring for why a
    per-token normalised squared error. ``eps`` guards a zero reference state.
    """
    if states.shape != ref_states.shape:
        raise InputError(
            f"token states {tuple(states.shape)} and reference token states {tuple(ref_states.shape)} differ in "
            "shape; tokenize both with the same padding (the full context length)"
        )
    ref = ref_states.float()
    err = (states.float() - ref).pow(2).sum(dim=-1)
    return (err / ref.pow(2).sum(dim=-1).clamp_min(eps)).mean(dim=-1)


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``1 - cos(a_i, b_i)``; 0 for empty inputs."""
    if a.shape[0] == 0:
        return a.new_zeros(())
    return (1.0 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


def clip_nce(a: torch.Tensor, b: torch.Tensor, logit_scale: float = 100.0) -> torch.Tensor:
    """Symmetric CLIP InfoNCE between paired rows of ``a`` and ``b``; 0 for empty inputs.

    Row ``i`` of ``a`` is the positive of row ``i`` of ``b``; every other row is a negative.
    """
    if a.shape[0] == 0:
        return a.new_zeros(())
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    logits = logit_scale * a @ b.t()
    labels = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


@dataclass
class SafeCLIPEmbeddings:
    """Projected (un-normalised) embeddings of one batch, ``[B, D]`` each.

    Image rows for items without that image are ignored (fill them with anything, e.g. zeros);
    ``has_safe_image`` / ``has_unsafe_image`` (``[B]`` bool) say which rows are real. The image
    fields may be ``None`` for a text-only batch, and the trainable-tower fields (``text_*``,
    ``image_*``) are ``None`` for a tower that is not trained: the terms that need them are 0.
    ``text_safe_token_drift`` is not an embedding but the per-row value of the token-state term.
    """

    ref_text_safe: torch.Tensor  # T0(S)
    text_safe: torch.Tensor | None = None  # T(S); None when the text tower is not trained
    text_nsfw: torch.Tensor | None = None  # T(U)
    image_safe: torch.Tensor | None = None  # I(V)
    image_nsfw: torch.Tensor | None = None  # I(G)
    ref_image_safe: torch.Tensor | None = None  # I0(V)
    has_safe_image: torch.Tensor | None = None
    has_unsafe_image: torch.Tensor | None = None
    #: ``[B]`` :func:`token_drift` of T(S)'s token states from T0(S)'s; ``None`` when the token term is off
    text_safe_token_drift: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SafeCLIPEmbeddings:
        """Apply ``fn`` to every tensor field (used to all-gather across processes)."""
        return SafeCLIPEmbeddings(
            **{f.name: (None if (v := getattr(self, f.name)) is None else fn(v)) for f in dataclasses.fields(self)}
        )


def safeclip_losses(
    emb: SafeCLIPEmbeddings,
    weights: SafeCLIPLossWeights = SafeCLIPLossWeights(),
    *,
    logit_scale: float = 100.0,
    loss_scale: str = "weighted_mean",
) -> dict[str, torch.Tensor]:
    """Compute the Safe-CLIP terms and their weighted total.

    Returns a dict with one scalar tensor per name in :data:`ALL_LOSS_NAMES` (unweighted, for logging)
    and ``"loss"``, the weighted sum divided by :attr:`SafeCLIPLossWeights.denominator` (and, with
    ``loss_scale="reference"``, by the number of terms as well; see the module docstring).
    Terms with weight 0 are still returned (detached) so logs keep the same columns.

    The terms share their work: every embedding is L2-normalised once, the cosine terms are row-wise
    dot products of those unit vectors, and the four InfoNCE terms come from two similarity
    computations (``[T(S); T(U)]`` against ``I0(V)``, ``[I(V); I(G)]`` against ``T0(S)``), each one
    batched matrix product and one cross-entropy per direction. The values equal :func:`clip_nce` /
    :func:`cosine_distance` term by term (up to float rounding).
    """
    if loss_scale not in LOSS_SCALES:
        raise InputError(f"loss_scale must be one of {', '.join(LOSS_SCALES)}; got {loss_scale!r}")
    n = emb.ref_text_safe.shape[0]
    for name in ("text_safe", "text_nsfw", "image_safe", "image_nsfw", "ref_image_safe", "text_safe_token_drift"):
        x = getattr(emb, name)
        if x is not None and x.shape[0] != n:
            raise InputError(
                f"{name} has {x.shape[0]} rows but ref_text_safe has {n}: all embeddings of one batch need one row "
                "per item"
            )
    unit = {
        f.name: F.normalize(v.float(), dim=-1)
        for f in dataclasses.fields(emb)
        if f.name not in ("has_safe_image", "has_unsafe_image", "text_safe_token_drift")
        and (v := getattr(emb, f.name)) is not None
    }
    no_rows = torch.zeros(n, dtype=torch.bool, device=emb.ref_text_safe.device)
    has_v = emb.has_safe_image.bool() if (emb.has_safe_image is not None and "ref_image_safe" in unit) else no_rows
    has_g = emb.has_unsafe_image.bool() if emb.has_unsafe_image is not None else no_rows
    s0, v0 = unit["ref_text_safe"], unit.get("ref_image_safe")
    ts, tu, iv, ig = (unit.get(k) for k in ("text_safe", "text_nsfw", "image_safe", "image_nsfw"))
    everyone = torch.ones_like(no_rows)
    terms = {
        "text_safe": _cosine_distance_unit(ts, s0, everyone),
        "text_nsfw": _cosine_distance_unit(tu, s0, everyone),
        "vision_safe": _cosine_distance_unit(iv, v0, has_v),
        "vision_nsfw": _cosine_distance_unit(ig, v0, has_v & has_g),
    }
    terms["S_Vref"], terms["U_Vref"] = _nce_unit([ts, tu], v0, has_v, logit_scale)
    if torch.equal(has_v, has_g):  # the usual batch: every item has both images or neither
        terms["V_Sref"], terms["G_Sref"] = _nce_unit([iv, ig], s0, has_v, logit_scale)
    else:
        (terms["V_Sref"],), (terms["G_Sref"],) = (
            _nce_unit([iv], s0, has_v, logit_scale),
            _nce_unit([ig], s0, has_g, logit_scale),
        )
    drift = emb.text_safe_token_drift
    terms[TOKEN_TERM] = everyone.new_zeros((), dtype=torch.float32) if drift is None else drift.float().mean()
    w = weights.as_dict()
    total = emb.ref_text_safe.new_zeros((), dtype=torch.float32)
    for name in ALL_LOSS_NAMES:
        if w[name] != 0.0:
            total = total + w[name] * terms[name]
    out = {name: (terms[name] if w[name] != 0.0 else terms[name].detach()) for name in ALL_LOSS_NAMES}
    divisor = weights.denominator * (len(LOSS_NAMES) if loss_scale == "reference" else 1)
    out["loss"] = total / divisor
    return out


def _cosine_distance_unit(a: torch.Tensor | None, b: torch.Tensor | None, rows: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - <a_i, b_i>`` over ``rows`` for unit vectors; 0 without rows."""
    if a is None or b is None or not bool(rows.any()):
        return rows.new_zeros((), dtype=torch.float32)
    if not bool(rows.all()):
        a, b = a[rows], b[rows]
    return (1.0 - (a * b).sum(dim=-1)).mean()


def _nce_unit(
    queries: list[torch.Tensor | None], keys: torch.Tensor | None, rows: torch.Tensor, scale: float
) -> list[torch.Tensor]:
    """Symmetric InfoNCE of each query tensor against ``keys`` (unit vectors, paired by row, over ``rows``).

    All present queries go through one batched product ``[g, m, D] @ [D, m]`` and one cross-entropy per
    direction; a missing query (or no row) gives 0.
    """
    zero = rows.new_zeros((), dtype=torch.float32)
    present = [q for q in queries if q is not None]
    if keys is None or not present or not bool(rows.any()):
        return [zero for _ in queries]
    if not bool(rows.all()):
        keys, present = keys[rows], [q[rows] for q in present]
    logits = scale * torch.stack(present) @ keys.t()  # [g, m, m]: query i against key j
    g, m = logits.shape[0], logits.shape[1]
    labels = torch.arange(m, device=logits.device).repeat(g)
    per_query = F.cross_entropy(logits.reshape(g * m, m), labels, reduction="none").view(g, m).mean(dim=1)
    per_key = F.cross_entropy(logits.transpose(1, 2).reshape(g * m, m), labels, reduction="none")
    losses = iter(0.5 * (per_query + per_key.view(g, m).mean(dim=1)))
    return [zero if q is None else next(losses) for q in queries]
