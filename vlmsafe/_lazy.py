"""Lazy package exports: a package's public names are imported on first access, not with the package.

Why: every ``vlmsafe`` invocation imports the subcommands' ``cli`` modules, and importing ``vlmsafe.cli.steering``
imports the package ``vlmsafe.steering`` first. If the package's ``__init__`` imported its submodules eagerly,
``vlmsafe --help`` would pay for torch and transformers (seconds) before printing a line. With
:func:`attach`, ``from vlmsafe.steering import SafeVLM`` works as before, and only that name's module loads.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any


def attach(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose public names are ``exports``: name -> ``"module"`` (the
    same name there) or ``"module:attr"`` (an alias). Assign both in the package's ``__init__``.

    A submodule named like an export (``vlmsafe.eval.evaluate`` and the function ``evaluate``) would otherwise
    replace the export on the package when it is imported (the import system sets the package attribute); as
    with eager imports, the export wins: the package ignores that assignment.
    """

    class _Package(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if name in exports and isinstance(value, types.ModuleType) and value.__name__ == f"{package}.{name}":
                return
            super().__setattr__(name, value)

    sys.modules[package].__class__ = _Package

    def __getattr__(name: str) -> Any:
        target = exports.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = target.partition(":")
        value = getattr(importlib.import_module(module), attr or name)
        setattr(importlib.import_module(package), name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__


def no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.no_grad()`` as a decorator that imports torch when the function runs, not when its module loads."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
