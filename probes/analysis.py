"""Model-level analyses: layer-wise safety probes and the multimodal shift, as report objects.

:func:`probe_layers` answers "at which layers is harmfulness linearly readable, and how much of
that survives an image (and CMRM)?"; :func:`analyze_shift` answers "how far does an image move
each layer's representation, and how much of the move lies along the harmful direction?".
Both return plain dataclasses whose :meth:`to_dict` is the JSON report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split

from vlmsafe.adapters import get_adapter
from vlmsafe.errors import InputError
from vlmsafe.steering import ShiftVectors

from probes.collect import Activations, Steering, collect_activations, vectors_from_activations, vectors_source
from probes.linear import DEFAULT_CS, HARMFUL, LayerProbe, check_binary, labels_from_items, train_layer_probes
from probes.shift import layer_shift_metrics, shift_on_direction

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


def _resolve_vectors(
    adapter: Any,
    vectors: ShiftVectors | None,
    calibration_items: Sequence[Any] | None,
    fallback: tuple[Activations, Activations, str] | None,
    *,
    layers: list[int],
    positions: str,
    image: Image.Image | None,
    batch_size: int,
    progress: bool,
) -> ShiftVectors | None:
    """User vectors > vectors calibrated on ``calibration_items`` > vectors from ``fallback`` activations."""
    if vectors is not None:
        vectors.check_compatible(adapter)
        return vectors
    if calibration_items is not None:
        kw = dict(layers=layers, positions=positions, batch_size=batch_size, progress=progress)
        mm = collect_activations(adapter, None, calibration_items, with_images=True, image=image, desc="calibration (image)", **kw)
        text = collect_activations(adapter, None, calibration_items, with_images=False, desc="calibration (text)", **kw)
        return vectors_from_activations(adapter, mm, text, positions=positions, source="calibration split")
    if fallback is not None:
        mm, text, source = fallback
        return vectors_from_activations(adapter, mm, text, positions=positions, source=source)
    return None


def probe_layers(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    *,
    layers: Sequence[int] | str | None = None,
    positions: str = "last",
    test_size: float = 0.3,
    cv: int = 5,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    image: Image.Image | None = None,
    vectors: ShiftVectors | None = None,
    calibration_items: Sequence[Any] | None = None,
    steer_cmrm: bool = True,
    sample_level: bool = False,
    alpha: float = 1.0,
    steer_layers: Sequence[int] | str | None = None,
    steer_positions: str = "last",
    batch_size: int = 8,
    progress: bool = True,
) -> LayerProbeReport:
    """Train a probe per layer on text-only inputs and test it with and without images.

    ``items`` carry ``label`` = ``"harmful"`` | ``"benign"`` (e.g. :class:`vlmsafe.eval.EvalItem`)
    and an image (or pass ``image=``, e.g. a blank one). They are split (stratified, ``test_size``)
    into a training set, on which each layer's probe is cross-validated and fitted from the
    text-only hidden states, and a held-out set, on which the probe is evaluated:

    (a) ``text``: held-out prompts, text-only;  (b) ``image``: the same prompts with their image;
    (c) ``steered``: with their image under CMRM steering.

    The drop (a) -> (b) measures how much the image moves the safety-relevant representation;
    (c) shows how much CMRM recovers. CMRM vectors are ``vectors`` if given, else calibrated on
    ``calibration_items``, else computed on the fly from the training split (disjoint from the
    held-out set); ``sample_level=True`` uses sample-level CMRM instead (no vectors).
    ``steer_cmrm=False`` skips (c).
    """
    adapter = get_adapter(model, processor)
    layer_ids = adapter.resolve_layers(layers)
    steer_layers = adapter.resolve_layers(steer_layers) if steer_layers is not None else None
    if sample_level and (vectors is not None or calibration_items is not None):
        raise InputError("sample-level CMRM measures each prompt's own shift: drop the vectors / calibration items, or sample_level")
    items = list(items)
    y = labels_from_items(items)
    check_binary(y, min_per_class=4, what="data set")
    idx = np.arange(len(items))
    train_idx, test_idx = train_test_split(idx, test_size=test_size, stratify=y, random_state=seed)
    check_binary(y[train_idx], what="training split")
    kw = dict(layers=layer_ids, positions=positions, batch_size=batch_size, progress=progress)
    text = collect_activations(adapter, None, items, with_images=False, desc="text-only", **kw)
    need_train_mm = steer_cmrm and not sample_level and vectors is None and calibration_items is None
    mm_idx = idx if need_train_mm else test_idx
    mm_part = collect_activations(adapter, None, [items[i] for i in mm_idx], with_images=True, image=image, desc="with image", **kw)
    pos = {int(i): k for k, i in enumerate(mm_idx)}
    mm_test = {l: a[[pos[int(i)] for i in test_idx]] for l, a in mm_part.items()}

    steered_test: Activations | None = None
    shift_vectors = None
    steering = None
    if steer_cmrm:
        fallback = None
        if need_train_mm:
            mm_train = {l: a[[pos[int(i)] for i in train_idx]] for l, a in mm_part.items()}
            fallback = (mm_train, {l: a[train_idx] for l, a in text.items()}, "training split (on the fly)")
        if not sample_level:
            shift_vectors = _resolve_vectors(adapter, vectors, calibration_items, fallback, layers=layer_ids,
                                             positions=positions, image=image, batch_size=batch_size, progress=progress)
        steering = Steering(shift_vectors, alpha=alpha, layers=steer_layers, positions=steer_positions, sample_level=sample_level)
        steered_test = collect_activations(adapter, None, [items[i] for i in test_idx], with_images=True, image=image,
                                           steering=steering, desc="with image + CMRM", **kw)

    probes = train_layer_probes({l: a[train_idx] for l, a in text.items()}, y[train_idx], cv=cv, Cs=Cs, seed=seed, progress=progress)
    y_test = y[test_idx]
    rows = []
    for l in layer_ids:
        probe = probes[l]
        row: dict[str, Any] = {
            "layer": l,
            "cv_accuracy": probe.cv_accuracy,
            "cv_std": probe.cv_std,
            "C": probe.C,
            "text": probe.evaluate(text[l][test_idx], y_test),
            "image": probe.evaluate(mm_test[l], y_test),
            "steered": probe.evaluate(steered_test[l], y_test) if steered_test is not None else None,
        }
        row["accuracy_drop"] = row["text"]["accuracy"] - row["image"]["accuracy"]
        row["accuracy_recovered"] = row["steered"]["accuracy"] - row["image"]["accuracy"] if row["steered"] else None
        rows.append(row)

    config = {
        "model_class": type(adapter.model).__name__,
        "model_name": adapter.model_name,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "positions": positions,
        "n_items": len(items),
        "n_train": int(len(train_idx)),
        "n_test": int(len(test_idx)),
        "n_harmful": int((y == HARMFUL).sum()),
        "n_benign": int((y != HARMFUL).sum()),
        "test_size": test_size,
        "majority_baseline": float(max(y_test.mean(), 1 - y_test.mean())),
        "cv_folds": probes[layer_ids[0]].cv_folds,
        "Cs": list(Cs),
        "seed": seed,
        "image": "blank" if image is not None else "item images",
        "steering": steering.describe() if steer_cmrm else None,
    }
    pca = _pca_view(rows, text, mm_test, steered_test, test_idx, train_idx, y)
    return LayerProbeReport(rows=rows, config=config, pca=pca, probes=probes)


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


def analyze_shift(
    model: Any,
    processor: Any,
    items: Sequence[Any],
    *,
    layers: Sequence[int] | str | None = None,
    positions: str = "last",
    image: Image.Image | None = None,
    vectors: ShiftVectors | None = None,
    calibration_items: Sequence[Any] | None = None,
    sample_level: bool = False,
    alpha: float = 1.0,
    steer_layers: Sequence[int] | str | None = None,
    steer_positions: str = "last",
    cv: int = 5,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> ShiftReport:
    """Per layer, how far an image moves each prompt's representation, and in which direction.

    For every layer: cosine distance, L2 distance (absolute and relative to the text-only norm)
    and linear CKA between the text-only and multimodal states of the same prompts; the norm of
    the dataset-level CMRM shift vector (``vectors``, else calibrated on ``calibration_items``,
    else computed from ``items`` themselves); its projection onto the harmful direction of a
    probe trained on the text-only states (when ``items`` hold at least 2 harmful and 2 benign
    prompts), also as a fraction of the harmful-benign gap; and, when ``alpha != 0``, the same
    distances after CMRM steering (dataset-level with those vectors, or ``sample_level``),
    showing how much of the drift steering removes.
    """
    adapter = get_adapter(model, processor)
    layer_ids = adapter.resolve_layers(layers)
    steer_layers = adapter.resolve_layers(steer_layers) if steer_layers is not None else None
    items = list(items)
    kw = dict(layers=layer_ids, positions=positions, batch_size=batch_size, progress=progress)
    text = collect_activations(adapter, None, items, with_images=False, desc="text-only", **kw)
    mm = collect_activations(adapter, None, items, with_images=True, image=image, desc="with image", **kw)
    shift_vectors = _resolve_vectors(adapter, vectors, calibration_items, (mm, text, "analysed items"), layers=layer_ids,
                                     positions=positions, image=image, batch_size=batch_size, progress=progress)
    steered = None
    steering = Steering(shift_vectors, alpha=alpha, layers=steer_layers, positions=steer_positions, sample_level=sample_level)
    if alpha != 0:
        steered = collect_activations(adapter, None, items, with_images=True, image=image, steering=steering,
                                      desc="with image + CMRM", **kw)

    probes: dict[int, LayerProbe] = {}
    y = None
    note = None
    try:
        y = labels_from_items(items)
        check_binary(y)
        probes = train_layer_probes(text, y, cv=cv, Cs=Cs, seed=seed, progress=progress)
    except InputError as exc:
        note = f"no probe projection: {exc}"

    rows = []
    for l in layer_ids:
        row: dict[str, Any] = {"layer": l, **layer_shift_metrics(text[l], mm[l])}
        vec = shift_vectors.shifts.get(l)
        row["shift_norm"] = float(vec.norm()) if vec is not None else None
        row["relative_shift_norm"] = row["shift_norm"] / row["text_norm"] if vec is not None and row["text_norm"] > 0 else None
        if l in probes and vec is not None:
            harmful, benign = text[l][y == HARMFUL].mean(0), text[l][y != HARMFUL].mean(0)
            proj = shift_on_direction(vec.numpy(), probes[l].direction, harmful_mean=harmful, benign_mean=benign)
            row.update({"probe_cv_accuracy": probes[l].cv_accuracy, "shift_probe_projection": proj["projection"],
                        "shift_probe_cosine": proj["cosine"], "shift_probe_gap_ratio": proj["gap_ratio"]})
        if steered is not None:
            after = layer_shift_metrics(text[l], steered[l])
            row.update({"steered_cosine_distance": after["cosine_distance"], "steered_l2_distance": after["l2_distance"],
                        "steered_relative_l2": after["relative_l2"], "steered_cka": after["cka"]})
        rows.append(row)

    config = {
        "model_class": type(adapter.model).__name__,
        "model_name": adapter.model_name,
        "num_layers": adapter.num_layers,
        "hidden_size": adapter.hidden_size,
        "positions": positions,
        "n_items": len(items),
        "n_harmful": int((y == HARMFUL).sum()) if y is not None else None,
        "n_benign": int((y != HARMFUL).sum()) if y is not None else None,
        "image": "blank" if image is not None else "item images",
        "vectors_source": vectors_source(shift_vectors),
        "vectors_positions": shift_vectors.meta.get("positions"),
        "steering": steering.describe() if alpha != 0 else None,
        "note": note,
    }
    return ShiftReport(rows=rows, config=config)
