"""The image a CMRM shift is anchored on: the input's own image, or a meaningless one.

CMRM measures how an image moves a VLM's hidden states: ``shift = h(prompt, image) - h(prompt)``.
Which image is a choice:

``"real"``   the item's own image (vlmsafe's original reading): the shift carries the image's
             content as well as the modality gap;
``"blank"``  a uniform image at the processor's input size (:func:`vlmsafe.images.blank_image`,
             colour :data:`vlmsafe.images.BLANK_COLOUR` unless given);
``"noise"``  seeded uniform noise at that size (:func:`vlmsafe.images.noise_image`);
PIL image   any fixed image of the caller's.

The CMRM paper (Liu et al., 2024, arXiv 2410.09047) anchors on a meaningless or corrupted image,
so the vector captures what *any* image does to the representation rather than what this image
shows. With a fixed anchor the data's own images are never opened: prompts suffice, and the
vectors do not depend on them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from PIL import Image

from vlmsafe.adapters import ModelAdapter
from vlmsafe.errors import InputError
from vlmsafe.images import BLANK_COLOUR, NOISE_SEED, blank_image, check_colour, noise_image, to_rgb
from vlmsafe.steering.choices import ANCHORS


def check_anchor(anchor: Any, colour: Any = BLANK_COLOUR, seed: Any = NOISE_SEED) -> None:
    """Validate an anchor choice, its colour and its seed (before any model work)."""
    if not isinstance(anchor, Image.Image) and anchor not in ANCHORS:
        raise InputError(f"anchor must be one of {', '.join(map(repr, ANCHORS))} or a PIL image, got {anchor!r}")
    check_colour(colour, "anchor colour")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"anchor seed must be a non-negative integer, got {seed!r}")


def anchor_image(
    adapter: ModelAdapter, anchor: Any, *, colour: Any = BLANK_COLOUR, seed: Any = NOISE_SEED
) -> tuple[Image.Image | None, dict[str, Any]]:
    """The anchor image (``None`` for ``"real"``) and its description for the vectors' JSON.

    Blank and noise images are drawn at the processor's input size (:attr:`ModelAdapter.image_input_size`),
    so the processor does not resize (and, for noise, smooth) them.
    """
    check_anchor(anchor, colour, seed)
    if isinstance(anchor, Image.Image):
        image, meta = to_rgb(anchor), {"anchor": "image"}
    elif anchor == "real":
        return None, {"anchor": "real"}
    elif anchor == "blank":
        image = blank_image(adapter.image_input_size, colour)
        meta = {"anchor": "blank", "anchor_colour": list(check_colour(colour))}
    else:
        image = noise_image(adapter.image_input_size, seed)
        meta = {"anchor": "noise", "anchor_seed": int(seed)}
    meta["anchor_size"] = list(image.size)
    meta["anchor_sha256"] = hashlib.sha256(image.tobytes()).hexdigest()
    return image, meta


__all__ = ["ANCHORS", "anchor_image", "check_anchor"]
