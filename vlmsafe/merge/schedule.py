"""Per-layer and per-tensor schedules for merge parameters (weight, density).

A schedule is written in a config file (or passed in Python) as one of:

* a number: the same value for every tensor, e.g. ``weight: 0.5``;
* a list: one value per decoder layer, or fewer anchor values that are linearly interpolated
  over the layers (mergekit's "gradient" convention), e.g. ``weight: [0.2, 0.8]`` ramps from 0.2
  at layer 0 to 0.8 at the last layer;
* a mapping ``{default: 0.5, layers: [...], rules: [{pattern: REGEX, value: X}, ...]}``.

Resolution order for a tensor: the first rule whose regex is found (``re.search``) in the
tensor's output name, else the layer value if the tensor belongs to a decoder layer, else
``default``. Layer indices come from the language-model name (``model.layers.N.``), so vision
tower layers never pick up a decoder-layer value.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vlmsafe.errors import InputError
from vlmsafe.merge.keymap import layer_index

__all__ = ["Rule", "Schedule", "layer_index"]


@dataclass(frozen=True)
class Rule:
    """A regex on tensor names and the value it sets."""

    pattern: str
    value: float
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "regex", re.compile(self.pattern))
        except re.error as exc:
            raise InputError(f"bad regex {self.pattern!r} in a schedule rule: {exc}; fix the pattern.") from exc


@dataclass(frozen=True)
class Schedule:
    """A merge parameter that may vary per decoder layer and per tensor-name rule."""

    default: float
    layers: tuple[float, ...] | None = None
    rules: tuple[Rule, ...] = ()

    @classmethod
    def parse(cls, spec: Any, *, name: str = "weight") -> Schedule:
        """Build a schedule from a number, a list or a mapping (see the module docstring)."""
        if isinstance(spec, Schedule):
            return spec
        if isinstance(spec, bool) or spec is None:
            raise InputError(f"{name}: expected a number, a list or a mapping, got {spec!r}.")
        if isinstance(spec, (int, float)):
            return cls(default=_float(spec, name))
        if isinstance(spec, (list, tuple)):
            values = _floats(spec, name)
            return cls(default=values[-1], layers=values)
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"default", "layers", "rules"}
            if unknown:
                raise InputError(f"{name}: unknown keys {sorted(unknown)}; allowed: default, layers, rules.")
            layers = _floats(spec["layers"], f"{name}.layers") if spec.get("layers") is not None else None
            if "default" in spec:
                default = _float(spec["default"], f"{name}.default")
            elif layers is not None:
                default = layers[-1]
            else:
                raise InputError(f"{name}: a mapping schedule needs `default` (or `layers`).")
            rules = []
            for i, r in enumerate(spec.get("rules") or []):
                if not isinstance(r, Mapping) or set(r) != {"pattern", "value"}:
                    raise InputError(f"{name}.rules[{i}]: write each rule as {{pattern: REGEX, value: NUMBER}}.")
                rules.append(Rule(str(r["pattern"]), _float(r["value"], f"{name}.rules[{i}].value")))
            return cls(default=default, layers=layers, rules=tuple(rules))
        raise InputError(f"{name}: expected a number, a list or a mapping, got {type(spec).__name__}.")

    def items(self, name: str = "weight") -> Iterator[tuple[str, float]]:
        """Every number of the schedule with where it sits (``weight.layers[3]``), for range checks."""
        for i, v in enumerate(self.layers or ()):
            yield f"{name}.layers[{i}]", v
        for i, r in enumerate(self.rules):
            yield f"{name}.rules[{i}].value", r.value
        yield (f"{name}.default" if not self.is_constant else name), self.default

    @property
    def is_constant(self) -> bool:
        return self.layers is None and not self.rules

    def value(self, name: str, layer: int | None, num_layers: int | None) -> float:
        """The value for tensor ``name`` (output name) in decoder layer ``layer`` of ``num_layers``."""
        for rule in self.rules:
            if rule.regex.search(name):
                return rule.value
        if self.layers is not None and layer is not None:
            return _interpolate(self.layers, layer, num_layers)
        return self.default

    def to_json(self) -> Any:
        """The schedule in the form :meth:`parse` reads (for the merge recipe)."""
        if self.is_constant:
            return self.default
        out: dict[str, Any] = {"default": self.default}
        if self.layers is not None:
            out["layers"] = list(self.layers)
        if self.rules:
            out["rules"] = [{"pattern": r.pattern, "value": r.value} for r in self.rules]
        return out


def _interpolate(values: Sequence[float], layer: int, num_layers: int | None) -> float:
    if len(values) == 1:
        return values[0]
    n = num_layers if num_layers is not None else len(values)
    if layer >= n:
        raise InputError(f"layer {layer} is outside the {n} decoder layers the schedule was resolved for.")
    if n == len(values):
        return values[layer]
    pos = layer / max(n - 1, 1) * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    frac = pos - lo
    return values[lo] * (1 - frac) + values[hi] * frac


def _float(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise InputError(f"{name}: expected a number, got {x!r}; write e.g. 0.5")
    if not math.isfinite(x):
        raise InputError(f"{name}: {x} is not a finite number; write e.g. 0.5")
    return float(x)


def _floats(xs: Any, name: str) -> tuple[float, ...]:
    if not isinstance(xs, (list, tuple)) or not xs:
        raise InputError(f"{name}: expected a non-empty list of numbers.")
    return tuple(_float(x, f"{name}[{i}]") for i, x in enumerate(xs))
