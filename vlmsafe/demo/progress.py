"""One progress bar over the whole demo, with named stages and an ETA.

The demo runs about 150 evaluations (each tuning setting is one or more), so a bar per evaluation told a
newcomer nothing about how long the run would take. :class:`DemoProgress` is a single ``tqdm`` bar whose unit is
a generated item (the demo's cost is generation) and whose description is the current stage ("test multimodal",
"tune CMRM sample-level 3/12", "merge sweep", ...). Its total is the sum of every stage's estimate, known before
the run from the split sizes and the tuning grids; a stage that ends below its estimate (a tuning grid that stops
early, a merge with no weight to test) gives the difference back, one that runs over raises it, and a tuning
stage re-estimates what is left from the items its settings have cost so far -- so the ETA tqdm derives from the
rate and ``total - n`` covers the whole run and converges as it goes.

The inner bars (``evaluate``'s, ``calibrate``'s) are disabled while the demo drives them: ``evaluate`` reports
each batch to :meth:`DemoProgress.advance` through its ``progress=`` callback.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm


class DemoProgress:
    """The demo's one bar. ``plan``: ``(stage, estimated items)`` pairs; a stage not in the plan starts at 0.

    ``labels`` records every description shown, in order (what a test or a log reads back)."""

    def __init__(self, plan: Sequence[tuple[str, int]] = (), *, enabled: bool = True, file: Any = None) -> None:
        self.estimates: dict[str, int] = {}
        for stage, items in plan:
            self.estimates[stage] = self.estimates.get(stage, 0) + max(0, int(items))
        self.current: str | None = None
        self.stage_done = 0
        self.done = 0
        self.labels: list[str] = []
        self.bar = tqdm(total=self.total, unit="item", desc="demo", disable=not enabled, file=file,
                        dynamic_ncols=True, smoothing=0.1)

    @property
    def total(self) -> int:
        return sum(self.estimates.values())

    def stage(self, name: str, label: str | None = None) -> None:
        """End the current stage (its estimate becomes what it cost) and start ``name``."""
        self._end()
        self.current, self.stage_done = name, 0
        self.estimates.setdefault(name, 0)
        self.describe(label or name)

    def describe(self, label: str) -> None:
        """Show ``label`` as the bar's description (e.g. a tuning stage's "3/12")."""
        self.labels.append(label)
        self.bar.set_description_str(label, refresh=False)
        self._refresh()

    def expect(self, remaining: int) -> None:
        """The current stage has about ``remaining`` items left (a re-estimate: the total follows)."""
        if self.current is not None:
            self.estimates[self.current] = self.stage_done + max(0, int(remaining))
            self._refresh()

    def rename(self, old: str, new: str) -> None:
        """A planned stage gets its real name once known (a steering method's, after it is built)."""
        if old in self.estimates and old != new:
            self.estimates[new] = self.estimates.get(new, 0) + self.estimates.pop(old)

    def advance(self, items: int) -> None:
        """``items`` generated (``evaluate``'s per-batch callback); a stage past its estimate raises the total."""
        self.done += items
        self.stage_done += items
        if self.current is not None and self.stage_done > self.estimates[self.current]:
            self.estimates[self.current] = self.stage_done
        self.bar.total = self.total
        self.bar.update(items)

    def skip(self, name: str) -> None:
        """A planned stage will not run (a method with no qualifying setting has no test stage): it costs nothing."""
        if name in self.estimates and name != self.current:
            self.estimates[name] = 0
            self._refresh()

    def close(self) -> None:
        self._end()
        self.current = None
        self.bar.close()

    def _end(self) -> None:
        if self.current is not None:
            self.estimates[self.current] = self.stage_done
            self._refresh()

    def _refresh(self) -> None:
        self.bar.total = self.total
        self.bar.refresh()


def tracker_of(ctx: Any) -> DemoProgress | None:
    """The demo's bar on a context (``None`` for contexts without one, e.g. a test's stand-in)."""
    return getattr(ctx, "tracker", None)


def stage(ctx: Any, name: str, label: str | None = None) -> None:
    tracker = tracker_of(ctx)
    if tracker is not None:
        tracker.stage(name, label)


def describe(ctx: Any, label: str) -> None:
    tracker = tracker_of(ctx)
    if tracker is not None:
        tracker.describe(label)


def expect(ctx: Any, remaining: int) -> None:
    tracker = tracker_of(ctx)
    if tracker is not None:
        tracker.expect(remaining)


def skip(ctx: Any, name: str) -> None:
    tracker = tracker_of(ctx)
    if tracker is not None:
        tracker.skip(name)


def advance(ctx: Any, items: int) -> None:
    """Count work the demo does outside ``evaluate`` (a calibration pass, generated images) when it ends."""
    tracker = tracker_of(ctx)
    if tracker is not None:
        tracker.advance(items)
