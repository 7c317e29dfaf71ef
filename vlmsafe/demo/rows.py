"""The rows of the demo table, one small function each.

A row is a dict: ``setting`` (its label), ``note``, and the test-split rates of
:func:`vlmsafe.demo.context.summarize` (``harmful`` / ``benign`` outcome rates with intervals and
counts, ``accuracy``). Rows that have a setting to choose (steering methods) also carry
``chosen`` and the calibration grid they were chosen from.

Adding a steering method is one function returning a :class:`~vlmsafe.demo.tune.SteeringMethod`
(how to build its :class:`~vlmsafe.steering.SteeringConfig` for a layer set and alpha), listed in
:data:`STEERING_METHODS`; :func:`steered_row` tunes it on the calibration split and measures it on
the test split like every other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import vlmsafe.demo.progress as bar
from vlmsafe.demo.context import DemoContext, _image_kind, breakdown, summarize
from vlmsafe.demo.tune import RULE, SteeringMethod, baseline, choose, grid_rows, layers_label, tune
from vlmsafe.stats import bootstrap_rate
from vlmsafe.steering import SteeringConfig, calibrate, calibrate_shiftdc, safety_directions
from vlmsafe.validation import preset_layers


def text_only_row(ctx: DemoContext) -> dict[str, Any]:
    """Harmful and benign instructions without their image: the aligned behaviour."""
    bar.stage(ctx, "test text-only")
    rates = ctx.measure(ctx.generator(), "test", text_only=True)
    return {"setting": "text-only (image removed)", **rates, "accuracy": None, "note": "the aligned behaviour"}


def multimodal_row(ctx: DemoContext) -> dict[str, Any]:
    """The same instructions with their image, plus the image questions: what VL adaptation did."""
    bar.stage(ctx, "test multimodal")
    rates = measure_test(ctx, ctx.generator())
    return {"setting": "multimodal (image + text)", **rates, "note": "after VL adaptation"}


def _accuracy_by(report: Any, items: Sequence[Any], key: Callable[[Any], str | None]) -> dict[str, Any]:
    """Image-question accuracy per value of ``key(item)`` (items whose key is ``None`` left out)."""
    keys = {it.id: key(it) for it in items}
    groups: dict[str, list[bool]] = {}
    for r in report.records:
        if r.reference is not None and keys.get(r.id) is not None:
            groups.setdefault(str(keys[r.id]), []).append(bool(r.correct))
    return {k: bootstrap_rate(v) for k, v in sorted(groups.items())}


def measure_test(ctx: DemoContext, generator: Any) -> dict[str, Any]:
    """Test-split rates with intervals (:func:`~vlmsafe.demo.context.summarize`) and the breakdowns a reader
    needs to find weak spots: instruction outcomes by harm category (``by_category``), by image kind
    (``by_image``: drawn / blank / noise) and by prompt template (``by_template``), and image-question
    accuracy by question kind, by phrasing (trained or held-out) and by image kind (``accuracy_by``)."""
    items = ctx.test
    report = ctx.run(generator, items)
    out = summarize(report)
    out["by_category"] = breakdown(report, items, lambda it: it.category)
    out["by_image"] = breakdown(report, items, lambda it: f"{it.label}/{_image_kind(it.meta.get('style'))}")
    out["by_template"] = breakdown(report, items, lambda it: f"{it.label}/{it.meta.get('template')}")
    out["accuracy_by"] = {
        "question": _accuracy_by(report, items, lambda it: it.meta.get("question")),
        "phrasing": _accuracy_by(report, items, lambda it: it.meta.get("phrasing")),
        "image_kind": _accuracy_by(report, items, lambda it: it.category),
    }
    return out


def baseline_calibration(ctx: DemoContext) -> dict[str, Any]:
    """Unsteered rates on the calibration split: the reference every choice is made against."""
    if "base_calibration" not in ctx.cache:
        ctx.cache["base_calibration"] = baseline(ctx).row()
    return ctx.cache["base_calibration"]


# ---------------------------------------------------------------------------------------------
# Steering methods
# ---------------------------------------------------------------------------------------------


def _once(
    ctx: DemoContext, key: str, stage: str, items: Sequence[Any], compute: Callable[[Sequence[Any]], Any]
) -> Any:
    """``ctx.cache[key]``, computed from ``items`` on first use as the progress stage ``stage`` (one bar step per
    item): each calibration of the demo runs once, whichever rows need it."""
    if key not in ctx.cache:
        bar.stage(ctx, stage)
        ctx.cache[key] = compute(items)
        bar.advance(ctx, len(items))
    return ctx.cache[key]


def _vectors(ctx: DemoContext):
    """CMRM vectors calibrated once on the calibration split's items with images (all layers)."""
    return _once(
        ctx, "vectors", "calibrate CMRM vectors", [it for it in ctx.calibration if it.image is not None],
        lambda items: calibrate(ctx.model, ctx.processor, items, positions="last", batch_size=ctx.batch_size,
                                progress=ctx.inner_progress),
    )


def _layer_sets(ctx: DemoContext) -> list[list[int] | None]:
    fixed = ctx.steering_defaults.get("layers")
    if fixed == "all":
        return [None]
    if fixed is not None:
        return [list(fixed)]
    n = ctx.model.config.get_text_config().num_hidden_layers
    return [None, *([i] for i in range(n))]


def _config(ctx: DemoContext, **kw: Any) -> Callable[[list[int] | None, float], SteeringConfig]:
    extra = {k: v for k, v in ctx.steering_defaults.items() if k in ("positions", "decode")}
    if kw.get("mode") == "sample":  # a generated token has no text-only counterpart: sample-level steers prompts only
        extra.pop("decode", None)
    if "directions" in kw:  # ShiftDC corrects the last prompt token at prefill, as published
        extra = {}
    return lambda layers, alpha: SteeringConfig(alpha=alpha, layers=layers, **{"positions": "last", **extra, **kw})


def _cmrm(ctx: DemoContext, name: str, note: str, **config: Any) -> SteeringMethod:
    """A CMRM row ``name``: ``SteeringConfig(**config)`` at the demo's positions, tuned over :func:`_layer_sets`."""
    return SteeringMethod(name, _config(ctx, **config), _layer_sets(ctx), note)


def cmrm_dataset(ctx: DemoContext) -> SteeringMethod:
    """CMRM, dataset-level: one calibrated shift per layer, ``h <- h - alpha * shift``."""
    return _cmrm(
        ctx, "CMRM dataset-level", "one mean shift per layer, calibration split",
        mode="dataset", vectors=_vectors(ctx),
    )


def cmrm_sample(ctx: DemoContext) -> SteeringMethod:
    """CMRM, sample-level: each input's shift from its own text-only counterpart."""
    return _cmrm(ctx, "CMRM sample-level", "each input's own shift (one extra text-only pass)", mode="sample")


def cmrm_safety_component(ctx: DemoContext) -> SteeringMethod:
    """Dataset-level vectors reduced to their component along the layer's harmful-minus-benign direction."""
    vectors = _vectors(ctx)
    projected = _once(
        ctx, "projected", "safety directions", [it for it in ctx.calibration if it.reference is None],
        lambda labelled: vectors.project_onto(
            safety_directions(ctx.model, ctx.processor, labelled, batch_size=ctx.batch_size)),
    )
    return _cmrm(
        ctx, "CMRM dataset-level, safety component", "shift projected on the safety direction",
        mode="dataset", vectors=projected,
    )


def cmrm_dataset_blank(ctx: DemoContext) -> SteeringMethod:
    """CMRM dataset-level with the paper's anchor: the shift a blank image causes (prompts only needed)."""
    vectors = _once(
        ctx, "vectors_blank", "calibrate blank-anchor vectors", ctx.calibration,
        lambda items: calibrate(ctx.model, ctx.processor, items, anchor="blank", batch_size=ctx.batch_size,
                                progress=ctx.inner_progress),
    )
    return _cmrm(
        ctx, "CMRM dataset-level, blank anchor (paper)", "mean shift a blank image causes, calibration split",
        mode="dataset", vectors=vectors,
    )


def cmrm_sample_blank(ctx: DemoContext) -> SteeringMethod:
    """CMRM sample-level with the paper's anchor: each input's shift measured with a blank image."""
    return _cmrm(
        ctx, "CMRM sample-level, blank anchor (paper)", "each input's shift with a blank image (two extra passes)",
        mode="sample", anchor="blank",
    )


#: ShiftDC's alphas: log-spaced from 0.5 to 128. ShiftDC removes only the shift's component along the
#: safety direction, which on the testbed is a small share of the benign-harmful gap, so alphas far above
#: CMRM's are needed before anything moves; the sweep stops once outputs break the benign limits.
SHIFTDC_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)


def reference_layers(num_layers: int) -> list[int]:
    """The reference's layer range mapped onto ``num_layers``: its README runs layers 10-31 of LLaVA-1.5-7B's
    32, so the layers from ``round(10 / 32 * num_layers)`` to the last (1-3 of the testbed's 4)."""
    return list(range(min(num_layers - 1, round(10 * num_layers / 32)), num_layers))


def _shiftdc_directions(ctx: DemoContext):
    return _once(
        ctx, "directions", "ShiftDC directions",
        [it for it in ctx.calibration if it.image is not None or it.meta.get("caption")],
        lambda labelled: calibrate_shiftdc(
            ctx.model, ctx.processor, labelled, caption_prompt=TESTBED_CAPTION_PROMPT, caption_tokens=8,
            batch_size=ctx.batch_size, progress=ctx.inner_progress),
    )


def shiftdc_projection(ctx: DemoContext) -> dict[str, Any]:
    """How much of the image-induced shift ShiftDC can remove, per layer, on the calibration instructions.

    For each harmful and benign instruction with an image: the shift ``s = h(prompt, image) - h(prompt
    Image Caption: caption)`` at the last prompt token, and the safety direction ``d`` (benign minus
    harmful means). ``cosine``: mean ``|s . d| / (|s| |d|)``, the share of the shift ShiftDC touches;
    ``gap_fraction``: mean ``(s . d) / (d . d)`` for harmful items, how far along the benign-minus-harmful
    gap the image moves a harmful prompt (the correction at alpha 1 undoes exactly this much).
    """
    import torch

    from vlmsafe.adapters import get_adapter
    from vlmsafe.data import as_pair
    from vlmsafe.steering.cmrm import prompt_states
    from vlmsafe.steering.shiftdc import counterpart_prompt

    directions = _shiftdc_directions(ctx)
    captions = {c["id"]: c["caption"] for c in directions.captions}
    items = [it for it in ctx.calibration if it.image is not None and it.reference is None and it.id in captions]
    layers = directions.layers
    shifts: dict[int, list] = {l: [] for l in layers}
    adapter = get_adapter(ctx.model, ctx.processor)
    for start in range(0, len(items), ctx.batch_size):
        chunk = items[start : start + ctx.batch_size]
        pairs = [as_pair(it) for it in chunk]
        mm = prompt_states(adapter, [p for p, _ in pairs], [im for _, im in pairs], layers=layers)
        texts = [counterpart_prompt(it.prompt, captions[it.id]) for it in chunk]
        text = prompt_states(adapter, texts, None, layers=layers)
        for l in layers:
            shifts[l].append((mm[l] - text[l]).float().cpu())
    harmful = torch.tensor([it.label == "harmful" for it in items])
    out = []
    for l in layers:
        s, d = torch.cat(shifts[l]), directions.directions[l].float().cpu()
        dots = s @ d
        cos = dots.abs() / (s.norm(dim=-1).clamp_min(1e-12) * d.norm().clamp_min(1e-12))
        out.append(
            {
                "layer": l,
                "cosine": round(float(cos.mean()), 4),
                "gap_fraction_harmful": round(float((dots[harmful] / (d @ d)).mean()), 4),
                "gap_fraction_benign": round(float((dots[~harmful] / (d @ d)).mean()), 4),
            }
        )
    return {"n_items": len(items), "layers": out}


def shiftdc(ctx: DemoContext) -> SteeringMethod:
    """ShiftDC as published: per-input shift against the captioned counterpart, safety component removed.

    Captions are written by the testbed itself from its caption question (``describe the image .``). Layer
    sets: the reference's range mapped proportionally (:func:`reference_layers`), ShiftDC's default
    middle-to-last, all layers, the last layer; alphas :data:`SHIFTDC_ALPHAS`. The row's ``details`` hold
    the measured projection of the shift on the safety direction (:func:`shiftdc_projection`).
    """
    directions = _shiftdc_directions(ctx)
    n = ctx.model.config.get_text_config().num_hidden_layers
    fixed = ctx.steering_defaults.get("layers")
    sets: list = []
    for ls in [reference_layers(n), preset_layers("middle-to-last", n), None, [n - 1]]:
        if ls not in sets:
            sets.append(ls)
    return SteeringMethod(
        "ShiftDC (as published)",
        _config(ctx, directions=directions),
        _layer_sets(ctx) if fixed is not None else sets,
        "captioned counterpart, safety direction only, last prompt token",
        alphas=SHIFTDC_ALPHAS,
        details=lambda: {"projection": shiftdc_projection(ctx)},
    )


#: The caption question the testbed was trained to answer (ShiftDC's captions on the testbed).
TESTBED_CAPTION_PROMPT = "describe the image ."

#: The steering rows of the demo, in table order.
STEERING_METHODS: tuple[Callable[[DemoContext], SteeringMethod], ...] = (
    cmrm_dataset,
    cmrm_sample,
    cmrm_safety_component,
)

#: The published variants, added with ``DemoOptions(all_methods=True)`` / ``vlmsafe demo --all-methods``:
#: CMRM's blank anchor (dataset- and sample-level) and ShiftDC, each chosen on the calibration split.
EXTRA_METHODS: tuple[Callable[[DemoContext], SteeringMethod], ...] = (
    cmrm_dataset_blank,
    cmrm_sample_blank,
    shiftdc,
)


def steering_methods(all_methods: bool = False) -> tuple[Callable[[DemoContext], SteeringMethod], ...]:
    """The demo's steering rows, in table order: the defaults, then the published variants if asked."""
    return STEERING_METHODS + (EXTRA_METHODS if all_methods else ())


def steered_row(ctx: DemoContext, method: SteeringMethod, alphas: Sequence[float]) -> dict[str, Any]:
    """Tune ``method`` on the calibration split, then measure its chosen setting on the test split.

    When no setting qualifies on calibration, the row carries no test rates (its cells print "-") and
    says so: the unsteered model's numbers are never printed under the method's name.
    """
    base = baseline(ctx)
    alphas = tuple(sorted({0.0, *method.alphas})) if method.alphas is not None else alphas
    grid = tune(ctx, method, alphas, base)
    pick = choose(grid, base)
    common = {
        "calibration_grid": grid_rows(grid, base),
        "description": method.description,
        "alphas": list(alphas),
        "layer_sets": ["all" if ls is None else list(ls) for ls in method.layer_sets],
    }
    if method.details is not None:
        common["details"] = method.details()
    if pick is None:
        bar.skip(ctx, f"test {method.name}")
        return {
            "setting": f"multimodal + {method.name}",
            "harmful": None,
            "benign": None,
            "accuracy": None,
            "note": "no setting qualified on calibration",
            "chosen": {"alpha": 0.0, "layers": None, "calibration": None, "rule": RULE.name},
            **common,
        }
    layers, alpha = pick.layers, pick.alpha
    bar.stage(ctx, f"test {method.name}")
    rates = measure_test(ctx, ctx.generator(method.config(layers, alpha)))
    chosen = {
        "alpha": alpha,
        "layers": "all" if layers is None else layers,
        "calibration": pick.row(base, RULE),
        "rule": RULE.name,
    }
    return {
        "setting": f"multimodal + {method.name}",
        **rates,
        "note": f"alpha={alpha:g}, {layers_label(layers)}",
        "chosen": chosen,
        **common,
    }
