"""Batched collection of per-prompt hidden states, text-only, multimodal or CMRM-steered.

Everything the probes and the shift analysis read goes through :func:`collect_activations`:
one row per prompt and layer, the mean over the read ``positions`` (the last prompt token by
default), float32 numpy on the CPU. Images are opened one batch at a time, so memory stays
bounded by the batch, not the data set.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from vlmsafe import __version__
from vlmsafe.activations import record_activations
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.errors import InputError
from vlmsafe.steering import ShiftVectors, steer, steer_sample_level
from vlmsafe.data import as_pair
from vlmsafe.steering.vectors import vectors_from_means

#: Positions a probe may read (a mean over them per prompt); see :mod:`vlmsafe.activations`.
READ_POSITIONS = ("last", "prompt", "text")

Activations = dict[int, np.ndarray]


@dataclass
class Steering:
    """CMRM steering applied while collecting: ``h_l <- h_l - alpha * shift_l``.

    Dataset-level (default): ``shift_l = vectors[l]``; ``layers=None`` steers every layer the
    vectors hold (as ``vlmsafe generate`` does). Sample-level (``sample_level=True``, no vectors):
    each prompt's shift is measured from its own text-only counterpart during the forward pass
    (one extra text-only pass per batch); ``layers=None`` then steers every layer.
    """

    vectors: ShiftVectors | None = None
    alpha: float = 1.0
    layers: Sequence[int] | str | None = None
    positions: str = "last"
    sample_level: bool = False

    def __post_init__(self) -> None:
        if self.vectors is None and not self.sample_level:
            raise InputError("dataset-level steering needs CMRM vectors; pass vectors=... or sample_level=True")

    def describe(self) -> dict[str, Any]:
        if isinstance(self.layers, str) or self.layers is None:
            layers: Any = self.layers if self.layers is not None or self.vectors is None else self.vectors.layers
        else:
            layers = list(self.layers)
        return {
            "mode": "sample-level" if self.sample_level else "dataset-level",
            "alpha": self.alpha,
            "layers": "all" if layers is None else layers,
            "positions": self.positions,
            "vectors_source": None if self.sample_level else vectors_source(self.vectors),
        }


def vectors_source(vectors: ShiftVectors) -> str:
    """Where CMRM vectors came from, for reports: set by :func:`vectors_from_activations`, else the user's."""
    if vectors.meta.get("source"):
        return str(vectors.meta["source"])
    data = vectors.meta.get("calibration_data")
    return f"user vectors (calibrated on {data})" if data else "user vectors"


def blank_image(size: int = 336, color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A uniform image: the CMRM paper's simplest image, enough to shift the representations."""
    return Image.new("RGB", (size, size), color)


@torch.no_grad()
def collect_activations(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    *,
    with_images: bool,
    layers: Sequence[int] | str | None = None,
    positions: str = "last",
    image: Image.Image | None = None,
    steering: Steering | None = None,
    batch_size: int = 8,
    system_prompt: str | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> Activations:
    """Hidden states ``{layer: (n_items, hidden)}`` for ``items`` at ``layers``.

    Args:
        items: anything :func:`vlmsafe.steering.items.as_pair` reads: ``EvalItem``, ``(prompt,
            image)`` tuples, ``{"prompt", "image"}`` dicts.
        with_images: ``False`` builds each item's text-only counterpart (its image is dropped);
            ``True`` feeds the image, which every item must then have unless ``image`` is given.
        image: if given (and ``with_images``), used for every item instead of its own image,
            e.g. :func:`blank_image` to reproduce the paper's blank-image setting.
        steering: CMRM steering applied during the forward pass (the recording hooks see the
            steered stream).
        positions: ``"last"`` prompt token, or the mean over all ``"prompt"`` / ``"text"`` tokens.
    """
    if positions not in READ_POSITIONS:
        raise InputError(f"unknown read positions {positions!r}; use one of {READ_POSITIONS}")
    adapter: ModelAdapter = get_adapter(model, processor)
    if with_images and not adapter.supports_images:
        raise InputError(f"{type(adapter.model).__name__} is text-only; collect with with_images=False or use a VLM")
    layer_ids = adapter.resolve_layers(layers)
    if steering is not None and steering.vectors is not None and not steering.sample_level:
        steering.vectors.check_compatible(adapter)
    if not len(items):
        raise InputError("no items to collect activations from; pass at least one prompt")
    chunks: dict[int, list[np.ndarray]] = {l: [] for l in layer_ids}
    bar = tqdm(total=len(items), desc=desc or ("multimodal" if with_images else "text-only"), unit="prompt", disable=not progress)
    for start in range(0, len(items), batch_size):
        batch = [_pair(it, with_images, image) for it in items[start : start + batch_size]]
        prompts = [p for p, _ in batch]
        images = [img for _, img in batch] if with_images else None
        inputs = adapter.build_inputs(prompts, images, padding_side="left", system_prompt=system_prompt)
        with _steering(adapter, steering, prompts, system_prompt), record_activations(adapter, layer_ids, positions=positions) as rec:
            adapter.model(**inputs)
        for l in layer_ids:
            chunks[l].append(rec.per_row_mean(l, len(batch)).numpy())
        bar.update(len(batch))
    bar.close()
    return {l: np.concatenate(chunks[l]).astype(np.float32, copy=False) for l in layer_ids}


def _pair(item: Any, with_images: bool, override: Image.Image | None) -> tuple[str, Image.Image | None]:
    if not with_images:
        return _prompt(item), None  # text-only: never open the image file
    if override is not None:
        return _prompt(item), override
    prompt, img = as_pair(item)
    if img is None:
        raise InputError(
            f"item {getattr(item, 'id', prompt[:40])!r} has no image, but a multimodal pass needs one; "
            "add an image to every item or use a blank image (--blank-image / image=blank_image())"
        )
    return prompt, img


def _prompt(item: Any) -> str:
    if isinstance(item, (tuple, list)):
        prompt = item[0] if item else None
    elif isinstance(item, dict):
        prompt = item.get("prompt")
    else:
        prompt = getattr(item, "prompt", None)
    if not isinstance(prompt, str):
        raise InputError(f"cannot read a prompt from {type(item).__name__}; pass EvalItems, (prompt, image) tuples or dicts")
    return prompt


@contextlib.contextmanager
def _steering(adapter: ModelAdapter, steering: Steering | None, prompts: list[str], system_prompt: str | None) -> Iterator[None]:
    if steering is None:
        yield
        return
    layers = None if steering.layers is None else adapter.resolve_layers(steering.layers)
    if not steering.sample_level:
        with steer(adapter, steering.vectors, steering.alpha, layers=layers, positions=steering.positions):
            yield
        return
    # sample-level: the text-only counterparts' last-token states are the per-row targets
    layers = adapter.resolve_layers(layers)
    text_inputs = adapter.build_inputs(prompts, None, padding_side="left", system_prompt=system_prompt)
    with record_activations(adapter, layers, positions="last") as rec:
        adapter.model(**text_inputs)
    states = {l: rec.activations[l] for l in layers}
    with steer_sample_level(adapter, states, steering.alpha, positions=steering.positions):
        yield


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
    count = int(next(iter(mm.values())).shape[0])
    if count == 0:
        raise InputError("no calibration rows; pass at least one item with an image")
    mm64 = {l: torch.from_numpy(np.asarray(mm[l], dtype=np.float64)) for l in layers}
    text64 = {l: torch.from_numpy(np.asarray(text[l], dtype=np.float64)) for l in layers}
    meta = {
        "method": "cmrm",
        "model_class": type(adapter.model).__name__,
        "model_name": adapter.model_name,
        "family": adapter.family,
        "hidden_size": adapter.hidden_size,
        "num_layers": adapter.num_layers,
        "layers": layers,
        "positions": positions,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "num_items": count,
        "source": source,
        "vlmsafe_version": __version__,
    }
    return vectors_from_means(
        {l: mm64[l].sum(0) for l in layers},
        {l: text64[l].sum(0) for l in layers},
        {l: float((mm64[l] - text64[l]).norm(dim=1).sum()) for l in layers},
        {l: float(mm64[l].norm(dim=1).sum()) for l in layers},
        {l: float(text64[l].norm(dim=1).sum()) for l in layers},
        count,
        meta,
    )
