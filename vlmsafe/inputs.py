"""The inputs a data file names: the other half of the output policy (:func:`vlmsafe.io.check_output`).

A data file is not the only thing a command reads from it: every image its records name is an input too, and an
output that is, holds or lies in one of them would be replaced by ``--overwrite`` (or mixed into). These helpers
take the records as the command loads them anyway (no file is read twice) and refuse such an output with the
message of :func:`vlmsafe.io.check_no_overlap`. The command-line side (which options are inputs) is
:func:`vlmsafe.cli.options.check_command_output`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from vlmsafe.errors import InputError
from vlmsafe.io import check_no_overlap


def named_paths(items: Iterable[Any]) -> Iterator[str]:
    """The image paths the records of a data file name (:class:`vlmsafe.data.Item` ``.image``, Safe-CLIP
    quadruplets' ``safe_image`` / ``unsafe_image``, or plain paths), each once: inputs of the command as much as
    the data file itself."""
    seen: set[str] = set()
    for item in items:
        values = (item,) if isinstance(item, (str, os.PathLike)) else (
            getattr(item, key, None) for key in _IMAGE_FIELDS)
        for value in values:
            if isinstance(value, (str, os.PathLike)) and (path := os.fspath(value)) and path not in seen:
                seen.add(path)
                yield path


_IMAGE_FIELDS = ("image", "safe_image", "unsafe_image")


def _overlapping(output: str | os.PathLike[str], inputs: Iterable[tuple[str, str | os.PathLike[str]]],
                 ) -> list[tuple[str, str]]:
    """The ``inputs`` that ``output`` is, holds or lies in -- a superset of what :func:`vlmsafe.io.check_no_overlap`
    refuses, cheap enough for the many thousand images a data file names: each folder is resolved and compared with
    the output once (not every path, component by component); per path only a linked file costs its target."""
    out = os.path.realpath(os.path.expanduser(os.fspath(output)))
    cwd = os.getcwd()
    found, folders = [], {}
    for role, p in inputs:
        path = os.path.expanduser(os.fspath(p))
        head, name = os.path.split(path if os.path.isabs(path) else os.path.join(cwd, path))
        if head not in folders:
            folders[head] = _relation(os.path.realpath(head), out)
        relation = folders[head] if name not in ("", ".", "..") else _relation(os.path.realpath(path), out)
        if (relation is True or (relation is not None and name == relation)
                or (os.path.islink(path) and _relation(os.path.realpath(path), out) is not None)):
            found.append((role, os.fspath(p)))
    return found


def _relation(path: str, out: str) -> bool | str | None:
    """How the resolved ``path`` meets the resolved ``out``: ``True`` (``out`` is ``path`` or holds it), the name of
    the entry of ``path`` that is or holds ``out`` (``out`` lies in ``path``), or ``None`` (apart)."""
    if path == out or path.startswith(out.rstrip(os.sep) + os.sep):
        return True
    prefix = path.rstrip(os.sep) + os.sep
    return out[len(prefix):].split(os.sep, 1)[0] if out.startswith(prefix) else None


def check_named_inputs(output: str | os.PathLike[str], named: Mapping[str, Iterable[Any]], *,
                       option: str = "`out`") -> None:
    """Refuse an ``output`` that is, holds or lies in an image named inside a data file (``{"--data": items}``):
    ``--overwrite`` would delete the images the data set points at. Runs once the data are loaded."""
    pairs = [(f"{source} image", p) for source, items in named.items() for p in named_paths(items)]
    found = _overlapping(output, pairs)
    check_no_overlap(output, found, option=option)
    if found:  # the output holds a linked image (the link, not its target): deleting it breaks the data set
        role, p = found[0]
        raise InputError(f"{option} {os.fspath(output)} overlaps the {role} input {os.path.abspath(p)} (a link); "
                         "choose another output path")


def check_file_name(path: str | os.PathLike[str], *, option: str = "`out`", example: str = "out.json") -> None:
    """Refuse a file output written like a folder (``dir/``): the path would lose its slash and the file be called
    ``dir``, next to (or instead of) the folder the user meant."""
    text = os.fspath(path)
    if text.endswith(tuple({"/", os.sep, *(os.altsep or "")})):
        raise InputError(f"{option} {text!r} ends with a path separator (a folder), but {option} is one file; pass "
                         f"a file path such as {text}{example}")
