"""ShiftDC's captions and text-only counterparts: the model captions an image for its request, and the counterpart
of (prompt, image) is the prompt followed by that caption."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.steering.choices import with_options
from vlmsafe.steering.shiftdc.config import CaptionConfig

#: The reference code's text-only counterpart (``ANSWER_Q_BASED_ON_CAPTION``).
COUNTERPART_TEMPLATE = "{prompt} Image Caption: {caption}"


def counterpart_prompt(prompt: str, caption: str) -> str:
    """The text-only counterpart of (prompt, image): the prompt followed by the image's caption."""
    return COUNTERPART_TEMPLATE.format(prompt=prompt.strip(), caption=caption.strip())


@torch.no_grad()
def generate_captions(
    model: nn.Module | ModelAdapter,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    config: CaptionConfig | None = None,
    *,
    progress: bool = False,
    **options: Any,
) -> list[str]:
    """Caption each image with the model itself, greedily, from ``instruction`` (``{prompt}`` = the request).

    ``config`` (:class:`CaptionConfig`) holds the options, or pass its fields as keyword arguments
    (``instruction``, ``max_new_tokens``, ``batch_size``, ``system_prompt``).
    """
    cfg: CaptionConfig = with_options(config, options, CaptionConfig())
    adapter = get_adapter(model, processor)
    return _captions(adapter, prompts, images, cfg, progress)


def _captions(adapter: ModelAdapter, prompts: Sequence[str], images: Sequence[Image.Image], cfg: CaptionConfig,
              progress: bool = False) -> list[str]:
    if len(prompts) != len(images) or any(img is None for img in images):
        raise InputError(
            f"captions need one image per prompt; got {len(prompts)} prompts and images {list(images)!r:.80}"
        )
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    out: list[str] = []
    bar = tqdm(total=len(prompts), desc="captioning", unit="image", disable=not progress)
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = [cfg.instruction.format(prompt=p) for p in prompts[start : start + cfg.batch_size]]
        inputs = adapter.build_inputs(
            chunk, list(images[start : start + cfg.batch_size]), system_prompt=cfg.system_prompt, padding_side="left"
        )
        ids = adapter.model.generate(
            **inputs, do_sample=False, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
        out.extend(adapter.decode(ids[:, inputs["input_ids"].shape[1] :]))
        bar.update(len(chunk))
    bar.close()
    return out


def read_caption_cache(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{id: caption}`` from a ``captions.jsonl`` written with ShiftDC directions (to reuse its captions)."""
    from vlmsafe.data import read_records

    out: dict[str, str] = {}
    for where, rec in read_records(path, what="caption cache"):
        if not isinstance(rec.get("caption"), str) or "id" not in rec:
            raise FileFormatError(
                f"{where}: a caption cache line needs 'id' and 'caption'; use the captions.jsonl "
                "that calibrate_shiftdc writes (`vlmsafe calibrate` with method shiftdc)"
            )
        out[str(rec["id"])] = rec["caption"]
    return out


__all__ = ["COUNTERPART_TEMPLATE", "counterpart_prompt", "generate_captions", "read_caption_cache"]
