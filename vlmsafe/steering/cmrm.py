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
``steer_text_only=True``) and only the chosen prompt positions: ``"last"`` (last prompt token),
``"prompt"`` (all prompt tokens), ``"text"`` / ``"image"`` (prompt text / image tokens); with
``decode=True`` dataset-level steering also moves every generated token. Prompt and generated
tokens are told apart by absolute position (:mod:`vlmsafe.activations`), so steering does not
depend on the KV cache: ``use_cache=False`` generates the same tokens, and a prompt continued
on a filled cache (multi-turn chat) is steered at its own prompt positions.

Choices where the paper is silent (it does not say which positions are read and steered, nor
whether decoding steps are steered):

* Calibration reads the last prompt token or the mean over the prompt's *text* tokens
  (:data:`CALIBRATION_POSITIONS`). Image tokens have no text-only counterpart, so a mean over
  all prompt tokens would mix image-token states into the multimodal side; it is refused.
* Sample-level steering measures each input's shift at its last prompt token and steers prompt
  positions only. A generated token has no text-only counterpart (the text-only prompt would
  have generated other tokens), so ``decode=True`` is refused for sample-level; dataset-level
  vectors steer generated tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from vlmsafe.activations import RelativeVector, edit_activations, record_activations
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.data import BLANK_COLOUR, NOISE_SEED, prompt_of
from vlmsafe.distributed import gather, is_main_process, shard
from vlmsafe.errors import InputError
from vlmsafe.steering.anchors import anchor_image
from vlmsafe.steering.application import apply_vectors, steering_plan
from vlmsafe.steering.choices import CALIBRATION_POSITIONS, TEXT_READ_POSITIONS
from vlmsafe.steering.items import DatasetHasher, batched
from vlmsafe.steering.vectors import ShiftAccumulator, ShiftVectors, calibration_meta, mean_shift, resolve_aggregate


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
    anchor: str | Image.Image = "real",
    anchor_colour: Any = BLANK_COLOUR,
    anchor_seed: int = NOISE_SEED,
    aggregate: str | Callable[[torch.Tensor, torch.Tensor], Any] = "mean",
) -> ShiftVectors:
    """Calibrate dataset-level CMRM vectors on (prompt, image) ``items``.

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

    ``aggregate``: ``"mean"`` of the per-item shifts, or ``"pca"``, their first principal
    component oriented and scaled by the mean (:func:`~vlmsafe.steering.vectors.first_principal_component`;
    keeps every item's shift in memory), or a function ``fn(per_item_shifts, mean) -> vector`` (see
    :func:`~vlmsafe.steering.vectors.resolve_aggregate`; recorded as ``"custom:<name>"``). Anchor and
    aggregation are recorded in ``vectors.meta``.

    With an ``accelerate.Accelerator`` of several processes (``accelerate launch`` / ``torchrun``),
    each process runs a contiguous shard of ``items`` and the sums are all-reduced: every process
    returns the same vectors, equal to a single-process run up to float64 summation order, with
    the same calibration-set hash.
    """
    adapter = get_adapter(model, processor)
    if not adapter.supports_images:
        raise InputError(
            f"{type(adapter.model).__name__} is text-only: CMRM calibration needs a vision-language model"
        )
    _check_read_positions(positions, CALIBRATION_POSITIONS, "calibrate")
    _, aggregator = resolve_aggregate(aggregate)  # refused before any model work
    layer_ids = adapter.resolve_layers(layers)
    fixed, anchor_meta = anchor_image(adapter, anchor, colour=anchor_colour, seed=anchor_seed)
    items = list(items) if fixed is None else [(prompt_of(it), fixed) for it in items]  # fixed anchor: prompts only
    sums = ShiftAccumulator(layer_ids, adapter.hidden_size, keep_items=aggregator is not mean_shift)
    hasher = DatasetHasher()
    with shard(items, accelerator) as part:
        bar = tqdm(total=len(part), desc="calibrating CMRM", unit="item",
                   disable=not (progress and is_main_process(accelerator)))
        for batch in batched(part, batch_size):
            _calibration_batch(adapter, batch, layer_ids, positions, system_prompt, sums, hasher,
                               hash_images=fixed is None)
            bar.update(len(batch))
        bar.close()
    sums.all_reduce(accelerator)
    if sums.count == 0:
        raise InputError("no calibration items were given; pass at least one (prompt, image) pair")
    digests = gather(hasher.item_digests, accelerator)  # process order = shard order = item order
    meta = calibration_meta(adapter, layers=layer_ids, positions=positions, system_prompt=system_prompt,
                            calibration_sha256=hasher.hexdigest(digests), **anchor_meta)
    return sums.to_vectors(meta, aggregate=aggregate)


def _calibration_batch(adapter: ModelAdapter, batch: list, layer_ids: list[int], positions: str,
                       system_prompt: str | None, sums: ShiftAccumulator, hasher: DatasetHasher,
                       hash_images: bool = True) -> None:
    """Run one batch with and without its images and add the paired activations to ``sums``."""
    prompts = [p for p, _ in batch]
    images = [img for _, img in batch]
    if any(img is None for img in images):
        raise InputError("every calibration item needs an image (CMRM measures the shift an image causes); "
                         "or calibrate on a fixed anchor image (anchor='blank' / 'noise'), which needs prompts only")
    for prompt, image in batch:
        hasher.update(prompt, image if hash_images else None)
    mm_inputs, text_inputs = adapter.build_pair(prompts, images, system_prompt=system_prompt)
    sums.add(_read(adapter, mm_inputs, layer_ids, positions), _read(adapter, text_inputs, layer_ids, positions))


def _check_read_positions(positions: object, allowed: tuple[str, ...], where: str) -> None:
    if positions == "prompt" and "prompt" not in allowed:
        raise InputError(f"{where}: positions='prompt' would average image tokens into the multimodal side, and they "
                         "have no text-only counterpart; use positions='text' (the prompt's text tokens) or 'last'")
    if positions not in allowed:
        raise InputError(f"{where}: unknown read positions {positions!r}; use one of {allowed}")


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
    _check_read_positions(positions, CALIBRATION_POSITIONS, "compute_sample_shifts")
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
    """Per-layer safety direction: mean text-only state of benign items minus that of harmful ones.

    The sign is vlmsafe's one convention for safety directions, ShiftDC's (:class:`SafetyDirections`: benign
    minus harmful, as in Zou et al.'s reference code). Projections (:meth:`ShiftVectors.project_onto`) do not
    depend on it; a reader comparing the two kinds of direction can rely on it.

    ``items`` need a ``label`` (``"harmful"``/``"benign"``; attribute or dict key); images are
    ignored (the direction lives in the text-only space the LLM was aligned in).
    """
    adapter = get_adapter(model, processor)
    _check_read_positions(positions, TEXT_READ_POSITIONS, "safety_directions")
    layer_ids = adapter.resolve_layers(layers)
    zeros = lambda: {l: torch.zeros(adapter.hidden_size, dtype=torch.float64) for l in layer_ids}
    sums = {"harmful": zeros(), "benign": zeros()}
    counts = {"harmful": 0, "benign": 0}
    labelled = []
    for item in items:
        label = item.get("label") if isinstance(item, dict) else getattr(item, "label", None)
        prompt = item.get("prompt") if isinstance(item, dict) else getattr(item, "prompt", None)
        if label not in counts or not isinstance(prompt, str):
            raise InputError(f"safety_directions needs items with a prompt and label 'harmful' or 'benign', "
                             f"got {item!r:.80}")
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
    mean = lambda label, l: sums[label][l] / counts[label]
    return {l: (mean("benign", l) - mean("harmful", l)).float() for l in layer_ids}


# --------------------------------------------------------------------------- steering
_plan = steering_plan  # the plan every CMRM entry point builds (sample-level too)


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
    static: bool | None = None,
) -> Iterator[dict[str, Any]]:
    """Dataset-level CMRM over an existing model: ``h_l <- h_l - alpha * vectors[l]``.

    >>> with steer(model, vectors, alpha=1.0):
    ...     model.generate(**inputs)

    ``positions`` picks the prompt tokens steered; ``decode=True`` also steers every generated
    token. ``layers`` defaults to every layer in ``vectors``. Validates ``vectors`` against the
    model. Steering runs at ``alpha=0`` too (it then adds zero); :class:`SteeringConfig` skips it.

    ``static=True`` steers with no per-token Python work (:mod:`vlmsafe.activations.compiled`: usable under
    ``torch.compile`` and static-cache ``generate``, same tokens); ``False`` with forward hooks that
    handle every way of calling the model; ``None`` (default) picks the compiled path when the model is
    set up for compiled generation (a static cache or compile config in its generation config, a
    compiled forward).
    """
    with apply_vectors(vectors, model, alpha, layers=layers, positions=positions, decode=decode,
                       steer_text_only=steer_text_only, static=static) as handle:
        yield handle.state


@contextlib.contextmanager
def steer_sample_level(
    model: nn.Module | ModelAdapter,
    text_only_states: dict[int, torch.Tensor],
    alpha: float = 1.0,
    *,
    positions: str | torch.Tensor = "last",
    decode: bool = False,
    static: bool | None = None,
) -> Iterator[dict[str, Any]]:
    """Sample-level CMRM given each row's text-only counterpart state ``{layer: (B, H)}``.

    In the forward call that holds the prompt, each steered layer computes, per row,
    ``shift = h_l[last prompt token] - text_only_state`` on the stream it receives (so with
    several layers each shift is measured on the already-steered stream) and applies
    ``h_l <- h_l - alpha * shift`` at the chosen prompt ``positions``. Text-only rows are not
    steered (their counterpart is themselves). ``text_only_states`` typically come from
    :func:`text_only_states`.

    ``decode=True`` is refused: a generated token has no text-only counterpart. ``static`` picks the
    compiled path as in :func:`steer`.
    """
    if decode:
        raise InputError("sample-level CMRM cannot steer generated tokens: they have no text-only counterpart (the "
                         "text-only prompt would have generated other tokens); use decode=False, or dataset-level "
                         "vectors (`vlmsafe calibrate`, then steer(..., decode=True)) to steer generated tokens")
    adapter = get_adapter(model)
    layer_ids = adapter.resolve_layers(sorted(text_only_states))
    shifts: dict[int, torch.Tensor] = {}
    vectors = {l: RelativeVector(l, text_only_states[l], store=shifts) for l in layer_ids}
    plan = _plan(adapter, vectors, alpha, positions, False, False)
    with edit_activations(adapter, plan, static=static) as state:
        state["shifts"] = shifts
        yield state


@torch.no_grad()
def text_only_states(
    model: nn.Module | ModelAdapter,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Any] | None,
    *,
    layers: int | Sequence[int] | str | None = None,
    system_prompt: str | None = None,
) -> dict[int, torch.Tensor]:
    """Last-prompt-token states of the text-only counterparts, for :func:`steer_sample_level`: ``{layer: (B, H)}``.

    Runs the smallest pass that yields them: only the rows that have an image (other rows are
    not steered and get zeros), no KV cache, and only up to the deepest requested layer (the
    layers above it and the output head do not run).
    """
    rows = None if images is None else [i for i, img in enumerate(images) if img is not None]
    return prompt_states(model, processor, prompts, None, rows=rows, layers=layers, system_prompt=system_prompt)


@torch.no_grad()
def prompt_states(
    model: nn.Module | ModelAdapter,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Any] | None,
    *,
    rows: Sequence[int] | None = None,
    layers: int | Sequence[int] | str | None = None,
    system_prompt: str | None = None,
) -> dict[int, torch.Tensor]:
    """Unsteered last-prompt-token states of ``(prompts[i], images[i])`` for ``rows`` (default all): ``{l: (B, H)}``.

    Like :func:`text_only_states` (rows not listed get zeros, no KV cache, the pass stops after the
    deepest requested layer), for any inputs: the anchored pass of sample-level CMRM on a blank or
    noise image, and ShiftDC's captioned-counterpart and multimodal passes.
    """
    adapter = get_adapter(model, processor)
    adapter.refuse("text-only twin")
    layer_ids = adapter.resolve_layers(layers)
    rows = list(range(len(prompts))) if rows is None else list(rows)
    shape, device = (len(prompts), adapter.hidden_size), adapter.device
    out = {l: torch.zeros(shape, dtype=torch.float32, device=device) for l in layer_ids}
    if not rows:
        return out
    picked = None if images is None else [images[i] for i in rows]
    inputs = adapter.build_inputs([prompts[i] for i in rows], picked, system_prompt=system_prompt, padding_side="left")
    with record_activations(adapter, layer_ids, positions="last", dtype=torch.float32, device=None,
                            stop_early=True) as rec:
        adapter.model(**inputs, use_cache=False)
    index = torch.tensor(rows, device=device)
    for l in layer_ids:
        out[l].index_copy_(0, index, rec.activations[l].to(device))
    return out
