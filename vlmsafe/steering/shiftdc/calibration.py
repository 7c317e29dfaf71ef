"""ShiftDC calibration: per-layer safety directions from labelled (harmful / benign) items and their captions."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.data import as_pair
from vlmsafe.errors import InputError
from vlmsafe.steering.application import prompt_states
from vlmsafe.steering.choices import with_options
from vlmsafe.steering.shiftdc.captions import COUNTERPART_TEMPLATE, _captions, counterpart_prompt
from vlmsafe.steering.shiftdc.config import ShiftDCCalibration
from vlmsafe.steering.shiftdc.directions import SafetyDirections
from vlmsafe.steering.vectors import calibration_meta


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
    config: ShiftDCCalibration | None = None,
    *,
    captions: Mapping[str, str] | None = None,
    progress: bool = True,
    **options: Any,
) -> SafetyDirections:
    """Per-layer ShiftDC safety directions from labelled (harmful / benign) items.

    ``config`` (:class:`ShiftDCCalibration`) holds the options, or pass its fields as keyword arguments
    (``layers``, ``batch_size``, ``caption_prompt``, ``caption_tokens``, ``system_prompt``).

    Each item's counterpart is ``"{prompt} Image Caption: {caption}"``. The caption is, in order:
    the item's own (``Item.meta["caption"]`` / a dict's ``"caption"``, which the VLSafe loader
    fills), ``captions[item id]`` (e.g. the ``captions.jsonl`` of an earlier run), or one the model
    writes from ``caption_prompt`` (the item then needs an image). Every caption and its source is
    kept in the result (and written to ``captions.jsonl`` by :meth:`SafetyDirections.save`).

    The direction is benign minus harmful, vlmsafe's one sign for safety directions (as
    :func:`~vlmsafe.steering.cmrm.safety_directions`).
    """
    cfg: ShiftDCCalibration = with_options(config, options, ShiftDCCalibration())
    adapter = get_adapter(model, processor)
    adapter.refuse("text-only twin")
    layer_ids = adapter.resolve_layers(cfg.layers)
    rows = labelled_rows(items)
    final = _captions_of(adapter, rows, dict(captions or {}), cfg, progress)
    texts = [counterpart_prompt(rows[i][1], final[i][0]) for i in range(len(rows))]
    states = {l: [] for l in layer_ids}
    for start in range(0, len(texts), cfg.batch_size):
        chunk = prompt_states(adapter, texts[start : start + cfg.batch_size], None, layers=layer_ids,
                              system_prompt=cfg.system_prompt)
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
        caption_prompt=cfg.caption_prompt,
        caption_tokens=cfg.caption_tokens,
        n_benign=sum(r[2] == "benign" for r in rows),
        n_harmful=sum(r[2] == "harmful" for r in rows),
        caption_sources={src: sum(v[1] == src for v in final.values()) for src in ("data", "cache", "generated")},
        calibration_sha256=digest,
        system_prompt=cfg.system_prompt,
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


def _captions_of(adapter: ModelAdapter, rows: list, known: Mapping[str, str], cfg: ShiftDCCalibration,
                 progress: bool) -> dict[int, tuple[str, str]]:
    """``{row: (caption, source)}``: the item's own (``"data"``), ``known[id]`` (``"cache"``), else the model's."""
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
        written = _captions(adapter, [p for p, _ in pairs], [img for _, img in pairs], cfg.captioning, progress)
        final.update({i: (c, "generated") for i, c in zip(todo, written)})
    return final


__all__ = ["ShiftDCCalibration", "calibrate_shiftdc", "labelled_rows"]
