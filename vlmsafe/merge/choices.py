"""The merge methods by name, in a module that imports nothing heavy: the command line builds ``--method`` from
it before any tensor code is imported, and :mod:`vlmsafe.merge.methods` implements exactly these."""

from __future__ import annotations

#: Method names accepted by :func:`~vlmsafe.merge.methods.merge_pair` and the CLI / config files.
METHODS: tuple[str, ...] = ("linear", "slerp", "task_arithmetic", "ties", "dare_linear", "dare_ties")
#: Methods that work on task vectors relative to a base model.
TASK_VECTOR_METHODS: frozenset[str] = frozenset({"task_arithmetic", "ties", "dare_linear", "dare_ties"})
