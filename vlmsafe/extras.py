"""Optional dependencies: found missing before the work, with the one line that installs them.

The core install (``pip install vlmsafe``) leaves out what only some commands use: scikit-learn and
matplotlib (extra ``probes``: linear probes, PNG figures), peft, open_clip and diffusers (extra
``safeclip``: LoRA, open_clip models, text-to-image pipelines; peft also does the task-vector merges).
A command that needs one calls :func:`require_extra` first, so a missing package is one line naming
the extra to install -- not a ``ModuleNotFoundError`` traceback after minutes of work whose results
are then lost. Packages are looked up with ``importlib.util.find_spec``, without importing them
(importing peft alone costs ~250 MB).
"""

from __future__ import annotations

import importlib.util
import sys

from vlmsafe.errors import InternalError, VlmsafeError

#: The modules each extra of ``pyproject.toml`` provides.
EXTRAS: dict[str, tuple[str, ...]] = {
    "probes": ("sklearn", "matplotlib"),
    "safeclip": ("peft", "open_clip", "diffusers"),
    "merge": ("peft",),
}
#: Distribution names where they differ from the module name (what ``pip install`` takes).
DISTRIBUTIONS: dict[str, str] = {"sklearn": "scikit-learn", "open_clip": "open_clip_torch"}


class MissingExtraError(VlmsafeError, ImportError):
    """A feature needs an optional dependency that is not installed."""


def is_installed(module: str) -> bool:
    """Whether ``module`` can be imported, decided without importing it.

    A module set to ``None`` in ``sys.modules`` (how Python, and tests, block an import) counts as missing.
    """
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing or broken
        return False


def require_extra(extra: str, *modules: str, feature: str) -> None:
    """Raise :class:`MissingExtraError` unless every one of ``modules`` is installed.

    Args:
        extra: the ``pyproject.toml`` extra that installs them (``"probes"``, ``"safeclip"``).
        modules: import names (none: nothing is required, so a call can pass a conditional list).
        feature: what needs them, for the message (e.g. ``"vlmsafe probe weights (weights.png)"``).
    """
    if extra not in EXTRAS:
        raise InternalError(f"unknown extra {extra!r}; one of {', '.join(EXTRAS)}")  # vlmsafe's own call is wrong
    missing = [m for m in modules if not is_installed(m)]
    if missing:
        names = " ".join(DISTRIBUTIONS.get(m, m) for m in missing)
        raise MissingExtraError(
            f"{feature} needs {names.replace(' ', ' and ')}, which the core install leaves out; "
            f"install the extra: pip install 'vlmsafe[{extra}]' (or pip install {names})"
        )
