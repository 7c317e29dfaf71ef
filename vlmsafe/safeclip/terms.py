"""The Safe-CLIP loss terms by name and their weights, in a module that imports nothing heavy.

:mod:`vlmsafe.safeclip.losses` computes the terms (with torch); the training config and the command line read
the names, defaults and ranges from here, so ``vlmsafe safeclip train --help`` builds its flags without torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vlmsafe.errors import InputError
from vlmsafe.validation import check_float

#: Which hidden states the optional token-state term reads: the last layer's or the penultimate one's.
TOKEN_STATE_LAYERS = ("last", "penultimate")

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

#: The optional term that keeps safe captions' token states at the reference (not in the paper; default weight 0).
TOKEN_TERM = "text_safe_tokens"

#: The terms each trainable embedding appears in. Every term has exactly one trainable embedding (its
#: partner comes from the frozen reference), so the loss is a sum of one part per embedding.
TERMS_BY_EMBEDDING: dict[str, tuple[str, ...]] = {
    "text_safe": ("text_safe", "S_Vref", TOKEN_TERM),
    "text_nsfw": ("text_nsfw", "U_Vref"),
    "image_safe": ("vision_safe", "V_Sref"),
    "image_nsfw": ("vision_nsfw", "G_Sref"),
}

#: ``loss_scale`` values: the weighted mean of the terms, or the reference code's (that mean / 8).
LOSS_SCALES: tuple[str, ...] = ("weighted_mean", "reference")

#: Every loss term: the paper's eight, then the optional token-state term.
ALL_LOSS_NAMES: tuple[str, ...] = (*LOSS_NAMES, TOKEN_TERM)

#: Terms that need no image: what text-only training optimises.
TEXT_ONLY_TERMS: tuple[str, ...] = ("text_safe", "text_nsfw", TOKEN_TERM)


#: The largest loss weight accepted.
LOSS_WEIGHT_MAX = 1000.0


@dataclass(frozen=True)
class SafeCLIPLossWeights:
    """Weights of the terms. Defaults are the reference's; ``normalize`` divides by their sum.

    ``text_safe_tokens`` (default 0, i.e. the paper's recipe) weights the optional ninth term that keeps safe
    captions' token states at the reference (see the module docstring); with ``normalize`` it enters the
    sum like the others.
    """

    text_safe: float = 0.1
    text_nsfw: float = 0.1
    vision_safe: float = 0.1
    vision_nsfw: float = 0.2
    S_Vref: float = 0.25
    U_Vref: float = 0.25
    V_Sref: float = 0.25
    G_Sref: float = 0.5
    text_safe_tokens: float = 0.0
    normalize: bool = True

    def as_dict(self) -> dict[str, float]:
        return {name: float(getattr(self, name)) for name in ALL_LOSS_NAMES}

    @classmethod
    def from_dict(cls, data: dict) -> SafeCLIPLossWeights:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InputError(
                f"unknown Safe-CLIP loss weight(s) {sorted(unknown)}; valid names are {list(ALL_LOSS_NAMES)} and "
                "'normalize'"
            )
        return cls(**data)

    def __post_init__(self) -> None:
        # finite and in [0, LOSS_WEIGHT_MAX]: a NaN weight would train on NaN silently, and a huge one overflows
        # the float32 loss to inf (then NaN); weights are relative (the paper's are <= 0.5)
        for name in ALL_LOSS_NAMES:
            value = check_float(getattr(self, name), f"loss weight {name}", low=0, high=LOSS_WEIGHT_MAX)
            object.__setattr__(self, name, value)
        if not isinstance(self.normalize, bool):
            raise InputError(f"loss weight option normalize must be true or false, got {self.normalize!r}")
        if sum(self.as_dict().values()) <= 0:
            raise InputError(
                f"all Safe-CLIP loss weights are 0; give at least one of {', '.join(ALL_LOSS_NAMES)} a weight > 0"
            )

    @property
    def denominator(self) -> float:
        return sum(self.as_dict().values()) if self.normalize else 1.0

    @property
    def keeps_token_states(self) -> bool:
        """Whether the token-state term is on (its weight > 0): only then are token states computed."""
        return self.text_safe_tokens > 0
