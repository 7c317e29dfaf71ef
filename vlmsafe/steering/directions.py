"""``SafetyDirections``: ShiftDC's per-layer safety directions, saved as safetensors + JSON + captions.

A directions folder holds ``directions.safetensors`` (``direction.<layer>``, ``benign_mean.<layer>``,
``harmful_mean.<layer>``, float32), ``directions.json`` (model, caption instruction and budget, counts,
calibration hash, tensor sha256) and ``captions.jsonl`` (every calibration item's caption and where it
came from, reusable as a cache). Nothing is ever unpickled; the tensor file's sha256 is checked on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlmsafe.errors import FileFormatError, IncompatibleVectorsError, InputError
from vlmsafe.io import atomic_path, parse_json
from vlmsafe.steering.vectors import META_SCHEMA, Field, check_fits, read_layer_tables, write_layer_tables
from vlmsafe.validation import check_template

#: The reference code's caption instruction (``CAPTION_BASED_ON_Q``): the caption is written for the request.
CAPTION_PROMPT = "Based on the given Request, describe the image. Request: {prompt}"
#: Caption budget in tokens (the reference code's ``max_tokens=128``).
CAPTION_TOKENS = 128
TENSOR_FILE = "directions.safetensors"
META_FILE = "directions.json"
CAPTIONS_FILE = "captions.jsonl"
FORMAT_VERSION = 1


def _counts(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in value.items()
    )


def _caption_prompt(value: Any) -> bool:
    try:
        check_template(value, "caption prompt", "prompt", required=False)  # what calibration accepts
    except InputError:
        return False
    return True


def _count(low: int) -> Field:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"an integer >= {low}")


#: ``directions.json``: the fields of ``vectors.json`` (:data:`vlmsafe.steering.vectors.META_SCHEMA`) and ShiftDC's.
DIRECTIONS_SCHEMA: dict[str, Field] = {
    **META_SCHEMA,
    "direction": (lambda v: isinstance(v, str), "a string"),
    "counterpart_template": (lambda v: isinstance(v, str), "a string"),
    "caption_prompt": (_caption_prompt, "a non-empty string whose only {field}, if any, is {prompt}"),
    "caption_tokens": _count(1),
    "n_benign": _count(1),
    "n_harmful": _count(1),
    "caption_sources": (_counts, "an object {source: count}"),
}


def projection(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``(m . s / s . s) s`` for each row of ``m`` ``(B, H)`` (zero when ``s`` is zero)."""
    s = s.to(device=m.device, dtype=m.dtype)
    denom = s @ s
    if float(denom) <= 0.0:
        return torch.zeros_like(m)
    return (m @ s / denom).unsqueeze(-1) * s


@dataclass
class SafetyDirections:
    """Per-layer safety directions for ShiftDC, with where and how they were computed.

    ``directions[l]`` = mean last-token state of benign [prompt + caption] inputs minus that of
    harmful ones; ``benign_means`` / ``harmful_means`` are the two means. ``meta`` records the model,
    the caption instruction and budget, the counts and the calibration-set hash; ``captions`` the
    caption of every calibration item and where it came from (``"data"`` or ``"generated"``).
    """

    directions: dict[int, torch.Tensor]
    benign_means: dict[int, torch.Tensor] = field(default_factory=dict)
    harmful_means: dict[int, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    captions: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.directions.values())).shape[-1])

    @property
    def caption_prompt(self) -> str:
        return str(self.meta.get("caption_prompt", CAPTION_PROMPT))

    @property
    def caption_tokens(self) -> int:
        return int(self.meta.get("caption_tokens", CAPTION_TOKENS))

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.directions[layer]

    def __repr__(self) -> str:
        return (
            f"SafetyDirections(layers={len(self.layers)}, hidden_size={self.hidden_size}, "
            f"benign={self.meta.get('n_benign')}, harmful={self.meta.get('n_harmful')})"
        )

    def select(self, layers: list[int]) -> SafetyDirections:
        missing = sorted(set(layers) - set(self.directions))
        if missing:
            raise IncompatibleVectorsError(
                f"the safety directions have no layer(s) {missing}; they were calibrated on layers {self.layers}. "
                "Re-run `vlmsafe calibrate --method shiftdc --layers ...` to include them, or steer calibrated layers"
            )
        pick = lambda d: {l: d[l] for l in layers if l in d}
        return replace(
            self,
            directions=pick(self.directions),
            benign_means=pick(self.benign_means),
            harmful_means=pick(self.harmful_means),
        )

    def check_compatible(self, model: Any) -> None:
        """Raise :class:`IncompatibleVectorsError` unless the directions fit ``model``'s residual stream."""
        check_fits(
            self.meta,
            self.hidden_size,
            self.layers,
            model,
            what="directions",
            title="ShiftDC safety directions",
            fix="Compute directions for this model with `vlmsafe calibrate --method shiftdc`.",
        )

    def corrections(self, shifts: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``(m . s / s . s) s`` per layer for per-row shifts ``{layer: (B, H)}`` (what alpha scales)."""
        return {l: projection(m.float(), self.directions[l].float()) for l, m in shifts.items()}

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``directions.safetensors``, ``directions.json`` and ``captions.jsonl`` to ``directory`` atomically."""
        dest = Path(directory)
        meta = {**self.meta, "format_version": FORMAT_VERSION, "hidden_size": self.hidden_size, "layers": self.layers}
        tables = {"direction": self.directions, "benign_mean": self.benign_means, "harmful_mean": self.harmful_means}
        with atomic_path(dest, overwrite=overwrite) as tmp:
            tmp.mkdir(parents=True)
            write_layer_tables(tmp, tables, meta, tensor_file=TENSOR_FILE, meta_file=META_FILE,
                               fmt="vlmsafe.safety_directions")
            (tmp / CAPTIONS_FILE).write_text(
                "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in self.captions), encoding="utf-8"
            )
        return dest

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: Any | None = None) -> SafetyDirections:
        """Read directions saved by :meth:`save` (checksum verified; nothing unpickled); validate against ``model``."""
        root = Path(directory)
        fix = "re-create them with `vlmsafe calibrate --method shiftdc`"
        meta, tables = read_layer_tables(root, ("direction", "benign_mean", "harmful_mean"), tensor_file=TENSOR_FILE,
                                         meta_file=META_FILE, what="a ShiftDC directions folder", fix=fix,
                                         schema=DIRECTIONS_SCHEMA)
        if meta.get("method") != "shiftdc":
            method = meta.get("method")
            raise FileFormatError(f"{root / META_FILE}: not ShiftDC safety directions (method {method!r}); {fix}")
        captions = []
        if (root / CAPTIONS_FILE).is_file():
            for i, line in enumerate((root / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                rec = parse_json(line, where=str(root / CAPTIONS_FILE), line=i, fix=fix)
                if not isinstance(rec, dict) or not isinstance(rec.get("caption"), str) or "id" not in rec:
                    raise FileFormatError(f"{root / CAPTIONS_FILE}:{i}: a caption line is an object with 'id' and a "
                                          f"'caption' string; {fix}")
                captions.append(rec)
        out = cls(
            directions=tables["direction"],
            benign_means=tables["benign_mean"],
            harmful_means=tables["harmful_mean"],
            meta=meta,
            captions=captions,
        )
        if model is not None:
            out.check_compatible(model)
        return out


__all__ = ["CAPTION_PROMPT", "CAPTION_TOKENS", "SafetyDirections", "projection"]
