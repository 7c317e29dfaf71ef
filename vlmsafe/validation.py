"""Validation of the numbers users hand to vlmsafe, in the library and on the command line.

A steering strength of ``nan`` gives empty generations and a 100% "unsafe" rate; a merge weight of
1.5 extrapolates past the aligned model. Both are silently wrong, so every float argument goes
through :func:`check_float` (finite, in its documented range) and every count through
:func:`check_int`. :mod:`vlmsafe.cli.types` wraps the same checks as ``argparse`` types, so bad
command-line values are rejected at parse time, before any model is loaded.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

from vlmsafe.errors import InputError, LayerIndexError


def check_float(
    value: object,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float within ``[low, high]`` (open ends optional), else raise.

    Raises:
        InputError: ``"<name> must be ...; got <value>"``.
    """
    if isinstance(value, bool) or (not isinstance(value, numbers.Real) and not _is_scalar_tensor(value)):
        raise InputError(f"{name} must be a number, got {value!r}")  # numbers.Real: also numpy's float32, int64
    x = float(value)  # type: ignore[arg-type]
    if not math.isfinite(x):
        raise InputError(f"{name} must be a finite number, got {x}; pass e.g. {name}=1.0")
    too_low = low is not None and (x < low or (low_open and x == low))
    too_high = high is not None and (x > high or (high_open and x == high))
    if too_low or too_high:
        raise InputError(f"{name} must be {_interval(low, high, low_open, high_open)}, got {x:g}")
    return x


def check_int(value: object, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """Return ``value`` as an int within ``[low, high]``, else raise :class:`InputError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy's int64 too (an array's item)
        raise InputError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name} must be {_interval(low, high, False, False)}, got {value}")
    return value


def _is_scalar_tensor(value: object) -> bool:
    return hasattr(value, "numel") and hasattr(value, "item") and value.numel() == 1  # type: ignore[attr-defined]


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    def num(x: float) -> str:  # integers in full (a seed's 4294967295, not 4.29497e+09)
        return str(x) if isinstance(x, int) else f"{x:g}"

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{num(low)}, {num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {num(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {num(high)}"
    return "in (-inf, inf)"


# --------------------------------------------------------------------------- layer selections
#: Named layer selections: every decoder layer (CMRM as published), or the middle one to the last
#: (``n // 2 .. n - 1``, ShiftDC's default: its paper finds steering from layer 1 worst).
LAYER_PRESETS = ("all", "middle-to-last")


def preset_layers(name: str, num_layers: int) -> list[int]:
    """The layer indices a named selection (:data:`LAYER_PRESETS`) picks in a model of ``num_layers``."""
    if name == "all":
        return list(range(num_layers))
    if name == "middle-to-last":
        return list(range(num_layers // 2, num_layers))
    raise LayerIndexError(f"unknown layer selection {name!r}; use one of {', '.join(LAYER_PRESETS)} "
                          "or indices such as '8-15'")


def parse_layer_spec(spec: str) -> list[int]:
    """Parse ``"12"``, ``"8,10,12"``, ``"8-15"`` or ``"-1"`` (from the end) into layer indices.

    A reversed range (``"3-1"``), an empty selection and anything that is not a number are errors:
    silently selecting nothing would run a whole calibration for no vectors.
    """
    if not isinstance(spec, str):
        raise LayerIndexError(f"layer selection must be a string such as '8-15', got {spec!r}")
    out: list[int] = []
    for part in spec.replace(" ", "").split(","):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                cut = part.index("-", 1)
                lo, hi = int(part[:cut]), int(part[cut + 1 :])
                if hi < lo:
                    raise LayerIndexError(
                        f"layer range {part!r} is reversed (it selects nothing); write it low-high, e.g. '{hi}-{lo}'"
                    )
                out.extend(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise LayerIndexError(
                f"cannot parse layer selection {spec!r}; use e.g. '12', '8,10,12' or '8-15'"
            ) from None
    if not out:
        raise LayerIndexError(f"layer selection {spec!r} is empty; use e.g. '12', '8,10,12', '8-15' or 'all'")
    return out


#: The largest seed every consumer accepts (numpy's and scikit-learn's ``random_state`` stop at 2**32 - 1).
SEED_MAX = 2**32 - 1


def check_template(template: object, name: str, field: str, *, required: bool = True) -> str:
    """A ``str.format`` template whose only field is ``{field}`` (present unless ``required=False``).

    Checked by formatting it once, so a stray ``{`` or another field name is caught when the
    template is given, not on the first item of a long run.
    """
    if not isinstance(template, str) or not template.strip():
        raise InputError(f"{name} must be a non-empty string, got {template!r}")
    try:
        template.format(**{field: "x"})
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"{name} {template!r} has a field other than {{{field}}} ({exc}); write literal braces as {{{{ and }}}}"
        ) from None
    if required and "{" + field + "}" not in template:
        raise InputError(f"{name} {template!r} has no {{{field}}}; put {{{field}}} where the {field} text goes")
    return template


def check_choice(value: object, name: str, choices: Sequence[object]) -> None:
    """Raise :class:`InputError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def parse_size(size: int | str) -> int:
    """``"2GB"``, ``"500MB"``, ``"64KiB"`` or a positive int number of bytes."""
    if isinstance(size, bool):
        raise InputError(f"max_shard_size: cannot parse {size!r}; write e.g. 2GB, 500MB or a number of bytes")
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
        if not m:
            raise InputError(f"max_shard_size: cannot parse {size!r}; write e.g. 2GB, 500MB or a number of bytes")
        unit = (m.group(2) or "B").upper()
        base = 1024 if "I" in unit else 1000
        power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
        value = int(float(m.group(1)) * base**power)
    if value <= 0:
        raise InputError(f"max_shard_size must be positive, got {size!r}; write e.g. 2GB")
    return value
