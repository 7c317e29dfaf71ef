"""Options declared once, in a config dataclass's field metadata, and derived everywhere else.

A field made with :func:`int_option`, :func:`float_option`, :func:`choice_option`,
:func:`switch_option`, :func:`bool_option` or :func:`other_option` carries its help text, its valid range and its
command-line flag in ``dataclasses.field(metadata=...)`` (as peft's and mergekit's configs carry
their help). :func:`check_options` validates an instance against those ranges (finite numbers,
``> 0``, ``[0, 1)`` ...); :func:`vlmsafe.cli.options.add_options` builds the ``argparse`` flags, whose
types check the same ranges at parse time, and :func:`vlmsafe.cli.options.options_from_args` collects the
flags that were given. Any config dataclass of the library can declare its options this way; this module
imports no ``argparse``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import field
from typing import Any, TypeVar

from vlmsafe.errors import InputError
from vlmsafe.validation import check_choice, check_float, check_int

#: Upper bounds of the optimizer numbers shared by the Safe-CLIP and pair-converter configs: far above
#: any useful value, and low enough that AdamW's float32 update (``lr * grad``, ``1 - lr * weight_decay``)
#: and LoRA's ``alpha / r`` scale cannot overflow (``--lr 1e300`` failed with a torch overflow error
#: once the model was loaded).
LR_MAX = 10.0
WEIGHT_DECAY_MAX = 10.0
LORA_ALPHA_MAX = 10000.0


# --------------------------------------------------------------------------- field specs
def int_option(
    default: int | None, help: str, *, low: int | None = 1, high: int | None = None, flag: str | None = None,
    optional: bool = False,
) -> Any:
    """An integer option in ``[low, high]``; ``optional``: ``None`` is allowed although the default is not ``None``."""
    meta = {"help": help, "kind": "int", "low": low, "high": high, "flag": flag, "optional": optional}
    return field(default=default, metadata=meta)


def float_option(
    default: float | None, help: str, *, low: float | None = None, high: float | None = None, low_open: bool = False,
    high_open: bool = False, flag: str | None = None, optional: bool = False,
) -> Any:
    """A finite float option in ``[low, high]`` (either end open)."""
    meta = {"help": help, "kind": "float", "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "flag": flag, "optional": optional}
    return field(default=default, metadata=meta)


def choice_option(default: str, choices: Sequence[str], help: str, *, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "kind": "choice", "choices": tuple(choices), "flag": flag})


def switch_option(default: bool | None, help: str, *, flag: str | None, const: bool, flag_help: str) -> Any:
    """A boolean (``help`` says what it means) set on the command line by ``flag``, which stores ``const``."""
    meta = {"help": help, "kind": "switch", "flag": flag, "const": const, "flag_help": flag_help}
    return field(default=default, metadata=meta)


def bool_option(default: bool, help: str) -> Any:
    """A boolean set in code or a config file, with no command-line flag of its own: checked like a switch (a
    string ``"false"`` is refused); :func:`vlmsafe.cli.options.add_options` would give it ``--name``, which
    stores the opposite of the default."""
    return switch_option(default, help, flag=None, const=not default, flag_help=help)


def other_option(help: str, *, flag: str | None, kind: str, default: Any = None, default_factory: Any = None) -> Any:
    """An option of another ``kind``: ``"str"``, ``"csv"`` (comma-separated list), ``"floats2"`` (two
    comma-separated numbers in [0, 1)) or a kind the caller gives an ``argparse`` type for."""
    meta = {"help": help, "kind": kind, "flag": flag}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


T = TypeVar("T")


def with_overrides(cls: type[T], options: T | None, overrides: Mapping[str, Any]) -> T:
    """``options`` (``None``: ``cls()``, the defaults) with the fields named in ``overrides`` replaced.

    The ``generate(inputs, generation_config=None, **kwargs)`` form of transformers: a function takes its
    settings as one options object, and a caller who changes one or two of them names them as keyword
    arguments instead of building the object. The copy is made by the class's ``__init__``, so its checks
    (:func:`check_options` in ``__post_init__``) run on the result; an unknown name (a typo such as
    ``max_new_token``) is refused with the names there are. ``options`` itself is never modified.
    """
    base = options if options is not None else cls()
    refuse_unknown(cls, overrides)
    return dataclasses.replace(base, **overrides) if overrides else base  # type: ignore[type-var]


def refuse_unknown(cls: type, given: Iterable[str]) -> None:
    """Refuse keyword arguments that name no field of the dataclass ``cls`` with the names it has: a typo such as
    ``alpah=2`` is one :class:`InputError` listing them, not ``__init__``'s ``TypeError``."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise InputError(f"unknown option(s) {', '.join(f'`{n}`' for n in unknown)} for {cls.__name__}; "
                         f"use {', '.join(names)}")


def option_fields(cls: type) -> Iterator[dataclasses.Field]:
    """The fields of ``cls`` that carry option metadata."""
    return (f for f in dataclasses.fields(cls) if "help" in f.metadata)


def check_options(obj: Any) -> None:
    """Check every option field of ``obj`` against its metadata (floats are stored as ``float``).

    Types are checked as strictly as ranges: a config file's ``"false"`` for a switch, ``"4"`` for
    a count or ``true`` for a number is refused, not read as truthy or as 1 (``use_lora: "false"``
    would otherwise train LoRA). ``None`` passes where it is the field's default or the field is
    ``optional``. Kinds other than these (``floats2``, ``weights`` ...) are checked by their class.

    Raises:
        InputError: ``"<field> must be ...; got <value>"``.
    """
    for f in option_fields(type(obj)):
        meta, value = f.metadata, getattr(obj, f.name)
        if value is None and (f.default is None or meta.get("optional")):
            continue
        kind = meta["kind"]
        if kind == "switch" and not isinstance(value, bool):
            raise InputError(f"{f.name} must be true or false (a JSON/YAML boolean, not a string), got {value!r}")
        if kind == "str" and (not isinstance(value, str) or not value.strip()):
            raise InputError(f"{f.name} must be a non-empty string, got {value!r}")
        if kind == "csv" and (not isinstance(value, (list, tuple)) or not value
                              or not all(isinstance(v, str) and v.strip() for v in value)):
            raise InputError(f"{f.name} must be a list of names such as [\"q_proj\", \"v_proj\"], got {value!r}")
        if kind == "int":
            check_int(value, f.name, low=meta.get("low"), high=meta.get("high"))
        elif kind == "float":
            setattr(obj, f.name, check_float(value, f.name, low=meta.get("low"), high=meta.get("high"),
                                             low_open=meta["low_open"], high_open=meta["high_open"]))
        elif kind == "choice":
            check_choice(value, f.name, meta["choices"])
