"""Analysis tools to run before choosing a safety intervention for a vision-language model.

* :func:`probe_layers` -- per-layer linear harmful/benign probes trained on text-only inputs and
  tested text-only, with images and with images + CMRM steering;
* :func:`analyze_shift` -- per-layer cosine / L2 / linear-CKA distance between multimodal and
  text-only states of the same prompts, the CMRM shift and its harmful-direction component;
* :func:`weight_change` -- per-layer, per-module relative weight change between two checkpoints;
* :func:`write_report` -- JSON + PNG for any of the three (``vlmsafe probe layers|shift|weights``).

>>> from probes import probe_layers, write_report
>>> report = probe_layers(model, processor, items)          # items: vlmsafe.data.Item with labels + images
>>> write_report(report, "reports/")                         # reports/layers.json + layers.png

The names below are imported lazily (on first access), so ``vlmsafe.cli.probe`` -- imported by every
``vlmsafe`` invocation -- does not pay for sklearn, matplotlib and torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "LayerProbeReport": "probes.analysis",
    "ShiftReport": "probes.analysis",
    "analyze_shift": "probes.analysis",
    "probe_layers": "probes.analysis",
    "blank_image": "vlmsafe.images",  # one owner: the same image the steering anchors use
    "ReadOptions": "probes.collect",
    "collect_activations": "probes.collect",
    "vectors_from_activations": "probes.collect",
    "LayerProbe": "probes.linear",
    "ProbeFit": "probes.linear",
    "fit_probe": "probes.linear",
    "labels_from_items": "probes.linear",
    "train_layer_probes": "probes.linear",
    "plot_layer_probes": "probes.plots",
    "plot_shift": "probes.plots",
    "plot_weight_change": "probes.plots",
    "summary_table": "probes.report",
    "write_report": "probes.report",
    "cosine_distance": "probes.shift",
    "l2_distance": "probes.shift",
    "layer_shift_metrics": "probes.shift",
    "linear_cka": "probes.shift",
    "shift_on_direction": "probes.shift",
    "WeightChangeReport": "probes.weights",
    "canonical_name": "probes.weights",
    "classify": "probes.weights",
    "weight_change": "probes.weights",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # static analysers see the real names
    from probes.analysis import LayerProbeReport, ShiftReport, analyze_shift, probe_layers  # noqa: F401
    from probes.collect import ReadOptions, collect_activations, vectors_from_activations  # noqa: F401
    from probes.linear import LayerProbe, ProbeFit, fit_probe, labels_from_items, train_layer_probes  # noqa: F401
    from probes.plots import plot_layer_probes, plot_shift, plot_weight_change  # noqa: F401
    from probes.report import summary_table, write_report  # noqa: F401
    from probes.shift import cosine_distance, l2_distance, layer_shift_metrics, linear_cka, shift_on_direction  # noqa: F401
    from probes.weights import WeightChangeReport, canonical_name, classify, weight_change  # noqa: F401
    from vlmsafe.images import blank_image  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'probes' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
