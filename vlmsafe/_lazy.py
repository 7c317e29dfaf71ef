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


def attach(
    package: str, exports: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``; assign both at the end of the package's ``__init__``.

    A package states its public names only where static tools read them: an import in its ``if TYPE_CHECKING:``
    block (``from vlmsafe.eval.judges import RefusalJudge``; ``import X as Y`` for an alias), and the literal
    ``__all__`` (ruff, IDEs and the API reference's griffe read no computed one). ``attach`` reads the block from
    the package's source (:func:`block_exports`) instead of a third, hand-kept name -> module table, and checks it
    against ``__all__``: every listed name must be lazy or already defined, every lazy name listed, else an
    :class:`~vlmsafe.errors.InternalError` at import, so a forgotten export cannot ship. ``exports`` (name ->
    ``"module"`` or ``"module:attr"``) is for the top-level package, whose layer may not import its subpackages
    even for type checkers (``tests/test_layering.py``).

    A submodule named like an export (``vlmsafe.eval.evaluate`` and the function ``evaluate``) would otherwise
    replace the export on the package when it is imported (the import system sets the package attribute); as
    with eager imports, the export wins: the package ignores that assignment.
    """
    module = sys.modules[package]
    table = dict(block_exports(module) if exports is None else exports)
    listed = set(getattr(module, "__all__", ()))
    missing = sorted(listed - set(table) - set(vars(module)))
    unlisted = sorted(set(table) - listed)
    if missing or unlisted:
        from vlmsafe.errors import InternalError

        raise InternalError(f"{package}: __all__ and its lazy exports disagree (not importable: {missing}; not in "
                            f"__all__: {unlisted}); list each public name once in both")
    _TABLES[package] = table

    class _Package(types.ModuleType):
        def __setattr__(self, name: str, value: Any) -> None:
            if name in table and isinstance(value, types.ModuleType) and value.__name__ == f"{package}.{name}":
                return
            super().__setattr__(name, value)

    module.__class__ = _Package

    def __getattr__(name: str) -> Any:
        target = table.get(name)
        if target is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        source, _, attr = target.partition(":")
        value = getattr(importlib.import_module(source), attr or name)
        setattr(module, name, value)  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(table))

    return __getattr__, __dir__


#: package -> its lazy exports, as :func:`attach` resolved them (read by :func:`exports_of`).
_TABLES: dict[str, dict[str, str]] = {}


def exports_of(package: str) -> dict[str, str]:
    """The lazy exports :func:`attach` registered for ``package``: name -> ``"module"`` or ``"module:attr"``."""
    importlib.import_module(package)
    return dict(_TABLES[package])


def block_exports(module: types.ModuleType) -> dict[str, str]:
    """name -> ``"module"`` (``"module:attr"`` for ``import attr as name``) for each ``from module import ...`` of
    ``module``'s top-level ``if TYPE_CHECKING:`` block, read from its source (which runs no import)."""
    import ast

    from vlmsafe.errors import InternalError

    source = module.__spec__.loader.get_source(module.__name__) if module.__spec__ and module.__spec__.loader else None
    if source is None:
        raise InternalError(f"{module.__name__}: no source to read its lazy exports from; install vlmsafe from "
                            "source files (not byte code only)")
    table: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for imp in node.body:
                if isinstance(imp, ast.ImportFrom) and imp.module and not imp.level:
                    for alias in imp.names:
                        name = alias.asname or alias.name
                        table[name] = imp.module if name == alias.name else f"{imp.module}:{alias.name}"
    return table


def no_grad(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``torch.no_grad()`` as a decorator that imports torch when the function runs, not when its module loads."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
