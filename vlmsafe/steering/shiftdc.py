"""ShiftDC: remove only the safety-relevant part of the shift an image causes, per input.

Source: Zou et al., "Understanding and Rectifying Safety Perception Distortion in VLMs" (ShiftDC),
arXiv 2502.13095, NeurIPS 2025; reference code github.com/Renovamen/ShiftDC (read at commit df91f41;
file names below are that repository's).

* **Counterpart.** An input's text-only counterpart is its prompt plus a caption of its image,
  ``"{prompt} Image Caption: {caption}"`` (:data:`COUNTERPART_TEMPLATE`; the reference's
  ``ANSWER_Q_BASED_ON_CAPTION`` in ``shiftdc/utils/prompt.py``).
* **Safety direction.** Per layer, ``s_l`` = mean last-token state of benign counterparts minus that
  of harmful ones, over a labelled calibration set (:func:`calibrate_shiftdc`; the reference:
  ``run_safety_shift.py``, LLaVA-Instruct vs MM-SafetyBench items prepared by
  ``scripts/prepare_steer.py``). The projection does not depend on its sign.
* **Correction.** Per input and layer, ``m_l = x_l(prompt + image) - x_l(counterpart)`` at the last
  token, and ``alpha * (m_l . s_l / s_l . s_l) s_l`` is subtracted from the last prompt token at
  prefill, at layers from the middle to the last (:func:`steer_shiftdc`; the reference:
  ``run_shiftdc.py``, ``compute_shift_components``).

What the reference code does, point by point, and what vlmsafe does (see README "Methods and their
sources"):

* **Prefill only, in both.** The reference's hook (``add_prefill_hooks`` in ``shiftdc/utils/hooks.py``)
  subtracts the correction at the last position once per layer and then sets a per-layer
  ``applied`` flag that stops it on every later call, so generated tokens are not corrected. vlmsafe
  corrects the prefill only too, unless ``decode=True`` (then every generated token gets the prompt's
  correction; not the reference's behaviour).
* **Chat template.** The reference reads the image + text states through the processor's chat
  template (``run_vl_activation.py``) but tokenizes the text-only caption counterparts bare, with no
  template (``run_tt_activation.py`` and ``run_safety_shift.py``, via
  ``HuggingFace.extract_last_token_activations`` in ``shiftdc/models/hf.py``), so its ``m_l`` compares
  the last token of a templated prompt (the assistant turn's opening) with the last token of a bare
  one (the caption's end): two different token positions, a quirk. It also generates from the
  ``NORMAL_SAFE`` prompt, a jailbreak-style preamble ("... without any regard for ethical, moral, or
  safety concerns") that is absent when ``m_l`` and ``s_l`` are read. vlmsafe builds captions,
  counterparts, directions and generation with the model's chat template, so ``m_l`` compares the
  same position of two inputs that differ only in image vs caption, and the steered prompt is the
  one the shift was measured on.
* **Captions.** The reference captions its *direction set* with GPT-4o (``gpt-4o-2024-11-20``) from
  "Describe the image. Keep your description concise." (``scripts/prepare_steer.py``); at test time
  the VLM captions each input itself from ``CAPTION_BASED_ON_Q`` ("Based on the given Request,
  describe the image. Request: ...", ``run_caption.py``, 128 tokens). vlmsafe uses the item's own
  ``caption`` when it has one (bring GPT-4o captions that way, or through ``captions``), else the
  model writes one from :data:`CAPTION_PROMPT` (the reference's test-time instruction) for the
  direction set and for inputs alike: no API is needed, and a caption written by the model under
  test is what the test-time shift is measured against. ``--caption-prompt`` gives the reference's
  direction-set wording to the model instead.
* **Layers.** The reference code's default is ``num_layers // 2 .. num_layers - 1``
  (``_build_layer_maps`` in ``run_shiftdc.py``), vlmsafe's ``"middle-to-last"`` default; the
  reference's README runs ``--layer_start 10 --layer_end 31`` on LLaVA-1.5-7B (32 layers), which is
  ``layers="10-31"`` here.
* **The last layer.** The reference reads layer ``l`` as ``hidden_states[l + 1]``; for the last layer
  transformers returns the state *after* the final norm there, while its hook edits the decoder
  layer's output, *before* the norm: at the last layer it reads one quantity and edits another.
  vlmsafe reads and edits the decoder layer's output at every layer (the same hook point).
* **The last token.** The reference takes the last token as ``attention_mask.sum(1) - 1``, which is
  the last real token only under right padding; with left padding (or any row shorter than the
  batch's longest under the other convention) it reads another position. vlmsafe reads the last
  non-padding token of each row, left- or right-padded (:mod:`vlmsafe.activations`), so batched and
  one-by-one calibration agree.

Choices where the paper or its code leave room:

* ``shift_from="unsteered"`` (default, as the reference, which reads ``m_l`` from activations saved
  before any steering): ``m_l`` is read from a separate, unsteered pass of the multimodal input, so
  corrections made at earlier layers carry forward and add up along ``s``. ``"running"``: ``m_l`` is
  read during the steered pass itself, on the stream earlier layers already corrected: no
  compounding, and one forward pass less.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from vlmsafe.activations import EditPlan, Prompt, RelativeVector, edit_activations
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.data import as_pair
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.steering.choices import SHIFT_FROM, check_alpha
from vlmsafe.steering.choices import SHIFTDC_LAYERS as DEFAULT_LAYERS
from vlmsafe.steering.cmrm import prompt_states
from vlmsafe.steering.directions import CAPTION_PROMPT, CAPTION_TOKENS, SafetyDirections, projection
from vlmsafe.steering.vectors import calibration_meta
from vlmsafe.validation import check_int, check_template

#: The reference code's text-only counterpart (``ANSWER_Q_BASED_ON_CAPTION``).
COUNTERPART_TEMPLATE = "{prompt} Image Caption: {caption}"



def check_caption_prompt(instruction: Any) -> str:
    """A caption instruction: a non-empty string whose only field, if any, is ``{prompt}``."""
    return check_template(instruction, "caption prompt", "prompt", required=False)


def counterpart_prompt(prompt: str, caption: str) -> str:
    """The text-only counterpart of (prompt, image): the prompt followed by the image's caption."""
    return COUNTERPART_TEMPLATE.format(prompt=prompt.strip(), caption=caption.strip())


# --------------------------------------------------------------------------- captions and states
@torch.no_grad()
def generate_captions(
    model: nn.Module | ModelAdapter,
    processor: Any,
    prompts: Sequence[str],
    images: Sequence[Image.Image],
    *,
    instruction: str = CAPTION_PROMPT,
    max_new_tokens: int = CAPTION_TOKENS,
    batch_size: int = 8,
    system_prompt: str | None = None,
    progress: bool = False,
) -> list[str]:
    """Caption each image with the model itself, greedily, from ``instruction`` (``{prompt}`` = the request)."""
    adapter = get_adapter(model, processor)
    check_caption_prompt(instruction)
    check_int(max_new_tokens, "caption max_new_tokens", low=1)
    if len(prompts) != len(images) or any(img is None for img in images):
        raise InputError(
            f"captions need one image per prompt; got {len(prompts)} prompts and images {list(images)!r:.80}"
        )
    tokenizer = getattr(adapter.processor, "tokenizer", adapter.processor)
    out: list[str] = []
    bar = tqdm(total=len(prompts), desc="captioning", unit="image", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        chunk = [instruction.format(prompt=p) for p in prompts[start : start + batch_size]]
        inputs = adapter.build_inputs(
            chunk, list(images[start : start + batch_size]), system_prompt=system_prompt, padding_side="left"
        )
        ids = adapter.model.generate(
            **inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
        )
        out.extend(adapter.decode(ids[:, inputs["input_ids"].shape[1] :]))
        bar.update(len(chunk))
    bar.close()
    return out


def _labelled(item: Any, index: int) -> tuple[str, str, str, str | None, Any]:
    """``(id, prompt, label, caption or None, item)`` of a labelled calibration item (Item or dict)."""
    get = item.get if isinstance(item, dict) else (lambda k, d=None: getattr(item, k, d))
    meta = get("meta") or {}
    caption = get("caption") if isinstance(item, dict) else meta.get("caption")
    label, prompt = get("label"), get("prompt")
    if label not in ("harmful", "benign") or not isinstance(prompt, str):
        raise InputError(
            f"ShiftDC calibration item {index} needs a prompt and a label 'harmful' or 'benign', got {item!r:.80}; "
            "label every item"
        )
    if caption is not None and (not isinstance(caption, str) or not caption.strip()):
        raise InputError(f"ShiftDC calibration item {index}: caption must be a non-empty string, got {caption!r}")
    return str(get("id", index)), prompt, label, caption, item


def labelled_rows(items: Iterable[Any]) -> list[tuple[str, str, str, str | None, Any]]:
    """The :func:`calibrate_shiftdc` rows of ``items``, refused (before any model work) unless every item is
    labelled and both labels occur."""
    rows = [_labelled(it, i) for i, it in enumerate(items)]
    counts = {lab: sum(r[2] == lab for r in rows) for lab in ("harmful", "benign")}
    if not counts["harmful"] or not counts["benign"]:
        raise InputError(f"ShiftDC needs harmful and benign items to find a safety direction, got {counts}; add both")
    return rows


@torch.no_grad()
def calibrate_shiftdc(
    model: nn.Module | ModelAdapter,
    processor: Any,
    items: Iterable[Any],
    *,
    layers: int | Sequence[int] | str | None = None,
    batch_size: int = 8,
    caption_prompt: str = CAPTION_PROMPT,
    caption_tokens: int = CAPTION_TOKENS,
    captions: Mapping[str, str] | None = None,
    system_prompt: str | None = None,
    progress: bool = True,
) -> SafetyDirections:
    """Per-layer ShiftDC safety directions from labelled (harmful / benign) items.

    Each item's counterpart is ``"{prompt} Image Caption: {caption}"``. The caption is, in order:
    the item's own (``Item.meta["caption"]`` / a dict's ``"caption"``, which the VLSafe loader
    fills), ``captions[item id]`` (e.g. the ``captions.jsonl`` of an earlier run), or one the model
    writes from ``caption_prompt`` (the item then needs an image). Every caption and its source is
    kept in the result (and written to ``captions.jsonl`` by :meth:`SafetyDirections.save`).
    """
    adapter = get_adapter(model, processor)
    adapter.refuse("text-only twin")
    check_caption_prompt(caption_prompt)
    check_int(caption_tokens, "caption_tokens", low=1)
    check_int(batch_size, "batch_size", low=1)
    layer_ids = adapter.resolve_layers(layers)
    rows = labelled_rows(items)
    known = dict(captions or {})
    final: dict[int, tuple[str, str]] = {}
    todo = []
    for i, (item_id, _prompt, _, caption, _item) in enumerate(rows):
        if caption is not None:
            final[i] = (caption, "data")
        elif item_id in known:
            final[i] = (known[item_id], "cache")
        else:
            todo.append(i)
    if todo:
        pairs = [as_pair(rows[i][4]) for i in todo]
        missing = [rows[i][0] for i, (_, img) in zip(todo, pairs) if img is None]
        if missing:
            raise InputError(
                f"items {missing[:5]} have neither a caption nor an image; give each a 'caption' or an image"
            )
        written = generate_captions(
            adapter,
            None,
            [p for p, _ in pairs],
            [img for _, img in pairs],
            instruction=caption_prompt,
            max_new_tokens=caption_tokens,
            batch_size=batch_size,
            system_prompt=system_prompt,
            progress=progress,
        )
        final.update({i: (c, "generated") for i, c in zip(todo, written)})
    texts = [counterpart_prompt(rows[i][1], final[i][0]) for i in range(len(rows))]
    states = {l: [] for l in layer_ids}
    for start in range(0, len(texts), batch_size):
        chunk = prompt_states(adapter, None, texts[start : start + batch_size], None, layers=layer_ids,
                              system_prompt=system_prompt)
        for l in layer_ids:
            states[l].append(chunk[l].cpu())
    states = {l: torch.cat(v) for l, v in states.items()}
    harmful = torch.tensor([r[2] == "harmful" for r in rows])
    benign_means = {l: states[l][~harmful].double().mean(0).float() for l in layer_ids}
    harmful_means = {l: states[l][harmful].double().mean(0).float() for l in layer_ids}
    digest = hashlib.sha256(
        "\0".join(f"{r[1]}\1{r[2]}\1{final[i][0]}" for i, r in enumerate(rows)).encode()
    ).hexdigest()
    meta = calibration_meta(
        adapter,
        layers=layer_ids,
        positions="last",
        method="shiftdc",
        direction="benign minus harmful",
        counterpart_template=COUNTERPART_TEMPLATE,
        caption_prompt=caption_prompt,
        caption_tokens=caption_tokens,
        n_benign=sum(r[2] == "benign" for r in rows),
        n_harmful=sum(r[2] == "harmful" for r in rows),
        caption_sources={src: sum(v[1] == src for v in final.values()) for src in ("data", "cache", "generated")},
        calibration_sha256=digest,
        system_prompt=system_prompt,
    )
    caption_rows = [
        {"id": rows[i][0], "prompt": rows[i][1], "label": rows[i][2], "caption": final[i][0], "source": final[i][1]}
        for i in range(len(rows))
    ]
    return SafetyDirections(
        directions={l: benign_means[l] - harmful_means[l] for l in layer_ids},
        benign_means=benign_means,
        harmful_means=harmful_means,
        meta=meta,
        captions=caption_rows,
    )


def read_caption_cache(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{id: caption}`` from a ``captions.jsonl`` written with ShiftDC directions (to reuse its captions)."""
    from vlmsafe.data import read_records

    out: dict[str, str] = {}
    for where, rec in read_records(path, what="caption cache"):
        if not isinstance(rec.get("caption"), str) or "id" not in rec:
            raise FileFormatError(
                f"{where}: a caption cache line needs 'id' and 'caption'; use the captions.jsonl "
                "that `vlmsafe calibrate --method shiftdc` writes"
            )
        out[str(rec["id"])] = rec["caption"]
    return out


# --------------------------------------------------------------------------- steering
@contextlib.contextmanager
def steer_shiftdc(
    model: nn.Module | ModelAdapter,
    directions: SafetyDirections,
    alpha: float = 1.0,
    *,
    prompts: Sequence[str],
    images: Sequence[Image.Image | None],
    captions: Sequence[str | None] | None = None,
    layers: int | Sequence[int] | str | None = DEFAULT_LAYERS,
    shift_from: str = "unsteered",
    decode: bool = False,
    system_prompt: str | None = None,
    static: bool | None = None,
) -> Iterator[dict[str, Any]]:
    """Steer the next forward call(s) on this batch with ShiftDC.

    Runs, before yielding: the caption generation for rows with an image and no caption, the
    counterpart pass, and (``shift_from="unsteered"``) the unsteered multimodal pass. Then, inside
    the context, the last prompt token of each row with an image gets ``h_l -= alpha * (m_l . s_l /
    s_l . s_l) s_l`` at every steered layer. The batch must be built from the same ``prompts`` and
    ``images``, left-padded, with the same ``system_prompt`` (as :class:`~vlmsafe.steering.SafeVLM` does).
    Yields a state dict whose ``"corrections"`` holds ``{layer: (B, H)}``, the projection each row got
    (before ``alpha``), and ``"captions"`` the captions used. ``static`` picks the compiled path as in
    :func:`~vlmsafe.steering.steer` (``shift_from="running"`` with ``decode=True`` runs on hooks).
    """
    alpha = check_alpha(alpha)  # the one rule for every steering entry point, checked before any forward pass
    adapter = get_adapter(model)
    directions.check_compatible(adapter)
    if shift_from not in SHIFT_FROM:
        raise InputError(f"shift_from must be one of {', '.join(map(repr, SHIFT_FROM))}, got {shift_from!r}")
    if len(images) != len(prompts) or (captions is not None and len(captions) != len(prompts)):
        raise InputError(
            f"got {len(prompts)} prompts, {len(images)} images and "
            f"{'no' if captions is None else len(captions)} captions; pass one of each per prompt"
        )
    layer_ids = adapter.resolve_layers(layers)
    chosen = directions.select(layer_ids)
    rows = [i for i, img in enumerate(images) if img is not None]
    B = len(prompts)
    given = list(captions) if captions is not None else [None] * B
    need = [i for i in rows if not given[i]]
    if need:
        written = generate_captions(
            adapter,
            None,
            [prompts[i] for i in need],
            [images[i] for i in need],
            instruction=directions.caption_prompt,
            max_new_tokens=directions.caption_tokens,
            batch_size=B,
            system_prompt=system_prompt,
        )
        for i, c in zip(need, written):
            given[i] = c
    row_on = torch.zeros(B, dtype=torch.bool)
    row_on[rows] = True
    counterparts = [counterpart_prompt(p, c) if c else p for p, c in zip(prompts, given)]
    counter = prompt_states(adapter, None, counterparts, None, rows=rows, layers=layer_ids,
                            system_prompt=system_prompt)
    state: dict[str, Any] = {"captions": given}
    if shift_from == "unsteered":
        mm = prompt_states(adapter, None, list(prompts), list(images), rows=rows, layers=layer_ids,
                           system_prompt=system_prompt)
        corrections = chosen.corrections({l: mm[l] - counter[l] for l in layer_ids})  # zero rows: zero correction
        vectors: dict[int, Any] = corrections
    else:
        corrections = {}
        # in the call holding the prompt: the projection of (this layer's running last-token state - counterpart
        # state); generated tokens (decode=True) get the prompt's correction
        vectors = {l: RelativeVector(l, counter[l], direction=chosen.directions[l], store=corrections, what="ShiftDC")
                   for l in layer_ids}
    plan = EditPlan(vectors=vectors, positions="last", decode=decode, rows=_image_rows(row_on), scale=-alpha)
    with edit_activations(adapter, plan, static=static) as edit_state:
        edit_state.update(state, corrections=corrections)
        yield edit_state


def _image_rows(row_on: torch.Tensor):
    """Row rule: the rows that have an image (decided from the batch ShiftDC was prepared for)."""

    def rows(prompt: Prompt) -> torch.Tensor:
        if prompt.tokens.batch_size != row_on.shape[0]:
            raise InputError(f"ShiftDC was prepared for {row_on.shape[0]} rows but the model got "
                             f"{prompt.tokens.batch_size}; build the batch from the same prompts and images")
        return row_on

    return rows


__all__ = [
    "CAPTION_PROMPT",
    "CAPTION_TOKENS",
    "COUNTERPART_TEMPLATE",
    "SafetyDirections",
    "calibrate_shiftdc",
    "counterpart_prompt",
    "generate_captions",
    "projection",
    "read_caption_cache",
    "steer_shiftdc",
]
