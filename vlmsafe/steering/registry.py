"""Steering methods as registered objects: a name -> the method that checks, describes and applies a steering config.

As peft maps each ``PeftType`` to its config and model classes and mergekit registers its merge methods,
each method package registers its methods (:mod:`vlmsafe.steering.cmrm`: ``"dataset"`` and ``"sample"``;
:mod:`vlmsafe.steering.shiftdc`: ``"shiftdc"``), and :class:`~vlmsafe.steering.SteeringConfig` (``mode=NAME``)
and :class:`~vlmsafe.steering.SafeVLM` look them up here, with no branch on a method's name anywhere else.
A method of one's own is a subclass of :class:`SteeringMethod`::

    @register_steering_method("my-method")
    class MyMethod(SteeringMethod):
        def apply(self, config, adapter, batch):
            return my_context_manager(adapter, config.alpha, batch.prompts)

    SafeVLM(model, processor, SteeringConfig(mode="my-method", alpha=0.5))

The built-in methods are listed by module, so naming or listing them imports no torch (the command line
reads this table for its help screens); a lookup imports the method's package, which registers it.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from vlmsafe.errors import InputError

if TYPE_CHECKING:
    from vlmsafe.adapters import ModelAdapter

#: A :class:`~vlmsafe.steering.SteeringConfig` (not imported: the config module imports this one).
SteeringConfig = Any

#: The built-in methods: name -> the package that registers it (imported on first lookup).
BUILTIN_METHODS: dict[str, str] = {
    "dataset": "vlmsafe.steering.cmrm",
    "sample": "vlmsafe.steering.cmrm",
    "shiftdc": "vlmsafe.steering.shiftdc",
}
_REGISTRY: dict[str, SteeringMethod] = {}


@dataclass(frozen=True)
class SteeringBatch:
    """The batch a method steers: what per-input methods (sample-level CMRM, ShiftDC) measure before generation.

    ``images`` holds ``None`` for text-only rows; ``captions`` (ShiftDC) the known captions, ``None`` where
    unknown; ``system_prompt`` the one the batch's inputs were built with. A dataset-level method needs none
    of it (``prompts is None``: the caller has no batch, e.g. a hand-written forward call).
    """

    prompts: Sequence[str] | None = None
    images: Sequence[Any] | None = None
    captions: Sequence[str | None] | None = None
    system_prompt: str | None = None


class SteeringMethod:
    """One way of steering a model, checked, described and applied from a :class:`SteeringConfig`.

    ``artefact``: the config field holding the method's calibrated artefact (``"vectors"``, ``"directions"``),
    if it has one: a config with only that field set is this method (``SteeringConfig(vectors=v)`` is
    dataset-level), and an artefact of ``artefact_type`` given alone (``SafeVLM(model, processor, vectors)``)
    steers with the setting it records (:meth:`recorded_setting`). ``owns``: config fields only this method
    uses, ``{field: (default, message when another method is given it)}``.
    """

    name: str = ""
    artefact: str | None = None
    artefact_type: type | tuple[type, ...] | None = None
    owns: ClassVar[dict[str, tuple[Any, str]]] = {}

    def validate(self, config: SteeringConfig) -> None:
        """Refuse a config this method cannot apply (at construction, before any model is loaded)."""

    def missing(self, config: SteeringConfig) -> str | None:
        """What ``config`` still lacks before it can be applied (``None``: nothing), e.g. dataset-level vectors that a
        probe calibrates later: allowed in a config, refused by :class:`~vlmsafe.steering.SafeVLM` and by ``apply``."""
        return None

    def default_layers(self, config: SteeringConfig) -> Any:
        """The layers steered when the config names none (``None``: all)."""
        return None

    def check_model(self, config: SteeringConfig, adapter: ModelAdapter) -> None:
        """Refuse, before any generation, a config that does not fit ``adapter``'s model."""
        if config.layers is not None:
            adapter.resolve_layers(config.layers)

    def describe(self, config: SteeringConfig) -> dict[str, Any]:
        """Method-specific entries of :meth:`SteeringConfig.describe` (JSON-ready)."""
        return {}

    def recorded_setting(self, artefact: Any) -> dict[str, Any]:
        """Config fields (``alpha``, ``layers``) an artefact records for its own use; ``{}``: the defaults."""
        return {}

    def apply(self, config: SteeringConfig, adapter: ModelAdapter,
              batch: SteeringBatch) -> contextlib.AbstractContextManager[Any]:
        """A context manager that steers ``adapter``'s model on ``batch`` while it is open."""
        raise NotImplementedError(f"steering method {self.name!r} does not define apply()")


def register_steering_method(name: str) -> Callable[[type[SteeringMethod]], type[SteeringMethod]]:
    """Class decorator: register a :class:`SteeringMethod` subclass under ``name`` (replacing one of that name)."""
    if not isinstance(name, str) or not name:
        raise InputError(f"a steering method needs a non-empty name, got {name!r}")

    def register(cls: type[SteeringMethod]) -> type[SteeringMethod]:
        if not (isinstance(cls, type) and issubclass(cls, SteeringMethod)):
            raise InputError(f"register_steering_method({name!r}) decorates a SteeringMethod subclass, got {cls!r}")
        method = cls()
        method.name = name
        _REGISTRY[name] = method
        return cls

    return register


def steering_methods() -> tuple[str, ...]:
    """The names of every steering method, built-in first, then those registered later (imports nothing)."""
    return (*BUILTIN_METHODS, *(n for n in _REGISTRY if n not in BUILTIN_METHODS))


def get_steering_method(name: str) -> SteeringMethod:
    """The method registered as ``name``; an unknown name is refused with the registered ones."""
    if name not in _REGISTRY and isinstance(name, str) and name in BUILTIN_METHODS:
        importlib.import_module(BUILTIN_METHODS[name])  # the package registers its methods
    if not isinstance(name, str) or name not in _REGISTRY:
        raise InputError(f"steering mode must be one of {', '.join(map(repr, steering_methods()))}; got {name!r}")
    return _REGISTRY[name]


def all_steering_methods() -> list[SteeringMethod]:
    """Every method, built-ins loaded (to find the one an artefact or a config field belongs to)."""
    return [get_steering_method(n) for n in steering_methods()]


__all__ = [
    "BUILTIN_METHODS",
    "SteeringBatch",
    "SteeringMethod",
    "all_steering_methods",
    "get_steering_method",
    "register_steering_method",
    "steering_methods",
]
