"""The one dtype table: the weight dtypes vlmsafe reads and writes, by name, and the torch dtype of each.

Loading a model (``--dtype`` / ``load_model(dtype=)``), writing a merge (``dtype:``), converting an
original LLaVA checkpoint and loading a diffusers pipeline all accept the same names (and the short
aliases), check them with the same message, and map them through :func:`torch_dtype`. Importing this
module does not import torch, so a help screen can list the choices.
"""

from __future__ import annotations

from typing import Any

from vlmsafe.errors import InputError

__all__ = ["ALIASES", "DTYPE_NAMES", "dtype_name", "torch_dtype"]

#: The dtype names, as choices are listed (command line and errors).
DTYPE_NAMES = ("float32", "bfloat16", "float16")
#: Short names accepted wherever a dtype name is (``torch.`` prefixes are accepted too).
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_name(value: object, what: str = "dtype", *, auto: bool = False) -> str:
    """The canonical name of ``value`` (a name, an alias, ``"torch.bfloat16"`` or a ``torch.dtype``).

    ``auto``: ``"auto"`` (the checkpoint's own dtype) is accepted and returned as is.

    Raises:
        InputError: ``value`` names no dtype of :data:`DTYPE_NAMES`; the message names ``what``.
    """
    text = str(value).removeprefix("torch.") if value is not None else ""
    text = ALIASES.get(text, text)
    if text in DTYPE_NAMES or (auto and text == "auto"):
        return text
    choices = ", ".join(DTYPE_NAMES) + (" or auto" if auto else "")
    raise InputError(f"{what} {value!r} is not a dtype vlmsafe handles; use one of {choices} "
                     f"(or {', '.join(ALIASES)})")


def torch_dtype(value: object, what: str = "dtype") -> Any:
    """The ``torch.dtype`` of ``value`` (see :func:`dtype_name`)."""
    import torch

    return getattr(torch, dtype_name(value, what))
