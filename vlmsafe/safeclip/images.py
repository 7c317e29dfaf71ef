"""The images of Safe-CLIP quadruplets: a path, a PIL image, or an already preprocessed ``[3, H, W]`` tensor.

A preprocessed tensor skips the backend's image processor (the bundled testbed trains fast this way);
:func:`pixel_batch` turns a list of them into the ``[N, 3, H, W]`` pixels a tower reads.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Union

import torch

from vlmsafe.errors import InputError
from vlmsafe.images import open_image, to_rgb

ImageLike = Union[str, os.PathLike, "PIL.Image.Image", torch.Tensor]  # noqa: F821


def load_image(image: ImageLike) -> Any:
    """Open a path as an RGB PIL image (:func:`vlmsafe.images.open_image`); pass PIL images and tensors through."""
    if isinstance(image, torch.Tensor):
        return image
    from PIL import Image

    if isinstance(image, Image.Image):
        return to_rgb(image)
    return open_image(image)


def pixel_batch(backend: Any, images: Sequence[ImageLike]) -> torch.Tensor:
    """Preprocessed ``[N, 3, H, W]`` pixels; preprocessed tensors are stacked as they are."""
    loaded = [load_image(im) for im in images]
    if all(isinstance(im, torch.Tensor) for im in loaded):
        return torch.stack(loaded).float()
    if any(isinstance(im, torch.Tensor) for im in loaded):
        raise InputError("a dataset must not mix preprocessed tensors with paths/PIL images")
    return backend.preprocess(loaded)
