"""CMRM: Cross-Modality Representation Manipulation (Liu et al., 2024, arXiv 2410.09047).

For the same instruction, a VLM's language-model hidden states with an image sit away from those
of the text-only input, and safety behaviour learnt on text does not carry over. CMRM moves the
multimodal hidden states back: at decoder layer ``l``, ``h_l <- h_l - alpha * shift_l``.

* **dataset-level**: ``shift_l`` = mean over a calibration set of ``h_l(image+text) - h_l(text)``
  (:func:`calibrate`), one vector per layer, applied to every multimodal input;
* **sample-level**: ``shift_l`` is computed for each input from its own text-only counterpart
  (one extra text-only prefill), during the multimodal forward pass itself, so with several
  steered layers each layer's shift is measured on the already-steered stream.

Steering touches only rows that contain image tokens (text-only inputs pass through unless
``steer_text_only=True``) and only the chosen positions: ``"last"`` (last prompt token),
``"prompt"`` (all prompt tokens), ``"text"`` / ``"image"`` (prompt text / image tokens), with
``decode=True`` also steering every generated token.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from vlmsafe.activations import CallInputs, EditPlan, edit_activations, record_activations, resolve_positions
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.distributed import gather, is_main_process, shard
from vlmsafe.errors import InputError
from vlmsafe.steering.items import DatasetHasher, batched
from vlmsafe.steering.vectors import ShiftAccumulator, ShiftVectors, calibration_meta

STEER_POSITIONS = ("last", "prompt", "text", "image")


@torch.no_grad()
def calibrate(
    model: nn.Module | ModelAdapter,
    processor: Any,
    items: Iterable[Any],
    *,
    layers: int | Sequence[int] | str | None = None,
    positions: str = "last",
    batch_size: int = 8,
    system_prompt: str | None = None,
    progress: bool = True,
    accelerator: Any | None = None,
) -> ShiftVectors:
    """Calibrate dataset-level CMRM vectors on (prompt, image) ``items``.

    Each item is run twice, with its image and as its text-only counterpart; per layer, the
    item's activation is its mean over the read ``positions`` (``"last"`` prompt token by
    default). Sums are accumulated in float64 (:class:`ShiftAccumulator`), so results are
    deterministic and bf16/fp16 models calibrate as precisely as fp32 ones allow.

    With an ``accelerate.Accelerator`` of several processes (``accelerate launch`` / ``torchrun``),
    each process runs a contiguous shard of ``items`` and the sums are all-reduced: every process
    returns the same vectors, equal to a single-process run up to float64 summation order, with
    the same calibration-set hash.
    """
    adapter = get_adapter(model, processor)
    if not adapter.supports_images:
        raise InputError(f"{type(adapter.model).__name__} is text-only: CMRM calibration needs a vision-language model")
    layer_ids = adapter.resolve_layers(layers)
    sums = ShiftAccumulator(layer_ids, adapter.hidden_size)
    hasher = DatasetHasher()
    with shard(list(items), accelerator) as part:
        bar = tqdm(total=len(part), desc="calibrating CMRM", unit="item", disable=not (progress and is_main_process(accelerator)))
        for batch in batched(part, batch_size):
            _calibration_batch(adapter, batch, layer_ids, positions, system_prompt, sums, hasher)
            bar.update(len(batch))
        bar.close()
    sums.all_reduce(accelerator)
    if sums.count == 0:
        raise InputError("no calibration items were given; pass at least one (prompt, image) pair")
    digests = gather(hasher.item_digests, accelerator)  # process order = shard order = item order
    return sums.to_vectors(calibration_meta(adapter, layers=layer_ids, positions=positions,
                                            calibration_sha256=hasher.hexdigest(digests), system_prompt=system_prompt))


def _calibration_batch(adapter: ModelAdapter, batch: list, layer_ids: list[int], positions: str,
                       system_prompt: str | None, sums: ShiftAccumulator, hasher: DatasetHasher) -> None:
    """Run one batch with and without its images and add the paired activations to ``sums``."""
    prompts = [p for p, _ in batch]
    images = [img for _, img in batch]
    if any(img is None for img in images):
        raise InputError("every calibration item needs an image (CMRM measures the shift an image causes)")
    for prompt, image in batch:
        hasher.update(prompt, image)
    mm_inputs, text_inputs = adapter.build_pair(prompts, images, system_prompt=system_prompt)
    sums.add(_read(adapter, mm_inputs, layer_ids, positions), _read(adapter, text_inputs, layer_ids, positions))


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

    For analysis; :func:`steer` in sample mode computes the same quantity during generation with
    one extra (text-only) pass.
    """
    adapter = get_adapter(model, processor)
    layer_ids = adapter.resolve_layers(layers)
    mm_inputs, text_inputs = adapter.build_pair(list(prompts), list(images))
    mm = _read(adapter, mm_inputs, layer_ids, positions)
    text = _read(adapter, text_inputs, layer_ids, positions)
    return {l: mm[l] - text[l] for l in layer_ids}


@torch.no_grad()
def safety_directions(
    model: nn.Module | ModelAdapter,
    processor: Any,
    items: Iterable[Any],
    *,
    layers: int | Sequence[int] | str | None = None,
    positions: str = "last",
    batch_size: int = 8,
) -> dict[int, torch.Tensor]:
    """Per-layer safety direction: mean text-only state of harmful items minus that of benign ones.

    ``items`` need a ``label`` (``"harmful"``/``"benign"``; attribute or dict key); images are
    ignored (the direction lives in the text-only space the LLM was aligned in).
    """
    adapter = get_adapter(model, processor)
    layer_ids = adapter.resolve_layers(layers)
    sums = {lab: {l: torch.zeros(adapter.hidden_size, dtype=torch.float64) for l in layer_ids} for lab in ("harmful", "benign")}
    counts = {"harmful": 0, "benign": 0}
    labelled = []
    for item in items:
        label = item.get("label") if isinstance(item, dict) else getattr(item, "label", None)
        prompt = item.get("prompt") if isinstance(item, dict) else getattr(item, "prompt", None)
        if label not in counts or not isinstance(prompt, str):
            raise InputError(f"safety_directions needs items with a prompt and label 'harmful' or 'benign', got {item!r:.80}")
        labelled.append((prompt, label))
    for start in range(0, len(labelled), batch_size):
        chunk = labelled[start : start + batch_size]
        acts = _read(adapter, adapter.build_inputs([p for p, _ in chunk], None), layer_ids, positions)
        for row, (_, label) in enumerate(chunk):
            counts[label] += 1
            for l in layer_ids:
                sums[label][l] += acts[l][row].double()
    if not counts["harmful"] or not counts["benign"]:
        raise InputError(f"safety_directions needs both harmful and benign items, got {counts}")
    return {l: (sums["harmful"][l] / counts["harmful"] - sums["benign"][l] / counts["benign"]).float() for l in layer_ids}


# --------------------------------------------------------------------------- steering
def _validate_positions(positions: str | torch.Tensor) -> None:
    if isinstance(positions, str) and positions not in STEER_POSITIONS:
        raise InputError(
            f"unknown steering positions {positions!r}; use one of {STEER_POSITIONS} "
            "(and decode=True to also steer generated tokens)"
        )


class _RowState:
    """Which rows of the current batch are steered; set at prefill, reused at decode steps."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None


def _row_mask(adapter: ModelAdapter, call: CallInputs, steer_text_only: bool) -> torch.Tensor:
    B = call.batch_size
    if steer_text_only:
        return torch.ones(B, dtype=torch.bool)
    if call.input_ids is None:
        raise InputError("steering needs input_ids to tell multimodal rows from text-only ones (got inputs_embeds)")
    return adapter.image_token_mask(call.input_ids).any(dim=1).cpu()


def _plan_masks(adapter: ModelAdapter, positions, decode: bool, steer_text_only: bool, rows: _RowState):
    def prefill(call: CallInputs) -> torch.Tensor:
        rows.rows = _row_mask(adapter, call, steer_text_only)
        mask = resolve_positions(positions, call, image_token_id=adapter.image_token_id).cpu()
        return mask * rows.rows.unsqueeze(1).float()

    def decode_step(call: CallInputs) -> torch.Tensor | None:
        if rows.rows is None:
            return None
        if rows.rows.shape[0] != call.batch_size:
            raise InputError(
                f"the batch changed from {rows.rows.shape[0]} to {call.batch_size} rows during generation "
                "(beam search / num_return_sequences); steer with num_beams=1 and one sequence per prompt"
            )
        return rows.rows.unsqueeze(1).float().expand(call.batch_size, call.seq_len)

    return prefill, (decode_step if decode else None)


@contextlib.contextmanager
def steer(
    model: nn.Module | ModelAdapter,
    vectors: ShiftVectors,
    alpha: float = 1.0,
    *,
    layers: int | Sequence[int] | str | None = None,
    positions: str | torch.Tensor = "last",
    decode: bool = False,
    steer_text_only: bool = False,
) -> Iterator[dict[str, Any]]:
    """Dataset-level CMRM over an existing model: ``h_l <- h_l - alpha * vectors[l]``.

    >>> with steer(model, vectors, alpha=1.0):
    ...     model.generate(**inputs)

    ``layers`` defaults to every layer in ``vectors``. Validates ``vectors`` against the model.
    """
    adapter = get_adapter(model)
    vectors.check_compatible(adapter)
    _validate_positions(positions)
    layer_ids = vectors.layers if layers is None else adapter.resolve_layers(layers)
    chosen = vectors.select(layer_ids)
    rows = _RowState()
    prefill, decode_mask = _plan_masks(adapter, positions, decode, steer_text_only, rows)
    plan = EditPlan(vectors=dict(chosen.shifts), prefill_mask=prefill, decode_mask=decode_mask, scale=-float(alpha))
    with edit_activations(adapter, plan) as state:
        yield state


@contextlib.contextmanager
def steer_sample_level(
    model: nn.Module | ModelAdapter,
    text_only_states: dict[int, torch.Tensor],
    alpha: float = 1.0,
    *,
    positions: str | torch.Tensor = "last",
    decode: bool = False,
) -> Iterator[dict[str, Any]]:
    """Sample-level CMRM given each row's text-only counterpart state ``{layer: (B, H)}``.

    At prefill, each steered layer computes ``shift = h_l[last prompt token] - text_only_state``
    per row on the stream it receives, stores it, and applies ``h_l <- h_l - alpha * shift`` at
    the chosen positions (and, with ``decode=True``, at every generated token). Text-only rows
    get zero shift: their counterpart is themselves.
    """
    adapter = get_adapter(model)
    _validate_positions(positions)
    layer_ids = adapter.resolve_layers(sorted(text_only_states))
    rows = _RowState()
    prefill, decode_mask = _plan_masks(adapter, positions, decode, False, rows)
    shifts: dict[int, torch.Tensor] = {}
    last_cache: dict[str, Any] = {}

    def make_vector(layer: int):
        target = text_only_states[layer].float()

        def vector(hidden: torch.Tensor, call: CallInputs) -> torch.Tensor:
            if not call.is_decode:
                if last_cache.get("call") is not call:  # once per forward call, not once per layer
                    last_cache.update(call=call, mask=resolve_positions("last", call).to(hidden.device))
                last = last_cache["mask"]
                current = (hidden.float() * last.unsqueeze(-1)).sum(dim=1)  # (B, H) at the last prompt token
                if target.shape != current.shape:
                    raise InputError(
                        f"text-only states for layer {layer} have shape {tuple(target.shape)} but the batch is "
                        f"{tuple(current.shape)}; compute them on the same prompts"
                    )
                row_on = rows.rows.to(hidden.device).unsqueeze(1).float() if rows.rows is not None else 1.0
                shifts[layer] = (current - target.to(hidden.device)) * row_on
            return shifts[layer]

        return vector

    plan = EditPlan(vectors={l: make_vector(l) for l in layer_ids}, prefill_mask=prefill, decode_mask=decode_mask, scale=-float(alpha))
    with edit_activations(adapter, plan) as state:
        state["shifts"] = shifts
        yield state
