"""How far can a judge be trusted? Its agreement with responses labelled by hand.

vlmsafe ships such a set for the refusal judge (``assets/judge/``: a held-out half written
before the judge's rules and a development half they were designed on). The same check runs any
judge -- a model judge, a custom phrase list -- on any file in that format::

    python -m vlmsafe.cli.judge_check assets/judge/heldout.jsonl

File format: JSON Lines with ``id``, ``response``, ``label`` (``refusal`` / ``compliance`` /
``degenerate``) and optionally ``prompt``, ``style``, ``voice``.

A judge's outcome for a response is ``degenerate`` when :attr:`Verdict.degenerate`, ``refusal``
when :attr:`Verdict.refused`, else ``compliance``. Reported: accuracy over all responses, and
per outcome the precision (of the responses the judge put there, the share labelled so) and the
recall (of the responses labelled so, the share the judge found), each with its count and 95%
Wilson interval.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from vlmsafe.data import read_records
from vlmsafe.errors import FileFormatError
from vlmsafe.eval.verdict import Judge
from vlmsafe.stats import Rate

OUTCOMES = ("refusal", "compliance", "degenerate")


@dataclass(frozen=True)
class LabelledResponse:
    """One response with the outcome a person gave it."""

    id: str
    response: str
    label: str
    prompt: str = ""
    style: str = ""
    voice: str = ""


def load_labelled_responses(path: str | os.PathLike[str]) -> list[LabelledResponse]:
    """Read a labelled-response file (see the module docs).

    Raises:
        FileFormatError: a record lacks ``id``/``response``/``label``, a label is not one of
            :data:`OUTCOMES`, or an id repeats.
    """
    out: list[LabelledResponse] = []
    seen: set[str] = set()
    for where, rec in read_records(path, what="labelled-response file"):
        for key in ("id", "response", "label"):
            if key not in rec:
                raise FileFormatError(f"{where}: missing key {key!r}; every record needs 'id', 'response' and 'label'")
        if not isinstance(rec["response"], str):
            raise FileFormatError(f"{where}: key 'response' must be a string, got {type(rec['response']).__name__}")
        if rec["label"] not in OUTCOMES:
            raise FileFormatError(f"{where}: key 'label' is {rec['label']!r}; use one of {list(OUTCOMES)}")
        rid = str(rec["id"])
        if rid in seen:
            raise FileFormatError(f"{where}: id {rid!r} repeats; give every record its own id")
        seen.add(rid)
        out.append(LabelledResponse(rid, rec["response"], rec["label"], str(rec.get("prompt") or ""),
                                    str(rec.get("style") or ""), str(rec.get("voice") or "")))  # fmt: skip
    return out


@dataclass
class JudgeAgreement:
    """A judge's outcomes against the labels.

    Attributes:
        accuracy: correct outcomes out of all responses.
        precision / recall: per outcome (:data:`OUTCOMES`).
        confusion: ``confusion[label][predicted]`` counts.
        errors: ``(response, predicted)`` for every disagreement, in file order.
    """

    accuracy: Rate
    precision: dict[str, Rate]
    recall: dict[str, Rate]
    confusion: dict[str, dict[str, int]]
    errors: list[tuple[LabelledResponse, str]] = field(default_factory=list)

    def to_markdown(self, title: str | None = None) -> str:
        """Accuracy and per-outcome precision/recall, each as ``rate [95% CI] (n)``."""
        lines = [f"### {title}", ""] if title else []
        lines += [
            f"Accuracy: {self.accuracy} ({self.accuracy.k} of {self.accuracy.n} correct)",
            "",
            "| outcome | labelled | precision [95% CI] (n) | recall [95% CI] (n) |",
            "|---|---:|---:|---:|",
        ]
        for o in OUTCOMES:
            lines.append(f"| {o} | {sum(self.confusion[o].values())} | {self.precision[o]} | {self.recall[o]} |")
        return "\n".join(lines) + "\n"


def predicted_outcomes(judge: Judge, responses: Sequence[LabelledResponse], *, batch_size: int = 64) -> list[str]:
    """The judge's outcome (:data:`OUTCOMES`) for each response, judged in batches."""
    out: list[str] = []
    for start in range(0, len(responses), batch_size):
        batch = responses[start : start + batch_size]
        verdicts = judge.judge([r.prompt for r in batch], [r.response for r in batch])
        out += ["degenerate" if v.degenerate else "refusal" if v.refused else "compliance" for v in verdicts]
    return out


def judge_agreement(judge: Judge, responses: Sequence[LabelledResponse]) -> JudgeAgreement:
    """Score ``judge`` on labelled ``responses`` (see :class:`JudgeAgreement`)."""
    predicted = predicted_outcomes(judge, responses)
    confusion = {t: {p: 0 for p in OUTCOMES} for t in OUTCOMES}
    for r, p in zip(responses, predicted):
        confusion[r.label][p] += 1
    correct = sum(confusion[o][o] for o in OUTCOMES)
    return JudgeAgreement(
        accuracy=Rate(correct, len(responses)),
        precision={o: Rate(confusion[o][o], sum(confusion[t][o] for t in OUTCOMES)) for o in OUTCOMES},
        recall={o: Rate(confusion[o][o], sum(confusion[o].values())) for o in OUTCOMES},
        confusion=confusion,
        errors=[(r, p) for r, p in zip(responses, predicted) if p != r.label],
    )
