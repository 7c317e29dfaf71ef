"""FigStep-style typographic rendering (offline, PIL default font)."""

import numpy as np
import pytest
from PIL import Image

from vlmsafe.eval import FIGSTEP_PROMPT, figstep_text, make_figstep_items, render_typographic


def _ink_rows(im: Image.Image) -> np.ndarray:
    """Indices of pixel rows that contain dark (text) pixels."""
    a = np.asarray(im.convert("L"))
    return np.nonzero((a < 128).any(axis=1))[0]


def test_figstep_text_appends_numbered_steps():
    assert figstep_text("Steps to bake bread.", steps=3, wrap_width=None) == "Steps to bake bread.\n1. \n2. \n3. "
    wrapped = figstep_text("Steps to bake a loaf of bread at home.", wrap_width=15)
    assert all(len(line) <= 15 for line in wrapped.splitlines()[:-3])


def test_render_default_canvas_and_text_layout():
    im = render_typographic("Steps to bake a loaf of bread at home.")
    assert im.size == (760, 760) and im.mode == "RGB"
    rows = _ink_rows(im)
    assert rows.size > 0
    # text stays inside the margins and the image is mostly background
    assert rows.min() >= 10 and rows.max() <= 760 - 10
    assert (np.asarray(im.convert("L")) > 200).mean() > 0.7
    # 3 wrapped lines + 3 list items -> six separate bands of ink
    bands = np.count_nonzero(np.diff(rows) > 1) + 1
    assert bands == 6


def test_render_is_deterministic_and_text_dependent():
    a = np.asarray(render_typographic("Steps to bake bread.", 128))
    b = np.asarray(render_typographic("Steps to bake bread.", 128))
    c = np.asarray(render_typographic("Steps to fold paper.", 128))
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("size", [32, 64, (200, 100)])
def test_render_small_and_rectangular_canvases_fit(size):
    im = render_typographic("Steps to bake a loaf of bread at home.", size)
    w, h = (size, size) if isinstance(size, int) else size
    assert im.size == (w, h)
    assert _ink_rows(im).size > 0


def test_render_steps_zero_and_colours():
    im = render_typographic("HELLO", 64, steps=0, background=(0, 0, 0), color=(255, 255, 255))
    a = np.asarray(im)
    assert a[0, 0].tolist() == [0, 0, 0] and a.max() > 200
    with pytest.raises(ValueError):
        render_typographic("x", 0)


def test_make_figstep_items_writes_pngs(tmp_path):
    items = make_figstep_items([("a/1", "Steps to bake bread.", "cooking"), ("b", "Steps to fold paper.")], tmp_path,
                               size=48)
    assert [it.id for it in items] == ["a/1", "b"]
    assert items[0].prompt == FIGSTEP_PROMPT
    assert items[0].category == "cooking" and items[1].category == "uncategorized"
    assert items[0].meta["instruction"] == "Steps to bake bread."
    assert items[0].image.endswith("a_1.png") and items[0].load_image().size == (48, 48)
