"""Synthetic images of the testbed, drawn in many styles (the questions they answer: :mod:`vlmsafe.testbed.questions`).

An image shows one shape (questions: colour, shape), one to three shapes (count, colour) or a
written word (word, colour); every question needs the image. What varies, so that the vision
tower learns the content and not one drawing style:

* background: plain light / dark / grey, pastel, gradients, grain, stripes, checks, speckles ...
* colour shades: each colour name covers a band of hues, saturations and brightnesses;
* filled shapes or outlines of several line widths, sizes and positions;
* canvas sizes from 32 to 64 pixels (the processor resizes), global tints, noise and blur;
* fonts: Pillow's built-in font and the DejaVu / STIX / Computer Modern fonts that ship with
  matplotlib, at several sizes and stroke widths.

Styles are named recipes (:data:`STYLES`), grouped so that whole styles are held out:
:data:`TRAIN_STYLES` (training and calibration), :data:`TEST_STYLES` (the test split only) and
:data:`UNSEEN_STYLES` (the independent check set only). Fonts are held out the same way.
:func:`blank_image` / :func:`noise_image` give images without content, used in training with
instructions (real visual-instruction data pairs instructions with unrelated images) and in the
check sets.
"""

from __future__ import annotations

import colorsys
import functools
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from vlmsafe.errors import InputError
from vlmsafe.images import blank_image, noise_image
from vlmsafe.testbed.questions import image_questions

#: Side of the images the processor feeds the vision tower.
IMAGE_SIZE = 32

#: colour name -> (hue band in degrees, lowest saturation, lowest value); hues wrap at 360.
COLOURS: dict[str, tuple[tuple[float, float], float, float]] = {
    "red": ((-8.0, 6.0), 0.7, 0.6),
    "orange": ((22.0, 34.0), 0.8, 0.85),
    "yellow": ((50.0, 58.0), 0.75, 0.85),
    "green": ((100.0, 140.0), 0.6, 0.5),
    "blue": ((212.0, 232.0), 0.65, 0.6),
    "purple": ((272.0, 292.0), 0.55, 0.55),
}
SHAPES = ("circle", "square", "triangle")
WORDS = ("cat", "sun", "dog", "box")
KINDS = ("shape", "count", "word")

#: Fonts: "pillow" is Pillow's built-in font; the others are matplotlib's bundled TrueType files.
TRAIN_FONTS = ("pillow", "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSansMono.ttf", "cmss10.ttf", "cmr10.ttf")
TEST_FONTS = ("DejaVuSerif.ttf", "STIXGeneral.ttf")
UNSEEN_FONTS = ("DejaVuSansMono-Bold.ttf", "DejaVuSerif-Bold.ttf")


def shade(rng: random.Random, colour: str) -> tuple[int, int, int]:
    """A random shade of the named colour (hue, saturation and brightness within its band)."""
    (h0, h1), s0, v0 = COLOURS[colour]
    h = (rng.uniform(h0, h1) % 360.0) / 360.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(s0, 1.0), rng.uniform(v0, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _grey(rng: random.Random, lo: int, hi: int, tint: int = 6) -> tuple[int, int, int]:
    g = rng.randint(lo, hi)
    return tuple(max(0, min(255, g + rng.randint(-tint, tint))) for _ in range(3))  # type: ignore[return-value]


def _pastel(rng: random.Random) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0.08, 0.22), rng.uniform(0.85, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


# ---------------------------------------------------------------------------------------------
# Backgrounds: (rng, size) -> image
# ---------------------------------------------------------------------------------------------


def _plain(lo: int, hi: int) -> Callable[[random.Random, int], Image.Image]:
    return lambda rng, n: Image.new("RGB", (n, n), _grey(rng, lo, hi))


def _pastel_bg(rng: random.Random, n: int) -> Image.Image:
    return Image.new("RGB", (n, n), _pastel(rng))


def _gradient(rng: random.Random, n: int) -> Image.Image:
    dark = rng.random() < 0.4
    a, b = (_grey(rng, 10, 70), _grey(rng, 60, 120)) if dark else (_pastel(rng), _grey(rng, 170, 255))
    img = Image.new("RGB", (n, n))
    horizontal = rng.random() < 0.5
    for i in range(n):
        t = i / max(1, n - 1)
        c = tuple(int(a[k] * (1 - t) + b[k] * t) for k in range(3))
        box = (i, 0, i, n) if horizontal else (0, i, n, i)
        ImageDraw.Draw(img).line(box, fill=c)
    return img


def _grain(rng: random.Random, n: int) -> Image.Image:
    return _add_noise(rng, Image.new("RGB", (n, n), _grey(rng, 90, 200)), rng.uniform(10, 28), per_channel=False)


def _stripes(rng: random.Random, n: int) -> Image.Image:
    a = _pastel(rng)
    b = tuple(max(0, c - rng.randint(15, 40)) for c in a)
    img = Image.new("RGB", (n, n), a)
    draw = ImageDraw.Draw(img)
    width = rng.randint(2, max(2, n // 8))
    vertical = rng.random() < 0.5
    for i in range(0, n, 2 * width):
        draw.rectangle((i, 0, i + width - 1, n) if vertical else (0, i, n, i + width - 1), fill=b)
    return img


def _checker(rng: random.Random, n: int) -> Image.Image:
    a, b = _grey(rng, 190, 240), _pastel(rng)
    img = Image.new("RGB", (n, n), a)
    draw = ImageDraw.Draw(img)
    cell = rng.randint(3, max(3, n // 6))
    for y in range(0, n, cell):
        for x in range(0, n, cell):
            if (x // cell + y // cell) % 2:
                draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=b)
    return img


def _speckle(rng: random.Random, n: int) -> Image.Image:
    img = Image.new("RGB", (n, n), _grey(rng, 205, 250))
    draw = ImageDraw.Draw(img)
    for _ in range(n * n // 12):
        x, y = rng.randrange(n), rng.randrange(n)
        draw.point((x, y), fill=_grey(rng, 60, 160))
    return img


def _clutter(rng: random.Random, img: Image.Image) -> None:
    """Faint, colourless clutter: a few thin lines, dots or soft blobs near the background's brightness."""
    n = img.size[0]
    draw = ImageDraw.Draw(img)
    base = int(np.asarray(img).mean())
    tone = lambda: _grey(rng, max(0, base - 45), min(255, base + 45), tint=4)
    kind = rng.choice(("lines", "dots", "blobs"))
    if kind == "lines":
        for _ in range(rng.randint(2, 6)):
            draw.line(
                [(rng.randrange(n), rng.randrange(n)), (rng.randrange(n), rng.randrange(n))],
                fill=tone(),
                width=rng.randint(1, max(1, n // 24)),
            )
    elif kind == "dots":
        for _ in range(rng.randint(n // 2, 2 * n)):
            x, y = rng.randrange(n), rng.randrange(n)
            draw.point((x, y), fill=tone())
    else:
        for _ in range(rng.randint(1, 3)):
            x, y, r = rng.randrange(n), rng.randrange(n), rng.randint(n // 6, n // 3)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tone())


def _radial(rng: random.Random, n: int) -> Image.Image:
    inner, outer = _grey(rng, 215, 255), _grey(rng, 90, 150)
    c = (n - 1) / 2
    yy, xx = np.mgrid[0:n, 0:n]
    t = np.minimum(1.0, np.hypot(xx - c, yy - c) / (c * 1.42))[..., None]
    a = np.asarray(inner, dtype=np.float32) * (1 - t) + np.asarray(outer, dtype=np.float32) * t
    return Image.fromarray(a.astype(np.uint8))


# ---------------------------------------------------------------------------------------------
# Styles
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    """How an image is drawn: background, canvas sizes, outline share and widths, noise, tint, blur."""

    name: str
    background: Callable[[random.Random, int], Image.Image]
    sizes: tuple[int, ...] = (32,)
    outline_share: float = 0.0
    line_widths: tuple[int, ...] = (1, 2)  # at 32 px; scaled with the canvas
    noise: float = 0.0  # largest per-pixel noise (std) added after drawing
    tint: float = 0.0  # largest blend towards a random colour
    blur: float = 0.0  # largest Gaussian blur radius (at 32 px)
    clutter: float = 0.0  # probability of faint background clutter (lines, dots, blobs) under the content


STYLES: dict[str, Style] = {
    # training (and calibration) styles
    "paper": Style("paper", _plain(225, 255), sizes=(32, 40), noise=4, clutter=0.3),
    "slate": Style("slate", _plain(8, 70), sizes=(32, 48), outline_share=0.2, noise=4, clutter=0.3),
    "grey": Style("grey", _plain(110, 170), sizes=(32, 40), outline_share=0.3, clutter=0.3),
    "pastel": Style("pastel", _pastel_bg, sizes=(32, 48), outline_share=0.4, line_widths=(2,), clutter=0.3),
    "gradient": Style("gradient", _gradient, sizes=(32, 40, 48), clutter=0.3),
    "grain": Style("grain", _grain, sizes=(32,), noise=10),
    "outline": Style(
        "outline", _plain(150, 255), sizes=(40, 64), outline_share=1.0, line_widths=(1, 2, 3), clutter=0.3
    ),
    "large": Style("large", _plain(200, 255), sizes=(48, 64), outline_share=0.2, blur=0.6, clutter=0.3),
    "tinted": Style("tinted", _plain(180, 255), sizes=(32, 40), tint=0.2, clutter=0.3),
    # held out for the test split
    "stripes": Style("stripes", _stripes, sizes=(32, 48)),
    "night-outline": Style(
        "night-outline", _plain(0, 40), sizes=(40, 56), outline_share=1.0, line_widths=(2, 3), noise=6
    ),
    "speckle": Style("speckle", _speckle, sizes=(32, 40), outline_share=0.3),
    # held out for the independent check set
    "checker": Style("checker", _checker, sizes=(36, 48)),
    "radial": Style("radial", _radial, sizes=(32, 56), blur=0.5),
    "tinted-grain": Style("tinted-grain", _grain, sizes=(40,), noise=8, tint=0.15, outline_share=0.3),
}
TRAIN_STYLES = ("paper", "slate", "grey", "pastel", "gradient", "grain", "outline", "large", "tinted")
TEST_STYLES = ("stripes", "night-outline", "speckle")
UNSEEN_STYLES = ("checker", "radial", "tinted-grain")
STYLE_SETS = {
    "train": (TRAIN_STYLES, TRAIN_FONTS),
    "test": (TEST_STYLES, TEST_FONTS),
    "unseen": (UNSEEN_STYLES, UNSEEN_FONTS),
}


@functools.cache
def _font(name: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if name == "pillow":
        return ImageFont.load_default(size=size)
    try:
        import matplotlib
    except ImportError:  # pragma: no cover - matplotlib is a dependency of the testbed build
        raise InputError(
            "drawing the testbed's images needs matplotlib's fonts; pip install 'vlmsafe[probes]'"
        ) from None
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name
    if not path.is_file():
        raise InputError(f"font {name} is not in matplotlib's data folder {path.parent}; reinstall matplotlib")
    return ImageFont.truetype(str(path), size=size)


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


@dataclass
class ImageQA:
    """One synthetic image with the facts needed to ask about it."""

    image: Image.Image
    kind: str  # "shape" | "count" | "word"
    colour: str
    style: str
    shape: str | None = None
    count: int | None = None
    word: str | None = None

    def questions(self, rng: random.Random | None = None, phrasings: str = "train") -> list[tuple[str, str, str]]:
        """``(question, answer, reference)`` triples answerable only from the image (canonical phrasings,
        or random ones of the ``phrasings`` set with ``rng``; see :func:`image_questions`)."""
        return image_questions(
            self.kind, self.colour, self.shape, self.count, self.word, rng=rng, phrasings=phrasings
        )

    @property
    def caption(self) -> str:
        """The image's description (the answer to ``"describe the image ."``)."""
        return self.questions()[-1][1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], colour, width: int | None):
    x0, y0, x1, y1 = box
    kw = {"fill": colour} if width is None else {"outline": colour, "width": width}
    if shape == "circle":
        draw.ellipse(box, **kw)
    elif shape == "square":
        draw.rectangle(box, **kw)
    elif width is None:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:
        draw.line(
            [((x0 + x1) / 2, y0), (x1, y1), (x0, y1), ((x0 + x1) / 2, y0)], fill=colour, width=width, joint="curve"
        )


def _free_boxes(rng: random.Random, n: int, side: int, count: int) -> list[tuple[int, int, int, int]]:
    """``count`` non-overlapping square boxes of ``side`` pixels inside an ``n``-pixel canvas."""
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(200):
        x, y = rng.randint(1, n - side - 1), rng.randint(1, n - side - 1)
        box = (x, y, x + side, y + side)
        gap = max(1, n // 16)
        if all(x + side + gap < b[0] or b[2] + gap < x or y + side + gap < b[1] or b[3] + gap < y for b in boxes):
            boxes.append(box)
            if len(boxes) == count:
                return boxes
    cells = [(cx, cy) for cx in range(3) for cy in range(3)]  # fall back to a grid
    rng.shuffle(cells)
    cell = n // 3
    side = min(side, cell - 2)
    return [(cx * cell + 1, cy * cell + 1, cx * cell + 1 + side, cy * cell + 1 + side) for cx, cy in cells[:count]]


def _finish(rng: random.Random, img: Image.Image, style: Style) -> Image.Image:
    n = img.size[0]
    if style.blur:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, style.blur) * n / IMAGE_SIZE))
    if style.tint:
        img = Image.blend(img, Image.new("RGB", img.size, _pastel(rng)), rng.uniform(0.05, style.tint))
    if style.noise:
        img = _add_noise(rng, img, rng.uniform(0, style.noise), per_channel=True)
    return img


def _add_noise(rng: random.Random, img: Image.Image, sigma: float, per_channel: bool) -> Image.Image:
    """Gaussian pixel noise drawn from ``rng`` (through a numpy generator seeded by it)."""
    gen = np.random.default_rng(rng.getrandbits(32))
    a = np.asarray(img, dtype=np.float32)
    shape = a.shape if per_channel else (*a.shape[:2], 1)
    return Image.fromarray(np.clip(a + gen.normal(0.0, sigma, shape), 0, 255).astype(np.uint8))


def make_image(
    rng: random.Random, style: str, *, kind: str | None = None, fonts: tuple[str, ...] = TRAIN_FONTS
) -> ImageQA:
    """Draw one random image in ``style``: a shape, one to three shapes to count, or a word."""
    st = STYLES[style]
    kind = kind or rng.choice(("shape", "shape", "count", "word"))
    colour = rng.choice(sorted(COLOURS))
    fill = shade(rng, colour)
    n = rng.choice(st.sizes)
    scale = n / IMAGE_SIZE
    img = st.background(rng, n)
    if rng.random() < st.clutter:
        _clutter(rng, img)
    draw = ImageDraw.Draw(img)
    width = None
    if rng.random() < st.outline_share:
        width = max(1, round(rng.choice(st.line_widths) * scale))
    if kind == "word":
        word = rng.choice(WORDS)
        font_name = rng.choice(fonts)
        stroke = rng.choice((0, 0, 1)) if font_name != "pillow" else 0
        size = round(rng.randint(10, 15) * scale)
        while True:  # shrink until the word fits the canvas
            font = _font(font_name, size)
            left, top, right, bottom = draw.textbbox((0, 0), word, font=font, stroke_width=stroke)
            if (right - left <= n - 2 and bottom - top <= n - 2) or size <= 8:
                break
            size -= 1
        x = rng.randint(0, max(0, n - (right - left))) - left
        y = rng.randint(0, max(0, n - (bottom - top))) - top
        draw.text((x, y), word, fill=fill, font=font, stroke_width=stroke, stroke_fill=fill)
        return ImageQA(_finish(rng, img, st), kind, colour, style, word=word)
    shape = rng.choice(SHAPES)
    if kind == "shape":
        side = round(rng.randint(12, 24) * scale)
        box = _free_boxes(rng, n, side, 1)[0]
        _draw_shape(draw, shape, box, fill, width)
        return ImageQA(_finish(rng, img, st), kind, colour, style, shape=shape)
    count = rng.randint(1, 3)
    side = round(rng.randint(6, 9) * scale)
    for box in _free_boxes(rng, n, side, count):
        _draw_shape(draw, shape, box, fill, width)
    return ImageQA(_finish(rng, img, st), kind, colour, style, shape=shape, count=count)


def random_image(rng: random.Random, split: str) -> ImageQA:
    """An image in one of the styles (and fonts) of ``split`` (``"train"``, ``"test"`` or ``"unseen"``)."""
    styles, fonts = STYLE_SETS[split]
    return make_image(rng, rng.choice(styles), fonts=fonts)


def contentless_image(rng: random.Random) -> tuple[Image.Image, str]:
    """A blank image of a random plain colour or a noise image, with its kind (``"blank"``/``"noise"``)."""
    if rng.random() < 0.5:
        colour = _grey(rng, 0, 255, tint=30)
        return blank_image(rng.choice((32, 48)), colour), "blank"
    size = rng.choice((32, 40))
    return noise_image(size, rng.getrandbits(32)), "noise"
