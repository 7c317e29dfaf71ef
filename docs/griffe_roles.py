"""Griffe extension for the docs build: Sphinx roles in docstrings become inline code.

vlmsafe's docstrings cross-reference with reST roles (``:class:`vlmsafe.steering.ShiftVectors```,
``:func:`~vlmsafe.io.check_output```). Markdown has no roles, so they would show up verbatim; this turns
each into inline code (``~`` keeps the last dotted part, as Sphinx shows it). The library's docstrings stay
as they are, so ``help()`` and editors keep showing what they always did.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|ref|doc|term):`(~?)([^`]+)`")


def _code(match: re.Match[str]) -> str:
    target = match.group(2).strip()
    if "<" in target and target.endswith(">"):  # :ref:`title <target>` -> the title
        target = target[: target.index("<")].strip()
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def strip_roles(text: str) -> str:
    return ROLE.sub(_code, text)


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = strip_roles(obj.docstring.value)
