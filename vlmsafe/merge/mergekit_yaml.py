"""Read a mergekit-style merge YAML (``models:`` / ``merge_method:`` / ``parameters:``) as a vlmsafe merge recipe.

mergekit users already write their merges this way; ``vlmsafe merge their.yaml`` takes the same file for the
methods both tools implement (linear, slerp, task_arithmetic, ties, dare_linear, dare_ties) and two models: the
VL-adapted model and its aligned text-only LLM. What is translated, and how:

* **roles**: vlmsafe must know which model is the VLM (its layout is the output's, its vision tower passes
  through). It is the model whose ``config.json`` has a ``vision_config``; exactly one of the two must.
* **weights** become ``weight``, the aligned model's share lam (0 keeps the VLM, 1 takes the aligned LLM):
  ``linear`` with mergekit's ``normalize`` (default true) gives lam = w_aligned / (w_vlm + w_aligned);
  ``slerp``'s ``t`` runs from ``base_model`` to the other model, so lam = t when the VLM is the base and 1 - t
  otherwise; the task-vector methods with the aligned LLM as ``base_model`` merge ``aligned + w_vlm (vlm -
  aligned)``, so lam = 1 - w_vlm, and with a third ``base_model`` (the LLM both were tuned from) they need
  w_vlm + w_aligned = 1 and give lam = w_aligned. A mix vlmsafe's one-share form cannot express is refused
  with the reason, not approximated.
* ``density`` (one value for both models), ``normalize`` (when set), ``dtype`` and ``base_model`` carry over;
  ties / dare numerics follow mergekit (``convention: mergekit``). Per-layer gradients (lists), ``slices:``,
  tokenizer options and other mergekit keys are refused by name: write vlmsafe's own form for those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vlmsafe.errors import InputError
from vlmsafe.merge.choices import METHODS, TASK_VECTOR_METHODS

#: Top-level keys of a mergekit config that this translation reads.
TOP_KEYS = frozenset({"models", "merge_method", "base_model", "parameters", "dtype"})
#: Per-model and global parameters it reads.
PARAM_KEYS = frozenset({"weight", "density", "t", "normalize"})


def is_mergekit_config(data: Mapping[str, Any]) -> bool:
    """Whether a parsed YAML document is written in mergekit's form rather than vlmsafe's."""
    return "merge_method" in data or "models" in data


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        kind = "a per-layer gradient (a list)" if isinstance(value, list) else repr(value)
        raise InputError(f"{where}: {what} is {kind}; this translation takes one finite number per model (write "
                         "vlmsafe's own form, with `weight: {layers: [...]}`, for per-layer schedules)")
    return float(value)


def _has_vision(path: str) -> bool | None:
    """Whether the model folder's config describes a vision tower (``None``: no readable config.json)."""
    import json

    cfg = Path(path) / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return isinstance(data, dict) and "vision_config" in data


def translate(data: Mapping[str, Any], *, where: str) -> dict[str, Any]:
    """vlmsafe's recipe keys (``vlm``, ``aligned``, ``method``, ``weight``, ...) for a mergekit-style document.

    Raises:
        InputError: a key, method or weight combination vlmsafe cannot express, or roles it cannot tell.
    """
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise InputError(f"{where}: mergekit key(s) {unknown} are not supported by vlmsafe merge (it reads "
                         f"{sorted(TOP_KEYS)}); remove them or write vlmsafe's own form (the fields of "
                         "vlmsafe.merge.MergeConfig, docs/merge.md)")
    method = data.get("merge_method")
    if method not in METHODS:
        raise InputError(f"{where}: merge_method {method!r} is not one vlmsafe implements; use one of "
                         f"{', '.join(METHODS)}")
    models = data.get("models")
    if not isinstance(models, list) or not all(isinstance(m, Mapping) and isinstance(m.get("model"), str)
                                                for m in models):
        raise InputError(f"{where}: `models` must be a list of entries with a `model` path")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise InputError(f"{where}: base_model must be a model path, got {base!r}")
    if base is None and method in TASK_VECTOR_METHODS:
        raise InputError(f"{where}: {method} needs a base_model (the aligned LLM, or the LLM both were tuned from)")
    glob = data.get("parameters") or {}
    if not isinstance(glob, Mapping) or set(glob) - PARAM_KEYS:
        raise InputError(f"{where}: global parameters may hold {sorted(PARAM_KEYS)}; got {dict(glob)!r}")
    paths = list(dict.fromkeys([*(m["model"] for m in models), *([base] if base else [])]))
    roles = {p: _has_vision(p) for p in paths}
    vlms = [p for p, v in roles.items() if v]
    llms = [p for p, v in roles.items() if v is False]
    if len(vlms) != 1 or len(llms) < 1 or any(v is None for v in roles.values()):
        unreadable = [p for p, v in roles.items() if v is None]
        detail = (f"no readable config.json in {unreadable}" if unreadable
                  else f"{len(vlms)} of them have a vision tower")
        raise InputError(f"{where}: cannot tell the VLM from the aligned LLM among {paths} ({detail}); exactly one "
                         "model must have a vision_config in its config.json, or write vlmsafe's own form "
                         "(`vlm:` and `aligned:`)")
    vlm = vlms[0]
    entries = {m["model"]: dict(m.get("parameters") or {}) for m in models}
    for path, params in entries.items():
        if set(params) - PARAM_KEYS:
            raise InputError(f"{where}: parameters of {path} may hold {sorted(PARAM_KEYS)}; got {params!r}")
    # the aligned LLM: the one text-only model, or -- for task-vector methods with a third model as the common
    # base -- the text-only model that is not the base
    candidates = [p for p in llms if p != base] if method in TASK_VECTOR_METHODS else llms
    if method in TASK_VECTOR_METHODS and not candidates and base in llms:
        candidates = [base]
    if len(candidates) != 1:
        raise InputError(f"{where}: expected one aligned text-only LLM besides the VLM {vlm}, found {candidates}; "
                         "a vlmsafe merge takes exactly two models (and an optional common base)")
    aligned = candidates[0]

    def param(path: str, key: str, default: Any = None) -> Any:
        value = entries.get(path, {}).get(key, glob.get(key, default))
        return None if value is None else _number(value, key, where)

    out: dict[str, Any] = {"vlm": vlm, "aligned": aligned, "method": method, "convention": "mergekit"}
    if isinstance(glob.get("normalize"), bool):
        out["normalize"] = glob["normalize"]
    if data.get("dtype") is not None:
        out["dtype"] = data["dtype"]
    if method == "linear":
        w_v, w_a = param(vlm, "weight", 1.0), param(aligned, "weight", 1.0)
        normalize = glob.get("normalize", True)
        if normalize:
            if w_v + w_a <= 0:
                raise InputError(f"{where}: linear weights {w_v:g} and {w_a:g} must have a positive sum")
            out["weight"] = w_a / (w_v + w_a)
        elif abs(w_v + w_a - 1.0) > 1e-6:
            raise InputError(f"{where}: linear weights {w_v:g} + {w_a:g} with normalize: false do not sum to 1; "
                             "vlmsafe merges shares (lam, 1 - lam): make them sum to 1 or drop normalize")
        else:
            out["weight"] = w_a
        out.pop("normalize", None)
    elif method == "slerp":
        if base not in (vlm, aligned):
            raise InputError(f"{where}: slerp needs base_model to be one of the two models ({vlm} or {aligned})")
        t = param(base, "t")
        if t is None:
            raise InputError(f"{where}: slerp needs parameters: t (the share of the model that is not the base)")
        out["weight"] = t if base == vlm else 1.0 - t
    else:
        densities = {d for d in (param(vlm, "density"), param(aligned, "density")) if d is not None}
        if len(densities) > 1:
            raise InputError(f"{where}: the two models have different densities {sorted(densities)}; vlmsafe applies "
                             "one density to the merge: give both the same value")
        if densities:
            out["density"] = densities.pop()
        if base == aligned:
            w_v = param(vlm, "weight", 1.0)
            out["weight"] = 1.0 - w_v  # aligned + w_v (vlm - aligned)
        else:
            w_v, w_a = param(vlm, "weight", 1.0), param(aligned, "weight", 1.0)
            if abs(w_v + w_a - 1.0) > 1e-6:
                raise InputError(f"{where}: with a separate base_model vlmsafe merges task vectors with weights "
                                 f"(1 - lam, lam); {w_v:g} + {w_a:g} do not sum to 1")
            out["weight"] = w_a
            out["base"] = base
    return out
