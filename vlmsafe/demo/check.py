"""Measure a (re)built testbed with the demo and record the figures where readers see them.

    python -m vlmsafe.cli.demo_check [--testbed DIR] [--unseen JSONL] [--write] [--readme README.md]

Runs :func:`vlmsafe.demo.run_demo` on the testbed's test split (and, with ``--unseen``, on an
independent check set written by ``python -m vlmsafe.cli.build_unseen``). ``--write`` records the
figures in the testbed's ``build_info.json`` (``measured``) and ``README.md``; ``--readme`` also
regenerates the demo block of the project README and its figures (``assets/readme/*.png``). No
figure is ever typed by hand.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from vlmsafe.demo.run import DemoOptions, run_demo
from vlmsafe.demo.table import format_table, merge_paragraph
from vlmsafe.io import write_json_atomic
from vlmsafe.reading import read_json
from vlmsafe.testbed.readme import write_readme


def measure_testbed(
    path: str | Path | None = None,
    *,
    test: str | Path | None = None,
    figures: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The demo's report on the testbed at ``path`` (on ``test`` when given); figures copied to ``figures``."""
    with tempfile.TemporaryDirectory(prefix="vlmsafe-check-") as tmp:
        report = run_demo(Path(tmp) / "demo", DemoOptions(all_methods=True), testbed=path, test=test,
                          progress=progress)
        if figures is not None:
            figures.mkdir(parents=True, exist_ok=True)
            for name in ("cmrm_sweep.png", "merge_sweep.png"):
                if (Path(tmp) / "demo" / name).is_file():
                    shutil.copyfile(Path(tmp) / "demo" / name, figures / name)
    return report


def weight_changes(root: Path) -> list[dict[str, Any]]:
    """Relative change of each LM layer from the aligned LM to the VLM's LM (``vlmsafe probe weights``)."""
    from probes import weight_change

    report = weight_change(root / "aligned_lm", root, progress=False)
    return [{"layer": r["layer"], "relative_change": r["relative_change"]} for r in report.layers]


def record(root: Path, report: dict[str, Any], unseen: dict[str, Any] | None) -> None:
    """Write the measured figures into ``build_info.json`` and ``README.md`` of the testbed."""
    info = read_json(root / "build_info.json", what="testbed build info")
    info["measured"] = report
    if unseen is not None:
        info["measured_unseen"] = unseen
    info["weight_change"] = weight_changes(root)
    write_json_atomic(root / "build_info.json", info, overwrite=True)
    write_readme(
        root,
        info,
        table=format_table(report["rows"]),
        unseen_table=format_table(unseen["rows"]) if unseen else None,
        notes=merge_paragraph(report, info["weight_change"]).replace("assets/testbed", "<this folder>"),
    )


if __name__ == "__main__":  # pragma: no cover  (the command moved to the CLI package with all argparse code)
    raise SystemExit("`python -m vlmsafe.demo.check` is now `python -m vlmsafe.cli.demo_check`")
