"""``SafetyDirections``: ShiftDC's per-layer safety directions, saved as safetensors + JSON + captions.

A directions folder holds ``directions.safetensors`` (``direction.<layer>``, ``benign_mean.<layer>``,
``harmful_mean.<layer>``, float32), ``directions.json`` (model, caption instruction and budget, counts,
calibration hash, tensor sha256) and ``captions.jsonl`` (every calibration item's caption and where it
came from, reusable as a cache) and ``README.md``, the model card (:mod:`vlmsafe.cards`). Nothing is ever
unpickled; the tensor file's sha256 is checked on load. ``SafetyDirections.load`` takes the folder or a Hub
repository id; ``push_to_hub`` uploads them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlmsafe.adapters import get_adapter
from vlmsafe.cards import CARD_FILE, display_name, push_saved, render_card, resolve, write_card
from vlmsafe.errors import FileFormatError, IncompatibleVectorsError, InputError
from vlmsafe.io import atomic_path
from vlmsafe.options import refuse_unknown
from vlmsafe.reading import parse_json
from vlmsafe.steering.choices import DEFAULT_ALPHA
from vlmsafe.steering.layer_files import META_SCHEMA, Field, check_fits, read_layer_tables, write_layer_tables
from vlmsafe.steering.vectors import data_fields
from vlmsafe.validation import check_template

#: The reference code's caption instruction (``CAPTION_BASED_ON_Q``): the caption is written for the request.
CAPTION_PROMPT = "Based on the given Request, describe the image. Request: {prompt}"
#: Caption budget in tokens (the reference code's ``max_tokens=128``).
CAPTION_TOKENS = 128
TENSOR_FILE = "directions.safetensors"
META_FILE = "directions.json"
CAPTIONS_FILE = "captions.jsonl"
FORMAT_VERSION = 1
#: What a directions folder holds: all a Hub download fetches (and an upload sends).
DIRECTION_FILES = (TENSOR_FILE, META_FILE, CAPTIONS_FILE, CARD_FILE)


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


#: ``directions.json``: the fields of ``vectors.json`` (:data:`vlmsafe.steering.layer_files.META_SCHEMA`) and
#: ShiftDC's.
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
    harmful ones (benign minus harmful: vlmsafe's one sign for safety directions, also that of
    :func:`~vlmsafe.steering.cmrm.safety_directions`; a projection does not depend on it);
    ``benign_means`` / ``harmful_means`` are the two means. ``meta`` records the model, the caption
    instruction and budget, the counts and the calibration-set hash; ``captions`` the caption of every
    calibration item and where it came from (``"data"`` or ``"generated"``).
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
                "Calibrate again with them included (calibrate_shiftdc's layers), or steer calibrated layers"
            )
        pick = lambda d: {l: d[l] for l in layers if l in d}
        return replace(
            self,
            directions=pick(self.directions),
            benign_means=pick(self.benign_means),
            harmful_means=pick(self.harmful_means),
        )

    def check_compatible(self, model: Any, *, strict: bool = False) -> None:
        """Raise :class:`IncompatibleVectorsError` unless the directions fit ``model``'s residual stream
        (directions read from other weights of the same architecture: a warning, or this error with ``strict``)."""
        check_fits(
            self.meta,
            self.hidden_size,
            self.layers,
            get_adapter(model),
            what="directions",
            title="ShiftDC safety directions",
            fix="Compute directions for this model with calibrate_shiftdc (`vlmsafe calibrate` with method shiftdc).",
            strict=strict,
        )

    def corrections(self, shifts: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``(m . s / s . s) s`` per layer for per-row shifts ``{layer: (B, H)}`` (what alpha scales)."""
        return {l: projection(m.float(), self.directions[l].float()) for l, m in shifts.items()}

    # ------------------------------------------------------------------ application
    def apply(self, model: Any, alpha: float = DEFAULT_ALPHA, *, prompts: Sequence[str], images: Sequence[Any],
              captions: Sequence[str | None] | None = None, system_prompt: str | None = None,
              **options: Any) -> Any:
        """Steer ``model`` with ShiftDC on the batch of ``prompts`` and ``images``; returns a
        :class:`~vlmsafe.steering.application.SteeringHandle`, a context manager with ``remove()``.

        >>> with directions.apply(model, alpha=1.0, prompts=prompts, images=images):
        ...     model.generate(**inputs)   # inputs built from the same prompts and images, left-padded

        ShiftDC measures each input's shift, so the batch is given here (``captions`` where known: the model
        writes the others). ``options`` are :class:`~vlmsafe.steering.SteeringConfig` fields (``layers``,
        ``shift_from``, ``decode``, ``static``, ``strict_model``), checked there once.
        """
        from vlmsafe.steering.config import SteeringConfig, apply_steering
        from vlmsafe.steering.registry import SteeringBatch

        refuse_unknown(SteeringConfig, options)
        batch = SteeringBatch(prompts=prompts, images=images, captions=captions, system_prompt=system_prompt)
        return apply_steering(model, SteeringConfig(directions=self, alpha=alpha, **options), batch)

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
            write_card(tmp, directions_card(meta))  # inside the atomic output: never a folder without its card
        return dest

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save (with the card) and upload to the Hub repository ``repo_id``; returns the commit URL.
        ``kwargs``: ``private``, ``token``, ``revision``, ``commit_message``, ``create_pr``."""
        return push_saved(self.save, repo_id, patterns=DIRECTION_FILES, **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: Any | None = None, *,
             revision: str | None = None) -> SafetyDirections:
        """Read directions saved by :meth:`save` from a folder or a Hub repository id (checksum verified; nothing
        unpickled; a download gets every check a local folder does); validate against ``model``."""
        root = resolve(directory, patterns=DIRECTION_FILES, what="a ShiftDC directions folder", revision=revision)
        fix = "re-create them with calibrate_shiftdc (`vlmsafe calibrate` with method shiftdc)"
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


def directions_card(meta: dict[str, Any]) -> str:
    """The model card of ShiftDC directions with ``meta`` (``directions.json``)."""
    layers = list(meta.get("layers", []))
    alpha = meta.get("alpha", DEFAULT_ALPHA)
    model = meta.get("model_name") or meta.get("model_class")
    counts = {k: meta.get(k) for k in ("n_benign", "n_harmful")}
    items = sum(v for v in counts.values() if isinstance(v, int)) or None
    settings = {
        "alpha": alpha,
        "layers": layers,
        "positions": meta.get("positions", "last"),
        "direction": meta.get("direction"),
        "caption_prompt": meta.get("caption_prompt", CAPTION_PROMPT),
        "caption_tokens": meta.get("caption_tokens", CAPTION_TOKENS),
        **counts,
        "caption_sources": meta.get("caption_sources"),
        "hidden_size": meta.get("hidden_size"),
        "num_layers": meta.get("num_layers"),
        "model_class": meta.get("model_class"),
        "family": meta.get("family"),
        "system_prompt": meta.get("system_prompt"),
    }
    data = data_fields(meta, items=items)
    data["description"] = (f"{counts['n_benign']} benign and {counts['n_harmful']} harmful calibration prompts with "
                           "their image captions; sha256 over every item's prompt, label and caption, in order"
                           + ("" if data["sha256"] else " (not recorded)"))
    usage = f"""```python
from vlmsafe.steering import SafetyDirections, load_model, steer_shiftdc

model, processor = load_model({json.dumps(str(model or "BASE_MODEL"))})
directions = SafetyDirections.load("THIS_FOLDER_OR_HUB_ID", model=model)
```

Then steer with `steer_shiftdc(model, directions, alpha={alpha}, prompts=..., images=...)`, or on the command line:
`vlmsafe generate --model MODEL --shiftdc THIS_FOLDER_OR_HUB_ID --alpha {alpha} ...`."""
    files = (f"- `{TENSOR_FILE}`: `direction.<layer>`, `benign_mean.<layer>`, `harmful_mean.<layer>` (float32)\n"
             f"- `{META_FILE}`: the full provenance, with the tensor file's sha256\n"
             f"- `{CAPTIONS_FILE}`: every calibration item's caption and where it came from")
    return render_card(
        artifact="safety-directions", method="shiftdc",
        title=f"ShiftDC safety directions for {display_name(model) or 'a vision-language model'}",
        summary=(f"Per-layer safety directions (mean benign minus mean harmful last-token state of prompt + "
                 f"caption inputs) at {len(layers)} decoder layer(s), for ShiftDC: at inference only the "
                 f"safety-relevant part of the image-induced shift is removed. alpha {alpha}."),
        base_model=meta.get("model_name"), relation="adapter", tags=["steering-vectors", "shiftdc", "safety"],
        settings=settings, data=data, sections=[("Usage", usage), ("Files", files)], license=meta.get("license"),
    )


__all__ = ["CAPTION_PROMPT", "CAPTION_TOKENS", "SafetyDirections", "projection"]
