"""Experiments: studies run on the bundled testbed, above the library (nothing in the remedies imports them).

* :mod:`~vlmsafe.experiments.compare` — CMRM (real / blank / noise anchor) and ShiftDC chosen on the
  calibration split and reported on the test split (``python -m vlmsafe.cli.compare --out DIR``).
* :mod:`~vlmsafe.experiments.compounding` — how much of the modality gap steering leaves at each layer.
"""
