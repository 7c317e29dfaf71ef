"""Where the bundled assets are: the one lookup every default path goes through.

The demo's tiny models and data (the LLaVA testbed and its aligned LM, the Safe-CLIP and
text-to-image testbeds, the judge's labelled set) live in the repository's ``assets/`` folder and
install with the package as ``vlmsafe_assets`` (``pyproject.toml`` maps the folder to that package),
so an installed wheel finds them through :mod:`importlib.resources` exactly as an editable checkout
does: nothing here walks up from ``__file__`` into a source tree that an installed package does not
have.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from vlmsafe.errors import FileFormatError

__all__ = ["ASSETS_PACKAGE", "assets_root", "bundled_asset"]

#: The package that carries ``assets/`` in a built distribution (and in an editable install).
ASSETS_PACKAGE = "vlmsafe_assets"


def assets_root() -> Path:
    """The folder of the bundled assets.

    Raises:
        FileFormatError: the assets are not installed (a build without ``vlmsafe_assets``).
    """
    try:
        root = importlib.resources.files(ASSETS_PACKAGE)
    except ModuleNotFoundError:
        raise FileFormatError(
            f"the bundled assets ({ASSETS_PACKAGE}) are not installed; reinstall vlmsafe from its wheel or "
            "source distribution (both carry them), or pass the folder explicitly"
        ) from None
    return Path(str(root))


def bundled_asset(name: str) -> Path:
    """The bundled asset folder ``name`` (``testbed``, ``safeclip``, ``t2i``, ``judge``).

    The path is returned whether or not it exists, so callers can name it in their own error message.
    """
    return assets_root() / name
