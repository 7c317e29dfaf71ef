"""Model-level analyses: layer-wise safety probes and the multimodal shift, as report objects.

:func:`probe_layers` answers "at which layers is harmfulness linearly readable, and how much of
that survives an image (and CMRM)?"; :func:`analyze_shift` answers "how far does an image move
each layer's representation, and how much of the move lies along the harmful direction?".
Both return plain dataclasses whose :meth:`to_dict` is the JSON report.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split

from probes.collect import Activations, ReadOptions, collect_activations, vectors_from_activations, vectors_source
from probes.linear import HARMFUL, LayerProbe, ProbeFit, check_binary, labels_from_items, train_layer_probes
from probes.shift import layer_shift_metrics, shift_on_direction
from vlmsafe.adapters import get_adapter
from vlmsafe.errors import InputError
from vlmsafe.options import with_overrides
from vlmsafe.steering import ShiftVectors, SteeringConfig

CONDITIONS = ("text", "image", "steered")
CONDITION_LABELS = {
    "text": "text-only (held-out)",
    "image": "same prompts + image",
    "steered": "+ image + CMRM steering",
}


@dataclass
class LayerProbeReport:
    """Per-layer probe figures (see :func:`probe_layers`); ``probes`` are the fitted probes."""

    rows: list[dict[str, Any]]
    config: dict[str, Any]
    pca: dict[str, Any] | None = None
    probes: dict[int, LayerProbe] = field(default_factory=dict, repr=False)

    @property
    def layers(self) -> list[int]:
        return [r["layer"] for r in self.rows]

    def series(self, condition: str, metric: str = "accuracy") -> list[float | None]:
        return [(r.get(condition) or {}).get(metric) for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": "layers", "config": self.config, "layers": self.rows, "pca": self.pca}


@dataclass
class ShiftReport:
    """Per-layer multimodal drift figures (see :func:`analyze_shift`)."""

    rows: list[dict[str, Any]]
    config: dict[str, Any]

    @property
    def layers(self) -> list[int]:
        return [r["layer"] for r in self.rows]

    def series(self, key: str) -> list[float | None]:
        return [r.get(key) for r in self.rows]

    def to_dict(self) -> dict[str, Any]:
        return {"analysis": "shift", "config": self.config, "layers": self.rows}


def _with_vectors(
    adapter: Any,
    steering: SteeringConfig,
    calibration_items: Sequence[Any] | None,
    fallback: tuple[Activations, Activations, str] | None,
    read: ReadOptions,
) -> SteeringConfig:
    """Fill in a dataset-level config's vectors: given > calibrated on ``calibration_items`` > from ``fallback``."""
    if steering.mode != "dataset" or steering.vectors is not None:
        return steering
    if calibration_items is not None:
        mm = collect_activations(adapter, None, calibration_items, with_images=True, read=read,
                                 desc="calibration (image)")
        text = collect_activations(adapter, None, calibration_items, with_images=False, read=read,
                                   desc="calibration (text)")
        vectors = vectors_from_activations(adapter, mm, text, positions=read.positions, source="calibration split")
    elif fallback is not None:
        mm, text, source = fallback
        vectors = vectors_from_activations(adapter, mm, text, positions=read.positions, source=source)
    else:
        raise InputError("dataset-level steering needs vectors: pass SteeringConfig(vectors=...) or calibration_items")
    return replace(steering, vectors=vectors)


def _check_steering(steering: SteeringConfig | None, calibration_items: Sequence[Any] | None) -> None:
    if steering is not None and steering.mode == "sample" and calibration_items is not None:
        raise InputError(
            "sample-level CMRM measures each prompt's own shift: drop calibration_items or use dataset-level"
        )
    if steering is not None and steering.vectors is not None and calibration_items is not None:
        raise InputError("pass either vectors (in the steering config) or calibration_items, not both")


def _prepare(
    model: Any,
    processor: Any,
    steering: SteeringConfig | None,
    calibration_items: Sequence[Any] | None,
    options: tuple[ReadOptions | None, ProbeFit | None, dict[str, Any]],
) -> tuple[Any, ReadOptions, ProbeFit]:
    """What both analyses start from: the adapter, and ``read`` (its layers resolved) and ``fit`` with the keyword
    overrides of their fields (:func:`vlmsafe.options.with_overrides`; a name of neither is the ``TypeError`` of
    an unexpected keyword argument); the steering checked against ``calibration_items``."""
    read, fit, overrides = options
    names = {f.name for f in fields(ReadOptions)}
    read = with_overrides(ReadOptions, read, {k: v for k, v in overrides.items() if k in names})
    fit = with_overrides(ProbeFit, fit, {k: v for k, v in overrides.items() if k not in names})
    adapter = get_adapter(model, processor)
    read = replace(read, layers=adapter.resolve_layers(read.layers))
    _check_steering(steering, calibration_items)
    return adapter, read, fit


def split_sizes(n: int, test_size: float) -> tuple[int, int]:
    """``(n_train, n_test)`` of a ``test_size`` split of ``n`` items, rounded as scikit-learn rounds them."""
    n_test = math.ceil(test_size * n)
    return n - n_test, n_test


def _suggest(n: int, ok: Any, start: float, step: float) -> str:
    """The first two-decimal test size from ``start`` (moving by ``step``) whose split of ``n`` passes ``ok``."""
    t = round(start, 2)
    while 0 < t < 1 and not ok(*split_sizes(n, t)):
        t = round(t + step, 2)
    return f"{t:g}"


def check_split(y: np.ndarray, test_size: float, *, name: str = "test_size") -> None:
    """Raise :class:`InputError` unless a stratified ``test_size`` split of labels ``y`` can train and test a probe.

    Checked from the counts alone (no model needed), so a command fails before its forward passes:
    the held-out split needs one item of each class (2), the training split two of each (4).
    """
    y = np.asarray(y, dtype=np.int64)
    if not 0 < test_size < 1:
        raise InputError(f"{name} must be between 0 and 1 (a share of the items), got {test_size}")
    check_binary(y, min_per_class=4, what="data set")
    n = len(y)
    n_train, n_test = split_sizes(n, test_size)
    if n_test < 2:
        fix = _suggest(n, lambda tr, te: te >= 2, 2 / n, 0.01)
        raise InputError(f"{name} {test_size:g} holds out {n_test} of the {n} items; the held-out split needs at "
                         f"least 2 (one harmful, one benign); pass {name} {fix} or more")
    if n_train < 4:
        fix = _suggest(n, lambda tr, te: tr >= 4, (n - 4) / n - 0.005, -0.01)
        raise InputError(f"{name} {test_size:g} leaves {n_train} of the {n} items for training; the probes need at "
                         f"least 4 (2 harmful, 2 benign); pass {name} {fix} or less")


def split_items(
    items: list[Any], test_size: float, seed: int, *, name: str = "test_size"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels and a stratified (train, test) index split, both classes present in each."""
    y = labels_from_items(items)
    check_split(y, test_size, name=name)
    train_idx, test_idx = train_test_split(np.arange(len(items)), test_size=test_size, stratify=y, random_state=seed)
    harmful, benign = int((y[train_idx] == HARMFUL).sum()), int((y[train_idx] != HARMFUL).sum())
    if min(harmful, benign) < 2:
        raise InputError(f"{name} {test_size:g} leaves {harmful} harmful and {benign} benign items for training; "
                         f"the probes need at least 2 of each: lower {name} or add labelled items")
    return y, train_idx, test_idx


def probe_layers(model: Any, processor: Any, items: Sequence[Any], *, steering: SteeringConfig | None = None,
                 calibration_items: Sequence[Any] | None = None, read: ReadOptions | None = None,
                 fit: ProbeFit | None = None, **overrides: Any) -> LayerProbeReport:
    """Train a probe per layer on text-only inputs and test it with and without images.

    ``items`` carry ``label`` = ``"harmful"`` | ``"benign"`` (e.g. :class:`vlmsafe.data.Item`)
    and an image (or pass ``image=``, e.g. a blank one). They are split (stratified, ``test_size``)
    into a training set, on which each layer's probe is cross-validated and fitted from the
    text-only hidden states, and a held-out set, on which the probe is evaluated:

    (a) ``text``: held-out prompts, text-only;  (b) ``image``: the same prompts with their image;
    (c) ``steered``: with their image under ``steering`` (skipped when ``None`` or inactive).

    The drop (a) -> (b) measures how much the image moves the safety-relevant representation;
    (c) shows how much CMRM recovers. A dataset-level ``steering`` without vectors gets them
    calibrated on ``calibration_items``, else computed on the fly from the training split
    (disjoint from the held-out set).

    What is read (``layers``, ``positions``, ``image``, ``batch_size``, ``progress``) is a :class:`~probes.collect.
    ReadOptions`, how the probes are fitted (``test_size``, ``cv``, ``Cs``, ``seed``) a :class:`~probes.linear.
    ProbeFit`; their fields may also be given as keywords (``cv=3, progress=False``), which replace those of
    ``read`` / ``fit``.
    """
    adapter, read, fit = _prepare(model, processor, steering, calibration_items, (read, fit, overrides))
    layer_ids, positions, image = read.layers, read.positions, read.image
    steer = steering is not None and steering.active
    items = list(items)
    y, train_idx, test_idx = split_items(items, fit.test_size, fit.seed)
    text = collect_activations(adapter, None, items, with_images=False, read=read, desc="text-only")
    need_train_mm = steer and steering.mode == "dataset" and steering.vectors is None and calibration_items is None
    mm_idx = np.arange(len(items)) if need_train_mm else test_idx
    mm_part = collect_activations(adapter, None, [items[i] for i in mm_idx], with_images=True, read=read,
                                  desc="with image")
    pos = {int(i): k for k, i in enumerate(mm_idx)}
    mm_test = {l: a[[pos[int(i)] for i in test_idx]] for l, a in mm_part.items()}

    steered_test: Activations | None = None
    if steer:
        fallback = None
        if need_train_mm:
            mm_train = {l: a[[pos[int(i)] for i in train_idx]] for l, a in mm_part.items()}
            fallback = (mm_train, {l: a[train_idx] for l, a in text.items()}, "training split (on the fly)")
        steering = _with_vectors(adapter, steering, calibration_items, fallback, read)
        steered_test = collect_activations(adapter, None, [items[i] for i in test_idx], with_images=True, read=read,
                                           steering=steering, desc="with image + CMRM")

    probes = train_layer_probes({l: a[train_idx] for l, a in text.items()}, y[train_idx], cv=fit.cv, Cs=fit.Cs,
                                seed=fit.seed, progress=read.progress)
    rows = [_probe_row(l, probes[l], text[l][test_idx], mm_test[l], None if steered_test is None else steered_test[l],
                       y[test_idx])
            for l in layer_ids]
    config = {
        **_model_config(adapter, positions, items, y, image),
        "n_train": len(train_idx),
        "n_test": len(test_idx),
        "test_size": fit.test_size,
        "majority_baseline": float(max(y[test_idx].mean(), 1 - y[test_idx].mean())),
        "cv_folds": probes[layer_ids[0]].cv_folds,
        "Cs": list(fit.Cs),
        "seed": fit.seed,
        "steering": steering.describe() if steer else None,
    }
    pca = _pca_view(rows, text, mm_test, steered_test, test_idx, train_idx, y)
    return LayerProbeReport(rows=rows, config=config, pca=pca, probes=probes)


def _probe_row(layer: int, probe: LayerProbe, text: np.ndarray, mm: np.ndarray, steered: np.ndarray | None,
               y: np.ndarray) -> dict[str, Any]:
    row: dict[str, Any] = {
        "layer": layer,
        "cv_accuracy": probe.cv_accuracy,
        "cv_std": probe.cv_std,
        "C": probe.C,
        "text": probe.evaluate(text, y),
        "image": probe.evaluate(mm, y),
        "steered": probe.evaluate(steered, y) if steered is not None else None,
    }
    row["accuracy_drop"] = row["text"]["accuracy"] - row["image"]["accuracy"]
    row["accuracy_recovered"] = row["steered"]["accuracy"] - row["image"]["accuracy"] if row["steered"] else None
    return row


def _model_config(adapter: Any, positions: str, items: list[Any], y: np.ndarray | None,
                  image: Image.Image | None) -> dict[str, Any]:
    return {
        "model_class": type(adapter.model).__name__,
        "model_name": adapter.model_name,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "positions": positions,
        "n_items": len(items),
        "n_harmful": int((y == HARMFUL).sum()) if y is not None else None,
        "n_benign": int((y != HARMFUL).sum()) if y is not None else None,
        "image": "blank" if image is not None else "item images",
    }


def _pca_view(rows, text, mm_test, steered_test, test_idx, train_idx, y) -> dict[str, Any]:
    """2-D PCA (fitted on text-only training states) of held-out states at the layer with the largest drop."""
    drops = [(r["accuracy_drop"], r["layer"]) for r in rows]
    layer = max(drops)[1]
    pca = PCA(n_components=2, random_state=0).fit(text[layer][train_idx])
    view = {
        "layer": layer,
        "explained_variance_ratio": [float(v) for v in pca.explained_variance_ratio_],
        "labels": ["harmful" if v == HARMFUL else "benign" for v in y[test_idx]],
        "text": pca.transform(text[layer][test_idx]).round(5).tolist(),
        "image": pca.transform(mm_test[layer]).round(5).tolist(),
    }
    if steered_test is not None:
        view["steered"] = pca.transform(steered_test[layer]).round(5).tolist()
    return view


def analyze_shift(model: Any, processor: Any, items: Sequence[Any], *, steering: SteeringConfig | None = None,
                  calibration_items: Sequence[Any] | None = None, read: ReadOptions | None = None,
                  fit: ProbeFit | None = None, **overrides: Any) -> ShiftReport:
    """Per layer, how far an image moves each prompt's representation, and in which direction.

    For every layer: cosine distance, L2 distance (absolute and relative to the text-only norm)
    and linear CKA between the text-only and multimodal states of the same prompts; the norm of
    the dataset-level CMRM shift vector (``steering.vectors``, else calibrated on
    ``calibration_items``, else computed from ``items`` themselves); its projection onto the
    harmful direction of a probe trained on the text-only states (when ``items`` hold at least 2
    harmful and 2 benign prompts), also as a fraction of the harmful-benign gap; and, when
    ``steering`` is active, the same distances after steering, showing how much drift it removes.

    ``read`` and ``fit`` (or their fields as keywords) as for :func:`probe_layers`; the probe is fitted on every
    item, so ``fit.test_size`` does not apply.
    """
    adapter, read, fit = _prepare(model, processor, steering, calibration_items, (read, fit, overrides))
    layer_ids, positions, image = read.layers, read.positions, read.image
    items = list(items)
    text = collect_activations(adapter, None, items, with_images=False, read=read, desc="text-only")
    mm = collect_activations(adapter, None, items, with_images=True, read=read, desc="with image")
    dataset_level = steering is not None and steering.mode == "dataset"
    base = steering if dataset_level else SteeringConfig(mode="dataset", alpha=0.0)
    with_vectors = _with_vectors(adapter, base, calibration_items, (mm, text, "analysed items"), read)
    shift_vectors = with_vectors.vectors
    if steering is not None and steering.mode == "dataset":
        steering = with_vectors
    steered = None
    if steering is not None and steering.active:
        steered = collect_activations(adapter, None, items, with_images=True, read=read, steering=steering,
                                      desc="with image + CMRM")
    probes: dict[int, LayerProbe] = {}
    y = None
    note = None
    try:
        y = labels_from_items(items)
        check_binary(y)
        probes = train_layer_probes(text, y, cv=fit.cv, Cs=fit.Cs, seed=fit.seed, progress=read.progress)
    except InputError as exc:
        note = f"no probe projection: {exc}"
    rows = [_shift_row(l, text, mm, steered, shift_vectors, probes, y) for l in layer_ids]
    config = {
        **_model_config(adapter, positions, items, y, image),
        "vectors_source": vectors_source(shift_vectors),
        "vectors_positions": shift_vectors.meta.get("positions"),
        "steering": steering.describe() if steering is not None and steering.active else None,
        "note": note,
    }
    return ShiftReport(rows=rows, config=config)


def _shift_row(l: int, text: Activations, mm: Activations, steered: Activations | None, shift_vectors: ShiftVectors,
               probes: dict[int, LayerProbe], y: np.ndarray | None) -> dict[str, Any]:
    row: dict[str, Any] = {"layer": l, **layer_shift_metrics(text[l], mm[l])}
    vec = shift_vectors.shifts.get(l)
    row["shift_norm"] = float(vec.norm()) if vec is not None else None
    has_norm = vec is not None and row["text_norm"] > 0
    row["relative_shift_norm"] = row["shift_norm"] / row["text_norm"] if has_norm else None
    if l in probes and vec is not None and y is not None:
        harmful, benign = text[l][y == HARMFUL].mean(0), text[l][y != HARMFUL].mean(0)
        proj = shift_on_direction(vec.numpy(), probes[l].direction, harmful_mean=harmful, benign_mean=benign)
        row.update({"probe_cv_accuracy": probes[l].cv_accuracy, "shift_probe_projection": proj["projection"],
                    "shift_probe_cosine": proj["cosine"], "shift_probe_gap_ratio": proj["gap_ratio"]})
    if steered is not None:
        after = layer_shift_metrics(text[l], steered[l])
        row.update({"steered_cosine_distance": after["cosine_distance"], "steered_l2_distance": after["l2_distance"],
                    "steered_relative_l2": after["relative_l2"], "steered_cka": after["cka"]})
    return row
