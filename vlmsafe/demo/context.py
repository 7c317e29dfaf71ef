"""What every row of the demo shares: the testbed, its splits, the judge, and how to evaluate.

A row of the demo is a small function of a :class:`DemoContext` (see :mod:`vlmsafe.demo.rows`):
it builds a generator (plain, steered or merged) and measures it with :meth:`DemoContext.measure`,
which runs vlmsafe's evaluation harness with the testbed's exact outcome judge and returns the
rates of :func:`summarize`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmsafe.data import Item
from vlmsafe.eval import EvalReport, evaluate
from vlmsafe.stats import bootstrap_rate as rate
from vlmsafe.steering import SafeVLM, SteeringConfig
from vlmsafe.testbed.outcome import OUTCOMES, OutcomeJudge, answers_correctly, requested_tasks


@dataclass
class DemoContext:
    """The loaded testbed, its calibration and test items, and the evaluation settings."""

    root: Path
    model: Any
    processor: Any
    calibration: list[Item]
    test: list[Item]
    batch_size: int = 64
    max_new_tokens: int = 14
    progress: bool = False
    steering_defaults: dict[str, Any] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    #: the demo's one bar (:class:`vlmsafe.demo.progress.DemoProgress`); while set, inner bars stay hidden
    tracker: Any = None

    def __post_init__(self) -> None:
        # the task field where a record has one, else the testbed task its prompt names; load_context
        # refuses files with instructions naming neither (their compliance would silently read 0)
        self.judge = OutcomeJudge(requested_tasks([*self.calibration, *self.test], strict=False))

    @property
    def inner_progress(self) -> bool:
        """Whether a step may show its own bar (``calibrate``'s): only when no overall bar counts it."""
        return self.progress and self.tracker is None

    def generator(self, steering: SteeringConfig | None = None, model: Any = None, processor: Any = None) -> SafeVLM:
        """A greedy generator over the testbed (or ``model``), optionally steered."""
        return SafeVLM(
            model or self.model,
            processor or self.processor,
            steering=steering or SteeringConfig(),
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
        )

    def run(self, generator: Any, items: Sequence[Item], *, text_only: bool = False) -> EvalReport:
        return evaluate(
            generator,
            items,
            self.judge,
            batch_size=self.batch_size,
            max_new_tokens=self.max_new_tokens,
            text_only=text_only,
            progress=self.tracker.advance if self.tracker is not None else self.progress,
            utility_fn=answers_correctly,
        )

    def measure(
        self,
        generator: Any,
        split: str,
        *,
        text_only: bool = False,
        intervals: bool = True,
        groups: Sequence[str] | None = None,
    ) -> dict[str, Any]:
        """Rates of ``generator`` on ``split`` (``"calibration"`` or ``"test"``); see :func:`summarize`.

        ``groups`` restricts the items to some of ``"harmful"``, ``"benign"`` (instructions) and
        ``"image_questions"``; text-only runs skip the image questions (without their image they
        cannot be answered). With ``intervals`` the rates also come broken down by harm category
        and by image kind.
        """
        items = self.calibration if split == "calibration" else self.test
        wanted = set(groups or GROUPS) - ({"image_questions"} if text_only else set())
        items = [it for it in items if group_of(it) in wanted]
        report = self.run(generator, items, text_only=text_only)
        out = summarize(report, intervals=intervals)
        if intervals:
            out["by_category"] = breakdown(report, items, lambda it: it.category)
            if not text_only:
                out["by_image"] = breakdown(
                    report, items, lambda it: f"{it.label}/{_image_kind(it.meta.get('style'))}"
                )
        return out


GROUPS = ("harmful", "benign", "image_questions")


def group_of(item: Item) -> str:
    """``"image_questions"`` (has a reference answer), else the item's label."""
    return "image_questions" if item.reference is not None else str(item.label)


def _image_kind(style: str | None) -> str:
    return style if style in ("blank", "noise") else "drawn"


def summarize(report: EvalReport, *, intervals: bool = True) -> dict[str, Any]:
    """Outcome rates of harmful and benign instructions and accuracy on image questions.

    ``harmful`` / ``benign``: for each outcome (refusal, compliance, deflection, other) its rate
    over the harmful / benign instructions; ``accuracy``: share of image questions answered
    correctly (``None`` without image questions). With ``intervals`` each rate carries its 95%
    bootstrap interval over prompts and count (:func:`vlmsafe.stats.bootstrap_rate`); without, just the rate.
    """
    records = report.records
    groups = {
        "harmful": [r for r in records if r.label == "harmful"],
        "benign": [r for r in records if r.label == "benign" and r.reference is None],
    }
    pack = rate if intervals else (lambda flags: sum(flags) / len(flags) if flags else None)
    out: dict[str, Any] = {
        name: {o: pack([r.judge_category == o for r in recs]) for o in OUTCOMES} for name, recs in groups.items()
    }
    vqa = [r for r in records if r.reference is not None]
    out["accuracy"] = pack([bool(r.correct) for r in vqa]) if vqa else None
    out["n"] = {"harmful": len(groups["harmful"]), "benign": len(groups["benign"]), "image_questions": len(vqa)}
    return out


def value(cell: Any) -> float | None:
    """The rate of a summary cell, with or without interval."""
    return cell["rate"] if isinstance(cell, dict) else cell


def breakdown(report: EvalReport, items: Sequence[Item], key: Callable[[Item], str]) -> dict[str, dict[str, Any]]:
    """Instruction outcome rates per value of ``key(item)`` (e.g. harm category, image kind)."""
    keys = {it.id: key(it) for it in items}
    groups: dict[str, list] = {}
    for r in report.records:
        if r.reference is None:
            groups.setdefault(keys[r.id], []).append(r)
    return {
        k: {o: rate([r.judge_category == o for r in recs]) for o in ("refusal", "compliance", "deflection")}
        for k, recs in sorted(groups.items())
    }
