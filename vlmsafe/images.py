"""Images as every vlmsafe component opens them: fully decoded RGB, with one error per failure; blank and noise images.

* :func:`open_image` opens an image fully (so a truncated file fails here, not in a batch an hour
  later), upright (its EXIF orientation applied), and turns every failure into a
  :class:`~vlmsafe.errors.FileFormatError`; :func:`verify_image` checks one before the work; :func:`to_rgb`
  converts 16-bit, float, palette and transparent images correctly. :func:`url_kind` tells a URL from a path:
  nothing is downloaded, so a URL is refused by name instead of read as a missing file.
* :func:`blank_image` / :func:`noise_image`: images without content (CMRM's anchors, probes' controls).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from vlmsafe.errors import FileFormatError, InputError


def open_image(path: str | os.PathLike[str], *, context: str = "") -> Image.Image:
    """Open ``path`` as a fully decoded RGB PIL image, turned upright.

    A photo whose EXIF ``Orientation`` says "rotated" (phones store portrait shots as landscape pixels with
    that tag) is transposed as every viewer shows it, and as ``transformers.image_utils.load_image`` opens a
    path: otherwise the model sees it on its side.

    Raises :class:`FileFormatError` for a missing file, a URL (nothing is downloaded), a file that is not
    an image and a truncated image (PIL decodes lazily; this forces the decode so the failure happens here).
    """
    with _image_errors(path, context) as p, Image.open(p) as im:
        if im.getexif().get(_ORIENTATION, 1) != 1:
            return to_rgb(ImageOps.exif_transpose(im))
        return to_rgb(im)


_ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads
_URL = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]+://|data:[^,]*,)")


def url_kind(value: object) -> str | None:
    """``"a data URI"``, ``"a file:// URI"`` or ``"a URL"`` when ``value`` is one, else ``None`` (a path).

    vlmsafe reads local files and downloads nothing, so a record's ``"image": "https://..."`` must be
    refused as what it is, not resolved against the data file's folder and reported as a missing file
    (``Path`` even folds its ``//``). Windows drive paths (``C:\\x``) are paths.
    """
    if not isinstance(value, str) or not _URL.match(value):
        return None
    if value.startswith("data:"):
        return "a data URI"
    return "a file:// URI" if value[:7].lower() == "file://" else "a URL"


def url_problem(value: object) -> str | None:
    """The refusal of an image given as a URL (see :func:`url_kind`): what it is and the fix, or ``None``."""
    kind = url_kind(value)
    if kind is None:
        return None
    text = str(value)
    shown = f"{text[:60]}..." if len(text) > 60 else text  # a data URI can be megabytes
    fix = ("write the path without file://" if kind == "a file:// URI"
           else "vlmsafe reads local files and downloads nothing: save the image and give its path")
    return f"image {shown!r} is {kind}; {fix}"


#: Background that transparent pixels are composited onto: white, as ``transformers``' own ``convert_rgb`` does,
#: so an image means the same whether vlmsafe or a model's processor flattens it.
ALPHA_BACKGROUND: tuple[int, int, int] = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as an 8-bit RGB image, every mode scaled to what it shows (the one conversion vlmsafe uses).

    ``Image.convert("RGB")`` clips instead of scaling: a 16-bit greyscale PNG (``I;16``, values 0..65535)
    comes out almost white, a float image in 0..1 (``F``) black. Here high-bit-depth modes are scaled to 8
    bits (``I;16*``: / 257; ``I`` and ``F``: by the range their values occupy, see :func:`_scale_to_8bit`),
    transparent images (``RGBA``, ``LA``, ``PA``, ``P`` with a transparent colour) are composited onto
    :data:`ALPHA_BACKGROUND` instead of showing whatever colour their invisible pixels hold, and the rest
    (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ...) go through PIL's own conversion.
    """
    import numpy as np

    mode = image.mode
    if mode == "RGB":
        return image.convert("RGB")  # a decoded copy, as every other branch returns
    if mode.startswith("I;16") or mode in ("I", "F"):
        pixels = np.asarray(image)
        if pixels.ndim != 2:  # pragma: no cover - PIL's single-channel modes are 2-D
            raise FileFormatError(f"cannot read a {mode} image of shape {pixels.shape}; save it as an 8-bit PNG")
        grey = _scale_to_8bit(pixels, sixteen_bit=mode.startswith("I;16"))
        return Image.fromarray(grey).convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _scale_to_8bit(pixels: Any, *, sixteen_bit: bool) -> Any:
    """A single-channel array of any depth as ``uint8``, scaled to what it shows.

    16-bit modes: ``/ 257`` (65535 -> 255). 32-bit integer and float images say nothing of their range, so
    it is read from the values: floats in [0, 1] are fractions (x 255), values in [0, 255] are already
    8-bit, integers in [0, 65535] are 16-bit (``I`` is how some readers open 16-bit files); anything else is
    stretched from its minimum to its maximum. NaN reads as black.
    """
    import numpy as np

    values = np.nan_to_num(pixels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if sixteen_bit:
        scaled = values / 257.0
    elif pixels.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        scaled = values
    elif pixels.dtype.kind != "f" and low >= 0.0 and high <= 65535.0:
        scaled = values / 257.0
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


#: Colour of :func:`blank_image` when none is given: white, as in the blank images the CMRM paper and
#: vlmsafe's probes use to show the modality gap (the paper does not say which colour it used).
BLANK_COLOUR: tuple[int, int, int] = (255, 255, 255)
#: Seed of :func:`noise_image` when none is given.
NOISE_SEED = 0

def _size(size: int | tuple[int, int], where: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size)):
        raise InputError(f"{where}: size must be a positive int or a (width, height) pair of positive ints, "
                         f"got {size!r}")
    return int(size[0]), int(size[1])


def check_colour(colour: object, where: str = "colour") -> tuple[int, int, int]:
    """``(r, g, b)`` with each channel an int in 0..255 (a single int is a grey level), else :class:`InputError`."""
    if isinstance(colour, int) and not isinstance(colour, bool):
        colour = (colour, colour, colour)
    if (not isinstance(colour, (tuple, list)) or len(colour) != 3
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in colour)):
        raise InputError(f"{where}: a colour is three integers in 0..255 (r, g, b), got {colour!r}; "
                         "e.g. (255, 255, 255)")
    return int(colour[0]), int(colour[1]), int(colour[2])


def blank_image(size: int | tuple[int, int] = 336, colour: object = BLANK_COLOUR) -> Image.Image:
    """A uniform RGB image of ``size`` (an int for a square, or ``(width, height)``) in ``colour``.

    The simplest image there is: it carries no content, so the shift it causes in a VLM's hidden
    states is the modality gap itself (the CMRM paper's "meaningless image" anchor).
    """
    return Image.new("RGB", _size(size, "blank_image"), check_colour(colour, "blank_image"))


def noise_image(size: int | tuple[int, int] = 336, seed: int = NOISE_SEED) -> Image.Image:
    """Uniform RGB noise (every channel of every pixel uniform in 0..255), reproducible from ``seed``.

    The CMRM paper's "corrupted image" anchor. Drawn with ``numpy.random.default_rng(seed)``, so
    the same seed gives the same image on every platform and numpy version that keeps that generator.
    """
    import numpy as np

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"noise_image: seed must be a non-negative integer, got {seed!r}")
    width, height = _size(size, "noise_image")
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def verify_image(path: str | os.PathLike[str], *, context: str = "") -> None:
    """Check, without decoding the pixels, that ``path`` is an image file whose structure is intact.

    ``PIL.Image.verify`` reads the whole file and checks its structure (PNG chunk checksums, a
    truncated stream), so a data set can be validated before a long run at a fraction of the cost
    of decoding it; :func:`open_image` still decodes (and checks) each image when it is used.
    """
    with _image_errors(path, context) as p, Image.open(p) as im:
        im.verify()


@contextlib.contextmanager
def _image_errors(path: str | os.PathLike[str], context: str) -> Iterator[Path]:
    """Turn a missing path and every PIL failure into one :class:`FileFormatError` naming the file."""
    where = f"{context}: " if context else ""
    problem = url_problem(path)
    if problem is not None:
        raise FileFormatError(f"{where}{problem}")
    p = Path(path)
    if not p.is_file():
        kind = "is a directory" if p.is_dir() else "does not exist"
        raise FileFormatError(f"{where}image file {str(p)!r} {kind}; fix the path or add the image")
    try:
        yield p
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = str(exc).split("\n")[0] or type(exc).__name__
        raise FileFormatError(
            f"{where}{str(p)!r} is not a readable image ({reason}); replace or re-download it"
        ) from None
