"""Batched collection of per-prompt hidden states, text-only, multimodal or CMRM-steered.

Everything the probes and the shift analysis read goes through :func:`collect_activations`:
one row per prompt and layer, the mean over the read ``positions`` (the last prompt token by
default), float32 numpy on the CPU. Images are opened one batch at a time, so memory stays
bounded by the batch, not the data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vlmsafe.activations import record_activations
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.data import as_pair, prompt_of
from vlmsafe.errors import InputError
from vlmsafe.options import bool_option, check_options, choice_option, int_option, with_overrides
from vlmsafe.steering import ShiftAccumulator, ShiftVectors, SteeringConfig, calibration_meta

#: Positions a probe may read (a mean over them per prompt); see :mod:`vlmsafe.activations`.
READ_POSITIONS = ("last", "prompt", "text")

Activations = dict[int, np.ndarray]


def vectors_source(vectors: ShiftVectors) -> str:
    """Where CMRM vectors came from, for reports: set by :func:`vectors_from_activations`, else the user's."""
    if vectors.meta.get("source"):
        return str(vectors.meta["source"])
    data = vectors.meta.get("calibration_data")
    return f"user vectors (calibrated on {data})" if data else "user vectors"


@dataclass
class ReadOptions:
    """What :func:`collect_activations` reads and how: one object that the analyses pass on whole.

    Attributes:
        layers: layer indices, a preset name or ``None`` (every layer), resolved by the model's adapter.
        positions: ``"last"`` prompt token, or the mean over all ``"prompt"`` / ``"text"`` tokens.
        image: used (in multimodal passes) for every item instead of its own image, e.g.
            :func:`vlmsafe.images.blank_image` to reproduce the paper's blank-image setting.
        batch_size: prompts per forward pass.
        progress: show a progress bar.
    """

    layers: Sequence[int] | str | None = None
    positions: str = choice_option("last", READ_POSITIONS, "token positions whose mean is read per prompt")
    image: Image.Image | None = None
    batch_size: int = int_option(8, "prompts per forward pass")
    progress: bool = bool_option(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_options(self)


@torch.no_grad()
def collect_activations(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    *,
    with_images: bool,
    read: ReadOptions | None = None,
    steering: SteeringConfig | None = None,
    system_prompt: str | None = None,
    desc: str | None = None,
    **overrides: Any,
) -> Activations:
    """Hidden states ``{layer: (n_items, hidden)}`` for ``items`` at ``read.layers``.

    Args:
        items: anything :func:`vlmsafe.data.as_pair` reads: ``Item``, ``(prompt,
            image)`` tuples, ``{"prompt", "image"}`` dicts.
        with_images: ``False`` builds each item's text-only counterpart (its image is dropped);
            ``True`` feeds the image, which every item must then have unless ``read.image`` is given.
        read: layers, positions, image override, batch size and progress (:class:`ReadOptions`); its fields may
            also be given as keywords (``batch_size=2``, ``progress=False``), which replace those of ``read``.
        steering: CMRM steering applied during the forward pass (the recording hooks see the
            steered stream).
    """
    read = with_overrides(ReadOptions, read, overrides)
    positions, image, batch_size = read.positions, read.image, read.batch_size
    adapter: ModelAdapter = get_adapter(model, processor)
    if with_images and not adapter.supports_images:
        raise InputError(f"{type(adapter.model).__name__} is text-only; collect with with_images=False or use a VLM")
    layer_ids = adapter.resolve_layers(read.layers)
    if steering is not None:
        steering.check_model(adapter)
    if not len(items):
        raise InputError("no items to collect activations from; pass at least one prompt")
    chunks: dict[int, list[np.ndarray]] = {l: [] for l in layer_ids}
    bar = tqdm(total=len(items), desc=desc or ("multimodal" if with_images else "text-only"), unit="prompt",
               disable=not read.progress)
    for start in range(0, len(items), batch_size):
        batch = [_pair(it, with_images, image) for it in items[start : start + batch_size]]
        prompts = [p for p, _ in batch]
        images = [img for _, img in batch] if with_images else None
        inputs = adapter.build_inputs(prompts, images, padding_side="left", system_prompt=system_prompt)
        ctx = (steering.apply(adapter, prompts=prompts, images=images, system_prompt=system_prompt) if steering
               else nullcontext())
        with ctx, record_activations(adapter, layer_ids, positions=positions) as rec:
            adapter.model(**inputs)
        for l in layer_ids:
            chunks[l].append(rec.per_row_mean(l, len(batch)).numpy())
        bar.update(len(batch))
    bar.close()
    return {l: np.concatenate(chunks[l]).astype(np.float32, copy=False) for l in layer_ids}


def _pair(item: Any, with_images: bool, override: Image.Image | None) -> tuple[str, Image.Image | None]:
    if not with_images:
        return prompt_of(item), None  # text-only: never open the image file
    if override is not None:
        return prompt_of(item), override
    prompt, img = as_pair(item)
    if img is None:
        raise InputError(
            f"item {getattr(item, 'id', prompt[:40])!r} has no image, but a multimodal pass needs one; "
            "add an image to every item or use a blank image (`image=blank_image()`)"
        )
    return prompt, img


def vectors_from_activations(
    adapter: ModelAdapter,
    mm: Activations,
    text: Activations,
    *,
    positions: str,
    source: str,
) -> ShiftVectors:
    """Dataset-level CMRM vectors from already-collected paired activations.

    Equal to :func:`vlmsafe.steering.calibrate` on the same items and positions, without
    running the model again.
    """
    layers = sorted(mm)
    if sorted(text) != layers:
        raise InputError("multimodal and text-only activations cover different layers")
    if int(next(iter(mm.values())).shape[0]) == 0:
        raise InputError("no calibration rows; pass at least one item with an image")
    sums = ShiftAccumulator(layers, adapter.hidden_size)
    sums.add({l: torch.from_numpy(np.asarray(mm[l])) for l in layers},
             {l: torch.from_numpy(np.asarray(text[l])) for l in layers})
    meta = calibration_meta(adapter, layers=layers, positions=positions, source=source)
    return sums.to_vectors(meta)
