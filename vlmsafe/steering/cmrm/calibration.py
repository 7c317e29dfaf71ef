"""CMRM calibration: dataset-level shift vectors, per-input shifts for analysis, and text-only safety directions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmsafe.activations import record_activations
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.data import prompt_of
from vlmsafe.distributed import gather, is_main_process, shard
from vlmsafe.errors import InputError
from vlmsafe.steering.anchors import anchor_image
from vlmsafe.steering.choices import CALIBRATION_POSITIONS, TEXT_READ_POSITIONS, with_options
from vlmsafe.steering.cmrm.aggregation import ShiftAccumulator
from vlmsafe.steering.cmrm.config import CMRMCalibration, check_read_positions
from vlmsafe.steering.items import DatasetHasher, batched
from vlmsafe.steering.vectors import ShiftVectors, calibration_meta


@torch.no_grad()
def calibrate(
    model: nn.Module | ModelAdapter,
    processor: Any,
    items: Iterable[Any],
    config: CMRMCalibration | None = None,
    *,
    progress: bool = True,
    accelerator: Any | None = None,
    **options: Any,
) -> ShiftVectors:
    """Calibrate dataset-level CMRM vectors on (prompt, image) ``items``.

    ``config`` (:class:`~vlmsafe.steering.cmrm.CMRMCalibration`) holds the options, or pass its fields as
    keyword arguments (``layers="8-15"``, ``anchor="blank"``, ``aggregate=first_principal_component``, ...).

    Each item is run twice, with an image and as its text-only counterpart; per layer, the
    item's activation is its mean over the read ``positions``: the ``"last"`` prompt token
    (default) or the prompt's ``"text"`` tokens (image tokens excluded on the multimodal side:
    they have no text-only counterpart). Sums are accumulated in float64
    (:class:`ShiftAccumulator`), so results are
    deterministic and bf16/fp16 models calibrate as precisely as fp32 ones allow.

    ``anchor`` picks the image (:mod:`vlmsafe.steering.anchors`): ``"real"``, each item's own
    image; ``"blank"`` (in ``anchor_colour``) or ``"noise"`` (from ``anchor_seed``), one
    meaningless image at the processor's input size for every item, as in the CMRM paper; or a
    PIL image. With a fixed anchor the items' images are never opened (they may have none), and
    the vectors depend on the prompts alone.

    ``aggregate``: the mean of the per-item shifts (:func:`~vlmsafe.steering.cmrm.aggregation.mean_shift`,
    default), their first principal component oriented and scaled by the mean
    (:func:`~vlmsafe.steering.cmrm.aggregation.first_principal_component`; keeps every item's shift in memory), or any
    function ``fn(per_item_shifts, mean) -> vector`` (recorded as ``"custom:<name>"``); the names ``"mean"`` and
    ``"pca"`` stand for the first two (:data:`~vlmsafe.steering.cmrm.aggregation.AGGREGATORS`). Anchor and aggregation
    are recorded in ``vectors.meta``.

    With an ``accelerate.Accelerator`` of several processes (``accelerate launch`` / ``torchrun``),
    each process runs a contiguous shard of ``items`` and the sums are all-reduced: every process
    returns the same vectors, equal to a single-process run up to float64 summation order, with
    the same calibration-set hash.
    """
    cfg: CMRMCalibration = with_options(config, options, CMRMCalibration())  # refused before any model work
    adapter = get_adapter(model, processor)
    if not adapter.supports_images:
        raise InputError(
            f"{type(adapter.model).__name__} is text-only: CMRM calibration needs a vision-language model"
        )
    layer_ids = adapter.resolve_layers(cfg.layers)
    fixed, anchor_meta = anchor_image(adapter, cfg.anchor, colour=cfg.anchor_colour, seed=cfg.anchor_seed)
    items = list(items) if fixed is None else [(prompt_of(it), fixed) for it in items]  # fixed anchor: prompts only
    sums = ShiftAccumulator(layer_ids, adapter.hidden_size, keep_items=cfg.keeps_items)
    hasher = DatasetHasher()
    with shard(items, accelerator) as part:
        bar = tqdm(total=len(part), desc="calibrating CMRM", unit="item",
                   disable=not (progress and is_main_process(accelerator)))
        for batch in batched(part, cfg.batch_size):
            _calibration_batch(adapter, batch, layer_ids, cfg, sums, hasher, hash_images=fixed is None)
            bar.update(len(batch))
        bar.close()
    sums.all_reduce(accelerator)
    if sums.count == 0:
        raise InputError("no calibration items were given; pass at least one (prompt, image) pair")
    digests = gather(hasher.item_digests, accelerator)  # process order = shard order = item order
    meta = calibration_meta(adapter, layers=layer_ids, positions=cfg.positions, system_prompt=cfg.system_prompt,
                            calibration_sha256=hasher.hexdigest(digests), **anchor_meta)
    return sums.to_vectors(meta, aggregate=cfg.aggregate)


def _calibration_batch(adapter: ModelAdapter, batch: list, layer_ids: list[int], cfg: CMRMCalibration,
                       sums: ShiftAccumulator, hasher: DatasetHasher, hash_images: bool = True) -> None:
    """Run one batch with and without its images and add the paired activations to ``sums``."""
    prompts = [p for p, _ in batch]
    images = [img for _, img in batch]
    if any(img is None for img in images):
        raise InputError("every calibration item needs an image (CMRM measures the shift an image causes); "
                         "or calibrate on a fixed anchor image (anchor='blank' / 'noise'), which needs prompts only")
    for prompt, image in batch:
        hasher.update(prompt, image if hash_images else None)
    mm_inputs, text_inputs = adapter.build_pair(prompts, images, system_prompt=cfg.system_prompt)
    read = lambda inputs: _read(adapter, inputs, layer_ids, cfg.positions)
    sums.add(read(mm_inputs), read(text_inputs))


def _read(adapter: ModelAdapter, inputs: dict, layers: list[int], positions: str) -> dict[int, torch.Tensor]:
    """Per-row activation (mean over the read positions) at each layer: ``{layer: (B, H)}``."""
    with record_activations(adapter, layers, positions=positions) as rec:
        adapter.model(**inputs)
    B = inputs["input_ids"].shape[0]
    return {l: rec.per_row_mean(l, B) for l in layers}


@torch.no_grad()
def compute_sample_shifts(
    model: nn.Module | ModelAdapter,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Any],
    *,
    layers: int | Sequence[int] | str | None = None,
    positions: str = "last",
) -> dict[int, torch.Tensor]:
    """Per-input shifts ``{layer: (B, H)}`` from two separate, unsteered forward passes.

    For analysis; sample-level steering computes the same quantity during generation with one extra
    (text-only) pass.
    """
    check_read_positions(positions, CALIBRATION_POSITIONS, "compute_sample_shifts")
    adapter = get_adapter(model, processor)
    layer_ids = adapter.resolve_layers(layers)
    mm_inputs, text_inputs = adapter.build_pair(list(prompts), list(images))
    mm = _read(adapter, mm_inputs, layer_ids, positions)
    text = _read(adapter, text_inputs, layer_ids, positions)
    return {l: mm[l] - text[l] for l in layer_ids}


def _labelled_prompts(items: Iterable[Any]) -> list[tuple[str, str]]:
    """``(prompt, label)`` of items labelled ``"harmful"`` / ``"benign"`` (attribute or dict key), else refused."""
    labelled = []
    for item in items:
        label = item.get("label") if isinstance(item, dict) else getattr(item, "label", None)
        prompt = item.get("prompt") if isinstance(item, dict) else getattr(item, "prompt", None)
        if label not in ("harmful", "benign") or not isinstance(prompt, str):
            raise InputError(f"safety_directions needs items with a prompt and label 'harmful' or 'benign', "
                             f"got {item!r:.80}")
        labelled.append((prompt, label))
    return labelled


@torch.no_grad()
def safety_directions(model: nn.Module | ModelAdapter, processor: Any, items: Iterable[Any], *,
                      layers: int | Sequence[int] | str | None = None, positions: str = "last",
                      batch_size: int = 8) -> dict[int, torch.Tensor]:
    """Per-layer safety direction: mean text-only state of benign items minus that of harmful ones.

    The sign is vlmsafe's one convention for safety directions, ShiftDC's (:class:`SafetyDirections`: benign
    minus harmful, as in Zou et al.'s reference code). Projections (:meth:`ShiftVectors.project_onto`) do not
    depend on it; a reader comparing the two kinds of direction can rely on it.

    ``items`` need a ``label`` (``"harmful"``/``"benign"``; attribute or dict key); images are
    ignored (the direction lives in the text-only space the LLM was aligned in).
    """
    check_read_positions(positions, TEXT_READ_POSITIONS, "safety_directions")
    adapter = get_adapter(model, processor)
    layer_ids = adapter.resolve_layers(layers)
    zeros = lambda: {l: torch.zeros(adapter.hidden_size, dtype=torch.float64) for l in layer_ids}
    sums = {"harmful": zeros(), "benign": zeros()}
    counts = {"harmful": 0, "benign": 0}
    labelled = _labelled_prompts(items)
    for start in range(0, len(labelled), batch_size):
        chunk = labelled[start : start + batch_size]
        acts = _read(adapter, adapter.build_inputs([p for p, _ in chunk], None), layer_ids, positions)
        for row, (_, label) in enumerate(chunk):
            counts[label] += 1
            for l in layer_ids:
                sums[label][l] += acts[l][row].double()
    if not counts["harmful"] or not counts["benign"]:
        raise InputError(f"safety_directions needs both harmful and benign items, got {counts}")
    mean = lambda label, l: sums[label][l] / counts[label]
    return {l: (mean("benign", l) - mean("harmful", l)).float() for l in layer_ids}


__all__ = ["calibrate", "compute_sample_shifts", "safety_directions"]
