"""How much of the modality gap is left at each layer under steering (why all-layer CMRM compounds).

Dataset-level CMRM subtracts ``alpha * shift_l`` at every steered layer ``l``. The residual
stream carries each subtraction forward, and consecutive layers' shifts point in nearly the same
direction, so steering ``n`` consecutive layers at ``alpha`` removes roughly ``n * alpha`` gaps by
the last of them: the stream overshoots past the text-only state. The CMRM paper steers all
layers with alpha around 1; on a model where the shifts of neighbouring layers are aligned that
is a much stronger push than alpha suggests, and a smaller alpha (or fewer layers) gives the
same effect. Sample-level CMRM with the input's own image measures each layer's shift on the
already-steered stream, so it does not compound.

:func:`gap_profile` measures it: per layer, at the last prompt token, the share of the unsteered
gap (multimodal minus text-only state, along its mean direction) that is left under a steering
config. ``1`` is untouched, ``0`` is back at the text-only state, negative is past it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from vlmsafe.activations import record_activations
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.data import as_pair
from vlmsafe.errors import InputError
from vlmsafe.steering.config import SteeringConfig


def _states(
    adapter: ModelAdapter,
    prompts: list[str],
    images: list[Any] | None,
    layers: list[int],
    steering: SteeringConfig | None,
    all_images: list[Any],
    system_prompt: str | None,
) -> dict[int, torch.Tensor]:
    inputs = adapter.build_inputs(prompts, images, system_prompt=system_prompt, padding_side="left")
    context = (
        steering.apply(adapter, prompts=prompts, images=all_images, system_prompt=system_prompt)
        if steering is not None
        else None
    )
    with torch.no_grad():
        if context is None:
            with record_activations(adapter, layers, positions="last") as rec:
                adapter.model(**inputs)
        else:
            with context, record_activations(adapter, layers, positions="last") as rec:
                adapter.model(**inputs)
    return dict(rec.activations)


def gap_profile(
    model: nn.Module | ModelAdapter,
    processor: Any,
    items: Iterable[Any],
    steering: SteeringConfig,
    *,
    batch_size: int = 16,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Per-layer share of the modality gap left at the last prompt token under ``steering``.

    For every decoder layer ``l`` (steered or not) and items ``(prompt_i, image_i)``:
    ``g_l`` = mean of ``h_l(prompt_i, image_i) - h_l(prompt_i)`` unsteered, ``u_l = g_l / |g_l|``,
    ``remaining_gap[l]`` = mean of ``(h_l^steered(prompt_i, image_i) - h_l(prompt_i)) . u_l`` over
    ``|g_l|``, and ``distance_ratio[l]`` = mean steered distance to the text-only state over the
    mean unsteered one. Returns both lists (layer order) with the layers and the item count.
    """
    adapter = get_adapter(model, processor)
    pairs = [as_pair(it) for it in items]
    if not pairs or any(img is None for _, img in pairs):
        raise InputError("gap_profile needs items with an image each (the gap is what the image does)")
    layers = adapter.resolve_layers(None)
    sums = {k: {l: [] for l in layers} for k in ("text", "plain", "steered")}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        prompts, images = [p for p, _ in chunk], [img for _, img in chunk]
        for key, imgs, cfg in (("text", None, None), ("plain", images, None), ("steered", images, steering)):
            for l, v in _states(adapter, prompts, imgs, layers, cfg, images, system_prompt).items():
                sums[key][l].append(v.double())
    remaining, distance = [], []
    for l in layers:
        text, plain, steered = (torch.cat(sums[k][l]) for k in ("text", "plain", "steered"))
        gap = (plain - text).mean(0)
        unit = gap / gap.norm().clamp_min(1e-30)
        remaining.append(float((steered - text).mean(0) @ unit / gap.norm().clamp_min(1e-30)))
        distance.append(
            float((steered - text).norm(dim=1).mean() / (plain - text).norm(dim=1).mean().clamp_min(1e-30))
        )
    return {
        "layers": layers,
        "remaining_gap": remaining,
        "distance_ratio": distance,
        "n_items": len(pairs),
        "steering": steering.describe(),
    }


def compounding_table(profiles: dict[str, dict[str, Any]], *, digits: int = 2) -> str:
    """A Markdown table of several :func:`gap_profile` results (rows: settings; columns: layers)."""
    names: Sequence[str] = list(profiles)
    if not names:
        return ""
    layers = profiles[names[0]]["layers"]
    lines = ["| setting | " + " | ".join(f"layer {l}" for l in layers) + " |", "|---|" + "---:|" * len(layers)]
    for name in names:
        cells = " | ".join(f"{v:+.{digits}f}" for v in profiles[name]["remaining_gap"])
        lines.append(f"| {name} | {cells} |")
    return "\n".join(lines)


__all__ = ["compounding_table", "gap_profile"]
