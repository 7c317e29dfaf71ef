"""``vlmsafe demo``: the problem and the remedies, measured on the bundled testbed (no downloads).

* :mod:`~vlmsafe.demo.run` -- :func:`run_demo`, the whole demo;
* :mod:`~vlmsafe.demo.rows` -- one small function per table row (text-only, multimodal, each
  steering method); :mod:`~vlmsafe.demo.merge` -- the safety-merge row and its weight sweep;
* :mod:`~vlmsafe.demo.tune` -- choosing a setting on the calibration split by genuine refusals;
* :mod:`~vlmsafe.demo.context` -- measuring, with 95% intervals (:func:`vlmsafe.stats.bootstrap_rate`);
* :mod:`~vlmsafe.demo.table` / :mod:`~vlmsafe.demo.plots` -- the table, README block and figures;
* :mod:`~vlmsafe.demo.progress` -- one bar over the whole run, with named stages and an ETA;
* :mod:`~vlmsafe.demo.check` -- measure a (re)built testbed and record the figures in its README.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmsafe._lazy import attach

if TYPE_CHECKING:  # the public names and their modules, for static tools; at run time
    # vlmsafe._lazy.attach reads this block and loads each name's module on first access
    from vlmsafe.demo.run import DEFAULT_ALPHAS, DemoOptions, normalize_alphas, run_demo
    from vlmsafe.demo.table import format_table

__all__ = ["DEFAULT_ALPHAS", "DemoOptions", "format_table", "normalize_alphas", "run_demo"]

__getattr__, __dir__ = attach(__name__)
