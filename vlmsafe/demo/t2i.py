"""The "Safe-CLIP in a diffusers pipeline" section of ``vlmsafe demo``.

Protocol of the Safe-CLIP paper (Poppi et al., ECCV 2024, Sec. 5.3, Table 4): generate from unsafe
prompts with a Stable Diffusion pipeline, once with its own CLIP text encoder and once with the
Safe-CLIP one, and count the generations an image classifier calls inappropriate. Here the pipeline
is the bundled tiny testbed (``assets/t2i``, built by :mod:`vlmsafe.testbed.t2i`), the
prompts are held-out scene combinations that neither CLIP, Safe-CLIP nor the generator saw, and the
classifier is :class:`~vlmsafe.testbed.t2i_measure.SceneClassifier`. Where the paper only reports the unsafe
rate, the section also reports safe prompts' agreement, so a Safe-CLIP that broke safe generation
would show. The bundled Safe-CLIP adds the optional ``text_safe_tokens`` term to the paper's eight
(:mod:`vlmsafe.safeclip.losses`): it keeps safe prompts' per-token text states, which the UNet
cross-attends to, at the original's; trained without it, the Safe-CLIP encoder cost about 11 points of
safe-prompt agreement here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from vlmsafe.errors import FileFormatError
from vlmsafe.stats import Rate
from vlmsafe.testbed.t2i_measure import (
    CLASSIFIER_DIR,
    GRID_FILE,
    HEADS,
    INFO_FILE,
    PIPELINE_DIR,
    PROMPTS_FILE,
    SceneClassifier,
    generate,
    load_pipeline,
    score,
)

BUILD_COMMAND = "python -m vlmsafe.cli.build_t2i_testbed"


def resolve_dirs(
    assets_dir: str | os.PathLike[str], safeclip_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, Path]:
    """``(t2i_dir, safeclip_dir)`` from the repo's ``assets`` folder or ``assets/t2i`` itself.

    ``safeclip_dir`` defaults to the ``safeclip`` folder next to ``t2i``.
    """
    from vlmsafe.testbed.safeclip import resolve_assets_dir

    d = Path(assets_dir)
    t2i_dir = d / "t2i" if (d / "t2i" / PIPELINE_DIR).is_dir() else d
    if not (t2i_dir / PIPELINE_DIR).is_dir() or not (t2i_dir / CLASSIFIER_DIR).is_dir():
        raise FileFormatError(f"no text-to-image testbed in {d}; build it with `{BUILD_COMMAND} --out {d / 't2i'}`")
    return t2i_dir, resolve_assets_dir(safeclip_dir if safeclip_dir is not None else t2i_dir.parent / "safeclip")


def t2i_demo_section(
    assets_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    split: str = "test",
    seed: int = 0,
    safeclip_dir: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Unsafe-generation rate and safe-prompt agreement, original vs Safe-CLIP text encoder.

    ``assets_dir``: the repo's ``assets`` folder (holding ``t2i/`` and ``safeclip/``) or ``assets/t2i``;
    ``safeclip_dir``: the Safe-CLIP testbed (default: ``safeclip/`` next to ``t2i/``).
    Generates one image per prompt of ``split`` ("test": held-out combinations; "calibration") with
    the bundled pipeline, then again, from the same noise, after
    :func:`~vlmsafe.safeclip.integrations.apply_safe_text_encoder` put ``safeclip/safe``'s text tower in.
    Sampler settings are the ones the build chose on the calibration prompts with the original
    encoder. With ``out_dir``, a grid (prompts x before/after) is written there as ``safeclip_t2i_grid.png``.

    Returns ``{"rows", "per_concept", "settings", "classifier", "grid"}``; each row has ``encoder``,
    ``unsafe_rate`` and ``safe_agreement``, each ``{"rate", "ci95", "k", "n"}`` (:class:`vlmsafe.stats.Rate`).
    Format it with :func:`format_t2i_table`.
    """
    from vlmsafe.io import atomic_path, check_output
    from vlmsafe.reading import read_json
    from vlmsafe.safeclip.integrations import apply_safe_text_encoder
    from vlmsafe.validation import check_choice

    check_choice(split, "split", ("test", "calibration"))
    t2i_dir, safeclip_dir = resolve_dirs(assets_dir, safeclip_dir)
    fix = f"rebuild it with `{BUILD_COMMAND}`"
    info = read_json(t2i_dir / INFO_FILE, what="text-to-image testbed build info", fix=fix)
    prompts = read_json(t2i_dir / PROMPTS_FILE, what="text-to-image testbed prompts", fix=fix)[split]
    settings = dict(info["generation"])
    grid_path = None
    if out_dir is not None:
        grid_path = check_output(Path(out_dir) / GRID_FILE, kind="file", overwrite=overwrite, option="grid")
    clf = SceneClassifier.load(t2i_dir / CLASSIFIER_DIR)
    pipe = load_pipeline(t2i_dir / PIPELINE_DIR)
    items = list(prompts["unsafe"]) + list(prompts["safe"])
    texts = [p["prompt"] for p in items]
    images = {"original": generate(pipe, texts, seed=seed, **settings)}
    apply_safe_text_encoder(pipe, safeclip_dir / "safe")
    images["Safe-CLIP"] = generate(pipe, texts, seed=seed, **settings)

    n_unsafe = len(prompts["unsafe"])
    rows, per_concept = [], {}
    for name, imgs in images.items():
        verdict = score(clf, imgs, items)
        unsafe_hits = verdict["unsafe"][:n_unsafe]
        rows.append(
            {
                "encoder": name,
                "unsafe_rate": Rate(sum(unsafe_hits), n_unsafe).to_dict(),
                "safe_agreement": Rate(sum(verdict["agrees"][n_unsafe:]), len(items) - n_unsafe).to_dict(),
                "safe_prompts_unsafe": Rate(sum(verdict["unsafe"][n_unsafe:]), len(items) - n_unsafe).to_dict(),
            }
        )
        per_concept[name] = {
            c: Rate(
                sum(u for u, p in zip(unsafe_hits, items) if p["concept"] == c),
                sum(p["concept"] == c for p in items[:n_unsafe]),
            ).to_dict()
            for c in HEADS["concept"][1:]
        }
    section: dict[str, Any] = {
        "rows": rows,
        "per_concept": per_concept,
        "settings": {
            **settings,
            "split": split,
            "seed": seed,
            "prompts": {"unsafe": n_unsafe, "safe": len(items) - n_unsafe},
        },
        "classifier": info.get("classifier_heldout"),
        "grid": None,
    }
    if grid_path is not None:
        picks = grid_rows(items, n_unsafe)
        grid = draw_grid(
            [texts[i] for i in picks], [images["original"][i] for i in picks], [images["Safe-CLIP"][i] for i in picks]
        )
        with atomic_path(grid_path, overwrite=overwrite) as tmp:
            grid.save(tmp, format="PNG")
        section["grid"] = str(grid_path)
    return section


def grid_rows(items: Sequence[dict[str, str]], n_unsafe: int, per_concept: int = 2, safe: int = 2) -> list[int]:
    """Indices of the first ``per_concept`` prompts of each unsafe concept, then the first ``safe`` safe prompts."""
    picks: list[int] = []
    for c in HEADS["concept"][1:]:
        picks += [i for i in range(n_unsafe) if items[i]["concept"] == c][:per_concept]
    return picks + list(range(n_unsafe, min(len(items), n_unsafe + safe)))


def draw_grid(
    prompts: Sequence[str], before: Sequence[torch.Tensor], after: Sequence[torch.Tensor], *, zoom: int = 3
) -> Any:
    """A PIL image: one row per prompt (text, original-encoder image, Safe-CLIP image)."""
    from PIL import Image, ImageDraw

    size = before[0].shape[-1] * zoom
    text_w, pad, head = 300, 6, 22
    grid = Image.new("RGB", (text_w + 2 * (size + pad) + pad, head + len(prompts) * (size + pad) + pad), "white")
    d = ImageDraw.Draw(grid)
    d.text((text_w + pad, 5), "original", fill="black")
    d.text((text_w + size + 2 * pad, 5), "Safe-CLIP", fill="black")
    for r, (text, b, a) in enumerate(zip(prompts, before, after)):
        y = head + r * (size + pad)
        d.text((pad, y + size // 2 - 6), text, fill="black")
        for col, img in enumerate((b, a)):
            tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((size, size), Image.NEAREST)
            grid.paste(tile, (text_w + pad + col * (size + pad), y))
    return grid


def _cell(r: dict[str, Any]) -> str:
    return f"{Rate(r['k'], r['n'])} k={r['k']}"


def format_t2i_table(section: dict[str, Any]) -> str:
    """The section as a text table: rates in percent with their 95% Wilson intervals and counts."""
    lines = [
        "Safe-CLIP in a diffusers pipeline (tiny testbed, held-out prompts)",
        f"{'text encoder':<13} {'unsafe generations, unsafe prompts':<38} agreement, safe prompts",
    ]
    for row in section["rows"]:
        lines.append(f"{row['encoder']:<13} {_cell(row['unsafe_rate']):<38} {_cell(row['safe_agreement'])}")
    clf = (section.get("classifier") or {}).get("drawn", {}).get("safe_vs_unsafe")
    if clf:
        lines.append(f"classifier safe-vs-unsafe accuracy on held-out drawn scenes: {_cell(clf)}")
    return "\n".join(lines)
