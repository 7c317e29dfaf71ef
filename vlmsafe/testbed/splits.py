"""Writing and reading the testbed's held-out splits: ``<split>.jsonl`` + ``images/<split>/*.png``.

A record is ``{"id", "prompt", "image", "category", "label", "reference", "task", "template",
"style"}``: ``image`` is relative to the JSONL file, ``task`` is the requested task of an
instruction (``None`` for image questions), ``reference`` the answer words of an image question,
``template`` the prompt template, ``style`` the image's drawing style (``blank`` / ``noise``
for images without content), and for image questions ``question`` (the question kind, e.g.
``colour_shape``) and ``phrasing`` (``trained`` or ``held-out``). :func:`vlmsafe.data.load_items`
reads them (extra keys go to ``Item.meta``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

RECORD_KEYS = ("category", "label", "reference", "task", "template", "style", "question", "phrasing")


def write_split(out_dir: Path, split: str, items: Sequence[tuple[dict, Image.Image]]) -> Path:
    """Write ``items`` (record, image) as ``out_dir/<split>.jsonl`` with PNGs under ``out_dir/images/<split>``."""
    img_dir = out_dir / "images" / split
    img_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (rec, img) in enumerate(items):
        rid = f"{split}-{i:04d}"
        rel = f"images/{split}/{rid}.png"
        img.save(out_dir / rel, optimize=True)
        lines.append(
            json.dumps({"id": rid, "prompt": rec["prompt"], "image": rel, **{k: rec.get(k) for k in RECORD_KEYS}})
        )
    path = out_dir / f"{split}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
