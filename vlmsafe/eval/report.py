"""Evaluation records and reports: rates, JSON, Markdown, side-by-side comparison.

Every rate is reported with its denominator so a reader can judge its noise: the unsafe rate is
over harmful items, the over-refusal rate over benign items, the utility over items that carry a
reference answer. A rate whose denominator is zero is ``None`` (shown as ``-``), never 0.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from vlmsafe.errors import FileFormatError
from vlmsafe.io import write_json_atomic


@dataclass
class ItemRecord:
    """What happened to one item: the response and the judge's verdict.

    ``unsafe`` is ``None`` for a benign item when the judge only detects compliance (refusal and
    HarmBench judges), because "the model answered" is not unsafe for a benign request.
    ``correct`` is ``None`` when the item has no reference answer.
    """

    id: str
    category: str
    label: str
    prompt: str
    response: str
    unsafe: bool | None
    refused: bool
    correct: bool | None = None
    image: str | None = None
    reference: str | None = None
    judge_category: str | None = None
    judge_raw: str | None = None


def _rate(flags: Iterable[bool | None]) -> tuple[float | None, int]:
    values = [bool(f) for f in flags if f is not None]
    return (sum(values) / len(values) if values else None), len(values)


@dataclass
class EvalReport:
    """Per-item records plus the aggregate rates computed from them.

    Attributes:
        records: one :class:`ItemRecord` per evaluated item, in input order.
        judge: name of the judge that produced the verdicts.
        config: how the run was made (text_only, max_new_tokens, model, alpha, ...); free-form.
    """

    records: list[ItemRecord]
    judge: str = "unknown"
    config: dict[str, Any] = field(default_factory=dict)

    # ---- aggregates -------------------------------------------------------------------------
    @property
    def harmful(self) -> list[ItemRecord]:
        return [r for r in self.records if r.label == "harmful"]

    @property
    def benign(self) -> list[ItemRecord]:
        return [r for r in self.records if r.label == "benign"]

    @property
    def unsafe_rate(self) -> float | None:
        """Share of harmful items whose response the judge found unsafe (attack success rate)."""
        return _rate(r.unsafe for r in self.harmful)[0]

    @property
    def refusal_rate(self) -> float | None:
        """Share of harmful items refused."""
        return _rate(r.refused for r in self.harmful)[0]

    @property
    def over_refusal_rate(self) -> float | None:
        """Share of benign items refused (over-refusal)."""
        return _rate(r.refused for r in self.benign)[0]

    @property
    def utility(self) -> float | None:
        """Accuracy over items with a reference answer."""
        return _rate(r.correct for r in self.records)[0]

    def unsafe_rate_by_category(self) -> dict[str, float | None]:
        """Unsafe rate over harmful items, per category (sorted by name)."""
        return {c: _rate(r.unsafe for r in self.harmful if r.category == c)[0] for c in sorted({r.category for r in self.harmful})}

    def utility_by_category(self) -> dict[str, float | None]:
        """Accuracy per category, over items with a reference answer."""
        cats = sorted({r.category for r in self.records if r.correct is not None})
        return {c: _rate(r.correct for r in self.records if r.category == c)[0] for c in cats}

    def summary(self) -> dict[str, Any]:
        """All aggregate numbers with their denominators, JSON-ready."""
        harmful, benign = self.harmful, self.benign
        benign_unsafe, n_benign_judged = _rate(r.unsafe for r in benign)
        _, n_reference = _rate(r.correct for r in self.records)
        return {
            "judge": self.judge,
            "n_items": len(self.records),
            "n_harmful": len(harmful),
            "n_benign": len(benign),
            "n_with_reference": n_reference,
            "unsafe_rate": self.unsafe_rate,
            "refusal_rate": self.refusal_rate,
            "over_refusal_rate": self.over_refusal_rate,
            "utility": self.utility,
            "benign_unsafe_rate": benign_unsafe if n_benign_judged else None,
            "unsafe_rate_by_category": self.unsafe_rate_by_category(),
            "n_harmful_by_category": {c: sum(r.category == c for r in harmful) for c in sorted({r.category for r in harmful})},
            "utility_by_category": self.utility_by_category(),
        }

    # ---- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary(), "config": self.config, "records": [asdict(r) for r in self.records]}

    def to_json(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write summary, config and all records to ``path`` (atomically; an existing file only with ``overwrite``)."""
        write_json_atomic(path, self.to_dict(), overwrite=overwrite)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> "EvalReport":
        """Read a report written by :meth:`to_json` (aggregates are recomputed from the records)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise FileFormatError(f"report {str(p)!r} does not exist.") from exc
        except json.JSONDecodeError as exc:
            raise FileFormatError(f"{p}, line {exc.lineno}: invalid JSON ({exc.msg}).") from exc
        if not isinstance(data, dict) or not isinstance(data.get("records"), list):
            raise FileFormatError(f"{p}: key 'records' missing; not a vlmsafe evaluation report.")
        names = {f.name for f in fields(ItemRecord)}
        records = []
        for i, rec in enumerate(data["records"]):
            try:
                records.append(ItemRecord(**{k: v for k, v in rec.items() if k in names}))
            except TypeError as exc:
                raise FileFormatError(f"{p}: records[{i}]: {exc}.") from exc
        return cls(records=records, judge=data.get("summary", {}).get("judge", "unknown"), config=data.get("config", {}))

    def to_markdown(self, title: str | None = None) -> str:
        """A Markdown summary table plus a per-category table of unsafe rates."""
        s = self.summary()
        lines = [f"### {title}", ""] if title else []
        lines += [
            f"Judge: `{self.judge}`" + (", text-only (images dropped)" if self.config.get("text_only") else ""),
            "",
            "| metric | value | over |",
            "|---|---:|---|",
            f"| unsafe rate | {fmt_rate(s['unsafe_rate'])} | {s['n_harmful']} harmful |",
            f"| refusal rate | {fmt_rate(s['refusal_rate'])} | {s['n_harmful']} harmful |",
            f"| over-refusal rate | {fmt_rate(s['over_refusal_rate'])} | {s['n_benign']} benign |",
            f"| utility (accuracy) | {fmt_rate(s['utility'])} | {s['n_with_reference']} with reference |",
        ]
        if s["benign_unsafe_rate"] is not None:
            lines.append(f"| unsafe rate on benign | {fmt_rate(s['benign_unsafe_rate'])} | {s['n_benign']} benign |")
        by_cat = s["unsafe_rate_by_category"]
        if len(by_cat) > 1:
            lines += ["", "| category | harmful items | unsafe rate |", "|---|---:|---:|"]
            lines += [f"| {c} | {s['n_harmful_by_category'][c]} | {fmt_rate(v)} |" for c, v in by_cat.items()]
        return "\n".join(lines) + "\n"


def fmt_rate(value: float | None) -> str:
    """``0.625`` -> ``"62.5%"``; ``None`` -> ``"-"``."""
    return "-" if value is None else f"{100 * value:.1f}%"


def compare_reports(reports: Mapping[str, EvalReport]) -> str:
    """One Markdown table comparing several runs (rows in the mapping's order).

    Example::

        print(compare_reports({"text-only": r_text, "multimodal": r_mm, "multimodal + CMRM": r_cmrm}))
    """
    lines = [
        "| setting | unsafe rate | refusal rate | over-refusal | utility | harmful / benign / ref |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, rep in reports.items():
        s = rep.summary()
        lines.append(
            f"| {name} | {fmt_rate(s['unsafe_rate'])} | {fmt_rate(s['refusal_rate'])} | {fmt_rate(s['over_refusal_rate'])} "
            f"| {fmt_rate(s['utility'])} | {s['n_harmful']} / {s['n_benign']} / {s['n_with_reference']} |"
        )
    return "\n".join(lines) + "\n"
