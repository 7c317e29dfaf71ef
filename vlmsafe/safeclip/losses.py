"""The eight Safe-CLIP loss terms (Poppi et al., ECCV 2024).

A training item is a quadruplet: safe text S, unsafe text U, safe image V, unsafe image G.
``T``/``I`` are the trainable text/vision encoders, ``T0``/``I0`` their frozen originals.

==============  ======================  ======================  ==============
term            role                    formula                 default weight
==============  ======================  ======================  ==============
``text_safe``   preservation, cosine    d(T(S), T0(S))          0.1
``text_nsfw``   redirection, cosine     d(T(U), T0(S))          0.1
``vision_safe`` preservation, cosine    d(I(V), I0(V))          0.1
``vision_nsfw`` redirection, cosine     d(I(G), I0(V))          0.2
``S_Vref``      preservation, InfoNCE   NCE(T(S), I0(V))        0.25
``U_Vref``      redirection, InfoNCE    NCE(T(U), I0(V))        0.25
``V_Sref``      preservation, InfoNCE   NCE(I(V), T0(S))        0.25
``G_Sref``      redirection, InfoNCE    NCE(I(G), T0(S))        0.5
==============  ======================  ======================  ==============

``d(a, b) = 1 - cos(a, b)`` averaged over the batch; ``NCE`` is the symmetric CLIP InfoNCE on
L2-normalised embeddings with a fixed logit scale (100, as in the reference code).

Items may lack images (ViSU's unsafe images are not public): each term is computed over the rows
that have what it needs (``vision_*`` and the NCE terms need ``V``; ``vision_nsfw`` needs ``V``
and ``G``; ``G_Sref`` needs ``G``). A term with no usable row is 0 for that batch. The weighted
total is divided by the sum of *all* weights (the reference normalisation), a constant, so the
gradient scale does not jump with the batch composition and gradient accumulation stays exact.

**Loss scale.** By default (``loss_scale="weighted_mean"``) the total is ``sum(w_i L_i) / sum(w_i)``.
The reference code divides that once more by the number of terms (8: ``lambdas @ losses /
lambdas.numel()`` after normalising the lambdas), so its loss, and its gradients, are 8x smaller;
``loss_scale="reference"`` reproduces that. Adam's update hardly depends on a constant gradient
factor (only through its ``eps``), so without gradient clipping both scales train alike. Clipping
(``max_grad_norm``, on by default here; the reference does not clip) compares the gradient norm *of
the scaled loss* with the threshold: ``max_grad_norm=c`` with the reference scale clips like
``8c`` with the weighted mean. Logged losses and ``early_stopping_min_delta`` are in the chosen scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlmsafe.errors import InputError
from vlmsafe.validation import check_float

#: Loss term names, in the reference's order (text/vision cosine, then the four NCE terms).
LOSS_NAMES: tuple[str, ...] = (
    "text_safe",
    "text_nsfw",
    "vision_safe",
    "vision_nsfw",
    "S_Vref",
    "U_Vref",
    "V_Sref",
    "G_Sref",
)

#: ``loss_scale`` values: the weighted mean of the terms, or the reference code's (that mean / 8).
LOSS_SCALES: tuple[str, ...] = ("weighted_mean", "reference")

#: Terms that need no image: what text-only training optimises.
TEXT_ONLY_TERMS: tuple[str, ...] = ("text_safe", "text_nsfw")


@dataclass(frozen=True)
class SafeCLIPLossWeights:
    """Weights of the eight terms. Defaults are the reference's; ``normalize`` divides by their sum."""

    text_safe: float = 0.1
    text_nsfw: float = 0.1
    vision_safe: float = 0.1
    vision_nsfw: float = 0.2
    S_Vref: float = 0.25
    U_Vref: float = 0.25
    V_Sref: float = 0.25
    G_Sref: float = 0.5
    normalize: bool = True

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in LOSS_NAMES}

    @classmethod
    def from_dict(cls, data: dict) -> SafeCLIPLossWeights:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(f"unknown Safe-CLIP loss weight(s) {sorted(unknown)}; valid names are {list(LOSS_NAMES)} and 'normalize'")
        return cls(**data)

    def __post_init__(self) -> None:
        for name in LOSS_NAMES:  # finite and >= 0 (a NaN weight would train on NaN silently)
            object.__setattr__(self, name, check_float(getattr(self, name), f"loss weight {name}", low=0))
        if sum(self.as_dict().values()) <= 0:
            raise InputError(f"all Safe-CLIP loss weights are 0; give at least one of {', '.join(LOSS_NAMES)} a weight > 0")

    @property
    def denominator(self) -> float:
        return sum(self.as_dict().values()) if self.normalize else 1.0


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
    """

    ref_text_safe: torch.Tensor  # T0(S)
    text_safe: torch.Tensor | None = None  # T(S); None when the text tower is not trained
    text_nsfw: torch.Tensor | None = None  # T(U)
    image_safe: torch.Tensor | None = None  # I(V)
    image_nsfw: torch.Tensor | None = None  # I(G)
    ref_image_safe: torch.Tensor | None = None  # I0(V)
    has_safe_image: torch.Tensor | None = None
    has_unsafe_image: torch.Tensor | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SafeCLIPEmbeddings:
        """Apply ``fn`` to every tensor field (used to all-gather across processes)."""
        return SafeCLIPEmbeddings(**{f.name: (None if (v := getattr(self, f.name)) is None else fn(v)) for f in dataclasses.fields(self)})


def safeclip_losses(
    emb: SafeCLIPEmbeddings,
    weights: SafeCLIPLossWeights = SafeCLIPLossWeights(),
    *,
    logit_scale: float = 100.0,
    loss_scale: str = "weighted_mean",
) -> dict[str, torch.Tensor]:
    """Compute the eight Safe-CLIP terms and their weighted total.

    Returns a dict with one scalar tensor per name in :data:`LOSS_NAMES` (unweighted, for logging)
    and ``"loss"``, the weighted sum divided by :attr:`SafeCLIPLossWeights.denominator` (and, with
    ``loss_scale="reference"``, by the number of terms as well; see the module docstring).
    Terms with weight 0 are still returned (detached) so logs keep the same columns.
    """
    if loss_scale not in LOSS_SCALES:
        raise InputError(f"loss_scale must be one of {', '.join(LOSS_SCALES)}; got {loss_scale!r}")
    ref_s = emb.ref_text_safe
    n = ref_s.shape[0]
    for name in ("text_safe", "text_nsfw", "image_safe", "image_nsfw", "ref_image_safe"):
        x = getattr(emb, name)
        if x is not None and x.shape[0] != n:
            raise InputError(f"{name} has {x.shape[0]} rows but ref_text_safe has {n}: all embeddings of one batch need one row per item")
    device = ref_s.device
    no_rows = torch.zeros(n, dtype=torch.bool, device=device)
    has_v = emb.has_safe_image.bool() if (emb.has_safe_image is not None and emb.ref_image_safe is not None) else no_rows
    has_g = emb.has_unsafe_image.bool() if emb.has_unsafe_image is not None else no_rows
    w = weights.as_dict()
    empty = ref_s.new_zeros((0, ref_s.shape[-1]))

    def rows(x: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
        return empty if (x is None or not mask.any()) else x[mask]

    def full(x: torch.Tensor | None) -> torch.Tensor:
        return empty if x is None else x

    ref_s_or_empty = ref_s if emb.text_safe is not None else empty
    ref_s_u = ref_s if emb.text_nsfw is not None else empty
    v_and_g = has_v & has_g
    v_rows = has_v if emb.text_safe is not None else no_rows
    u_rows = has_v if emb.text_nsfw is not None else no_rows
    iv_rows = has_v if emb.image_safe is not None else no_rows
    ig_rows = has_g if emb.image_nsfw is not None else no_rows
    terms: dict[str, torch.Tensor] = {
        "text_safe": cosine_distance(full(emb.text_safe), ref_s_or_empty),
        "text_nsfw": cosine_distance(full(emb.text_nsfw), ref_s_u),
        "vision_safe": cosine_distance(rows(emb.image_safe, iv_rows), rows(emb.ref_image_safe, iv_rows)),
        "vision_nsfw": cosine_distance(rows(emb.image_nsfw, v_and_g & ig_rows), rows(emb.ref_image_safe, v_and_g & ig_rows)),
        "S_Vref": clip_nce(rows(emb.text_safe, v_rows), rows(emb.ref_image_safe, v_rows), logit_scale),
        "U_Vref": clip_nce(rows(emb.text_nsfw, u_rows), rows(emb.ref_image_safe, u_rows), logit_scale),
        "V_Sref": clip_nce(rows(emb.image_safe, iv_rows), rows(ref_s, iv_rows), logit_scale),
        "G_Sref": clip_nce(rows(emb.image_nsfw, ig_rows), rows(ref_s, ig_rows), logit_scale),
    }
    total = ref_s.new_zeros((), dtype=torch.float32)
    for name, value in terms.items():
        if w[name] != 0.0:
            total = total + w[name] * value
    out = {name: (value if w[name] != 0.0 else value.detach()) for name, value in terms.items()}
    divisor = weights.denominator * (len(LOSS_NAMES) if loss_scale == "reference" else 1)
    out["loss"] = total / divisor
    return out
