"""The inputs a data file names: the other half of the output policy (:func:`vlmsafe.io.check_output`).

A data file is not the only thing a command reads from it: every image its records name is an input too, and an
output that is, holds or lies in one of them would be replaced by ``--overwrite`` (or mixed into). These helpers
take the records as the command loads them anyway (no file is read twice) and refuse such an output with the
message of :func:`vlmsafe.io.check_no_overlap`. The command-line side (which options are inputs) is
:func:`vlmsafe.cli_options.check_command_output`.
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
    """The ``inputs`` that ``output`` is, holds or lies in -- a cheap superset of what
    :func:`vlmsafe.io.check_no_overlap` refuses, for the thousands of images a data file names: each folder is
    resolved once (not every path, component by component), a linked file by its target too."""
    out = os.path.realpath(os.path.expanduser(os.fspath(output)))
    found, folders = [], {}
    for role, p in inputs:
        path = os.path.abspath(os.path.expanduser(os.fspath(p)))
        head, name = os.path.split(path)
        if head not in folders:
            folders[head] = os.path.realpath(head)
        candidates = [os.path.join(folders[head], name)]
        if os.path.islink(path):
            candidates.append(os.path.realpath(path))
        if any(c == out or c.startswith(out.rstrip(os.sep) + os.sep) or out.startswith(c.rstrip(os.sep) + os.sep)
               for c in candidates):
            found.append((role, os.fspath(p)))
    return found


def check_named_inputs(output: str | os.PathLike[str], named: Mapping[str, Iterable[Any]], *,
                       option: str = "--out") -> None:
    """Refuse an ``output`` that is, holds or lies in an image named inside a data file (``{"--data": items}``):
    ``--overwrite`` would delete the images the data set points at. Runs once the data are loaded."""
    pairs = [(f"{source} image", p) for source, items in named.items() for p in named_paths(items)]
    check_no_overlap(output, _overlapping(output, pairs), option=option)


def check_file_name(path: str | os.PathLike[str], *, option: str = "--out", example: str = "out.json") -> None:
    """Refuse a file output written like a folder (``dir/``): the path would lose its slash and the file be called
    ``dir``, next to (or instead of) the folder the user meant."""
    text = os.fspath(path)
    if text.endswith(tuple({"/", os.sep, *(os.altsep or "")})):
        raise InputError(f"{option} {text!r} ends with a path separator (a folder), but {option} is one file; pass "
                         f"a file path such as {text}{example}")
