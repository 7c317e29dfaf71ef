"""``ShiftVectors``: per-layer CMRM shift vectors with their statistics, saved as safetensors + JSON.

A vectors directory holds two files:

``vectors.safetensors``  ``shift.<layer>``, ``mm_mean.<layer>``, ``text_mean.<layer>`` (float32)
``vectors.json``         metadata: where the vectors were read (model class/name, family,
                         hidden size, layer count, layers, positions), how (dtype, item count,
                         calibration-set hash, vlmsafe version), per-layer statistics, and the
                         sha256 of the tensor file (so corruption is caught before use).
``README.md``            the model card (:mod:`vlmsafe.cards`): the same provenance in the Hugging Face
                         Hub's format, so the folder can be shared as a Hub repository.

``ShiftVectors.load`` takes the folder or a Hub repository id; ``push_to_hub`` uploads them.

The file format is :mod:`vlmsafe.steering.layer_files` (shared with ShiftDC's directions); calibration aggregates the
per-item shifts with :mod:`vlmsafe.steering.cmrm.aggregation`.

Nothing is ever unpickled. Vectors support algebra like repeng's (``a + b``, ``0.5 * a``, ``-a``),
which combines the shifts; the means are dropped from the result because they no longer describe it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from vlmsafe import __version__
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.cards import CARD_FILE, display_name, push_saved, render_card, resolve, write_card
from vlmsafe.errors import IncompatibleVectorsError, InputError
from vlmsafe.io import atomic_path
from vlmsafe.loading import model_fingerprint
from vlmsafe.options import refuse_unknown
from vlmsafe.steering.choices import DEFAULT_ALPHA
from vlmsafe.steering.layer_files import FORMAT_VERSION, check_fits, read_layer_tables, write_layer_tables
from vlmsafe.validation import check_float

TENSOR_FILE = "vectors.safetensors"
META_FILE = "vectors.json"
#: What a vectors folder holds: all a Hub download fetches (and an upload sends).
VECTOR_FILES = (TENSOR_FILE, META_FILE, CARD_FILE)


@dataclass
class ShiftVectors:
    """Per-layer representation shift (multimodal minus text-only) for one model.

    ``shifts[l]`` is the mean over calibration items of ``h_l(image + text) - h_l(text only)``
    at the read positions (or, with ``meta["aggregate"] == "pca"``, the first principal component
    of the per-item differences, scaled by the mean's projection on it); the image is the item's
    own or a fixed anchor (``meta["anchor"]``, see :mod:`vlmsafe.steering.anchors`).
    ``stats[l]`` holds float statistics (``shift_norm``, ``mm_norm``,
    ``text_norm``: mean per-item norms, ``count``). ``meta`` describes provenance and is what
    :meth:`check_compatible` validates against a model.
    """

    shifts: dict[int, torch.Tensor]
    mm_means: dict[int, torch.Tensor] = field(default_factory=dict)
    text_means: dict[int, torch.Tensor] = field(default_factory=dict)
    stats: dict[int, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ basics
    @property
    def layers(self) -> list[int]:
        return sorted(self.shifts)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.shifts.values())).shape[-1])

    def __getitem__(self, layer: int) -> torch.Tensor:
        return self.shifts[layer]

    def __repr__(self) -> str:
        norms = ", ".join(f"{l}: {self.shifts[l].norm():.3g}" for l in self.layers[:8])
        more = ", ..." if len(self.layers) > 8 else ""
        return f"ShiftVectors(layers={len(self.layers)}, hidden_size={self.hidden_size}, norms={{{norms}{more}}})"

    def select(self, layers: list[int]) -> ShiftVectors:
        missing = sorted(set(layers) - set(self.shifts))
        if missing:
            raise IncompatibleVectorsError(
                f"the vectors have no layer(s) {missing}; they were calibrated on layers {self.layers}. "
                "Calibrate again with them included (calibrate's layers), or choose among the calibrated layers"
            )
        pick = lambda d: {l: d[l] for l in layers if l in d}
        return replace(self, shifts=pick(self.shifts), mm_means=pick(self.mm_means), text_means=pick(self.text_means),
                       stats=pick(self.stats), meta={**self.meta, "layers": list(layers)})

    def normalized(self) -> ShiftVectors:
        """Unit-norm shifts: ``alpha`` then is an absolute step length in hidden-state units."""
        return self._map(lambda v: v / v.norm().clamp_min(1e-12), note="normalized")

    def project_onto(self, directions: Mapping[int, torch.Tensor]) -> ShiftVectors:
        """Keep only each shift's component along ``directions[layer]``: ``(m . s / |s|^2) s``.

        With ``directions`` from :func:`vlmsafe.steering.safety_directions` (mean benign minus mean
        harmful text-only state; the projection does not depend on the sign), steering removes only the
        safety-relevant part of the modality shift (the ShiftDC idea) and leaves the rest of what the image
        changed alone.
        """
        missing = sorted(set(self.shifts) - set(directions))
        if missing:
            raise IncompatibleVectorsError(f"no direction given for layer(s) {missing}; pass one per steered layer")
        out = {}
        for layer, shift in self.shifts.items():
            s = directions[layer].to(shift.dtype)
            out[layer] = (shift @ s) / (s @ s).clamp_min(1e-12) * s
        meta = {**self.meta, "derived": [*self.meta.get("derived", []), "projected onto safety directions"]}
        return ShiftVectors(shifts=out, meta=meta)

    # ------------------------------------------------------------------ algebra
    def _map(self, fn, note: str) -> ShiftVectors:
        meta = {**self.meta, "derived": [*self.meta.get("derived", []), note]}
        return ShiftVectors(shifts={l: fn(v) for l, v in self.shifts.items()}, meta=meta)

    def __mul__(self, scalar: float) -> ShiftVectors:
        if isinstance(scalar, bool) or not isinstance(scalar, (int, float)):
            return NotImplemented
        factor = check_float(scalar, "the factor")  # nan or inf: vectors that turn every steered state to nan
        return self._map(lambda v: v * factor, note=f"*{scalar}")

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> ShiftVectors:
        if isinstance(scalar, (int, float)) and not isinstance(scalar, bool) and scalar == 0:
            raise InputError("cannot divide vectors by 0; use a non-zero divisor, or vectors.normalized()")
        return self * (1.0 / scalar)

    def __neg__(self) -> ShiftVectors:
        return self * -1.0

    def __add__(self, other: ShiftVectors) -> ShiftVectors:
        if not isinstance(other, ShiftVectors):
            return NotImplemented
        if other.hidden_size != self.hidden_size:
            raise IncompatibleVectorsError(
                f"cannot add vectors of hidden size {self.hidden_size} and {other.hidden_size}"
            )
        layers = sorted(set(self.shifts) | set(other.shifts))
        zero = torch.zeros(self.hidden_size)
        shifts = {l: self.shifts.get(l, zero) + other.shifts.get(l, zero) for l in layers}
        meta = {**self.meta, "layers": layers, "derived": [*self.meta.get("derived", []), "sum"]}
        return ShiftVectors(shifts=shifts, meta=meta)

    def __sub__(self, other: ShiftVectors) -> ShiftVectors:
        return self + (-other)

    # ------------------------------------------------------------------ validation
    def check_compatible(self, model: Any, *, strict: bool = False) -> None:
        """Raise :class:`IncompatibleVectorsError` unless these vectors fit ``model``'s residual stream.

        Vectors calibrated on other weights of the same architecture (say the merged model) give a warning,
        or with ``strict`` this error."""
        check_fits(self.meta, self.hidden_size, self.layers, get_adapter(model), what="vectors",
                   title="steering vectors", fix="Calibrate vectors for this model with `vlmsafe calibrate`.",
                   strict=strict)

    # ------------------------------------------------------------------ application
    def apply(self, model: Any, alpha: float = DEFAULT_ALPHA, **options: Any) -> Any:
        """Steer ``model`` with these vectors: ``h_l <- h_l - alpha * shifts[l]``; returns a
        :class:`~vlmsafe.steering.application.SteeringHandle`, a context manager with ``remove()``.

        >>> with vectors.apply(model, alpha=1.0):
        ...     model.generate(**inputs)

        ``options`` are :class:`~vlmsafe.steering.SteeringConfig` fields (``layers``, ``positions``, ``decode``,
        ``steer_text_only``, ``static``: the compiled path; ``strict_model``: refuse vectors calibrated on other
        weights of the same architecture instead of warning), checked there once.
        """
        from vlmsafe.steering.config import SteeringConfig, apply_steering

        refuse_unknown(SteeringConfig, options)
        return apply_steering(model, SteeringConfig(vectors=self, alpha=alpha, **options))

    def recorded_setting(self) -> dict[str, Any]:
        """The ``alpha`` and ``layers`` these vectors are meant to steer with: the setting ``vlmsafe calibrate``
        recommended (``meta["recommended"]``, when tuned), else a recorded ``alpha``; ``{}``: the defaults."""
        rec = self.meta.get("recommended")
        if isinstance(rec, Mapping) and rec.get("status") == "tuned":
            return {"alpha": rec["alpha"], "layers": None if rec["layers"] == "all" else rec["layers"]}
        return {"alpha": self.meta["alpha"]} if "alpha" in self.meta else {}

    # ------------------------------------------------------------------ files
    def save(self, directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``vectors.safetensors`` + ``vectors.json`` into ``directory`` atomically.

        An existing non-empty ``directory`` is replaced only with ``overwrite=True``.
        """
        dest = Path(directory)
        meta = {
            **self.meta,
            "format_version": FORMAT_VERSION,
            "vlmsafe_version": self.meta.get("vlmsafe_version", __version__),
            "hidden_size": self.hidden_size,
            "layers": self.layers,
            "stats": {str(l): s for l, s in self.stats.items()},
        }
        with atomic_path(dest, overwrite=overwrite) as tmp:
            tmp.mkdir(parents=True)
            write_layer_tables(tmp, {"shift": self.shifts, "mm_mean": self.mm_means, "text_mean": self.text_means},
                               meta, tensor_file=TENSOR_FILE, meta_file=META_FILE, fmt="vlmsafe.shift_vectors")
            write_card(tmp, vectors_card(meta))  # inside the atomic output: never a folder without its card
        return dest

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save (with the card) and upload to the Hub repository ``repo_id``; returns the commit URL.
        ``kwargs``: ``private``, ``token``, ``revision``, ``commit_message``, ``create_pr``
        (:func:`vlmsafe.cards.push_to_hub`)."""
        return push_saved(self.save, repo_id, patterns=VECTOR_FILES, **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], model: Any | None = None, *,
             revision: str | None = None) -> ShiftVectors:
        """Read vectors saved by :meth:`save` from a folder or a Hub repository id (``org/name``, downloaded
        with ``huggingface_hub``: its vectors files only, ``revision`` if given); validate against ``model``.
        A downloaded folder gets every check a local one does."""
        root = resolve(directory, patterns=VECTOR_FILES, what="a vectors folder", revision=revision)
        meta, tables = read_layer_tables(
            root, ("shift", "mm_mean", "text_mean"), tensor_file=TENSOR_FILE, meta_file=META_FILE,
            what="a vectors directory (written by `vlmsafe calibrate` or ShiftVectors.save)",
            fix="re-create the vectors with `vlmsafe calibrate`",
        )
        stats = {int(l): s for l, s in meta.pop("stats", {}).items()}
        vectors = cls(shifts=tables["shift"], mm_means=tables["mm_mean"], text_means=tables["text_mean"], stats=stats,
                      meta=meta)
        if model is not None:
            vectors.check_compatible(model)
        return vectors


def data_fields(meta: Mapping[str, Any], *, items: int | None) -> dict[str, Any]:
    """A card's ``data`` block for per-layer artefacts: the calibration file's name (not its local path), the
    item count and the calibration-set sha256 vlmsafe recorded."""
    source = meta.get("calibration_data")
    sha = meta.get("calibration_sha256")
    count = f"{items} calibration items" if items is not None else "the calibration items"
    where = f" from `{Path(source).name}`" if isinstance(source, str) and source else ""
    return {"sha256": sha, "items": items, "source": Path(source).name if isinstance(source, str) and source else None,
            "description": f"{count}{where}; sha256 over every item's prompt and image, in order"
                           + ("" if sha else " (not recorded)")}


def vectors_card(meta: Mapping[str, Any]) -> str:
    """The model card of CMRM vectors with ``meta`` (``vectors.json``): method, where to steer and how much."""
    layers = list(meta.get("layers", []))
    alpha = meta.get("alpha", DEFAULT_ALPHA)
    settings = {
        "alpha": alpha,
        "layers": layers,
        "positions": meta.get("positions"),
        "anchor": meta.get("anchor", "real"),
        "aggregate": meta.get("aggregate", "mean"),
        "hidden_size": meta.get("hidden_size"),
        "num_layers": meta.get("num_layers"),
        "model_class": meta.get("model_class"),
        "family": meta.get("family"),
        "dtype": meta.get("dtype"),
        "system_prompt": meta.get("system_prompt"),
        **({"derived": meta["derived"]} if meta.get("derived") else {}),
    }
    model = meta.get("model_name") or meta.get("model_class")
    rec = meta.get("recommended") if isinstance(meta.get("recommended"), Mapping) else {}
    tuned = ("recorded with the vectors" if "alpha" in meta
             else "vlmsafe's default; compare others with `vlmsafe evaluate --alpha`")
    if rec.get("status") == "tuned":  # chosen by `vlmsafe calibrate` on items it held out
        alpha = rec["alpha"]
        settings.update(alpha=alpha, recommended_layers=rec["layers"])
        tuned = (f"recommended by calibration (layers {rec['layers']}, chosen on {rec['held_out_items']} held-out "
                 f"items by rule {rec['rule']!r}; generate / evaluate use it unless told otherwise)")
    elif rec:
        tuned = f"vlmsafe's default, untuned: {rec.get('reason')}"
    steer_kw = f", layers={rec['layers']!r}" if rec.get("status") == "tuned" and rec["layers"] != "all" else ""
    usage = f"""```python
from vlmsafe.steering import ShiftVectors, load_model, steer

model, processor = load_model({json.dumps(str(model or "BASE_MODEL"))})
vectors = ShiftVectors.load("THIS_FOLDER_OR_HUB_ID", model=model)  # checks they fit the model
with steer(model, vectors, alpha={alpha}{steer_kw}):
    ...  # generate as usual: h_l <- h_l - alpha * shift_l at the steered layers
```

Or on the command line: `vlmsafe generate --model MODEL --vectors THIS_FOLDER_OR_HUB_ID --alpha {alpha} ...`."""
    files = (f"- `{TENSOR_FILE}`: `shift.<layer>`, `mm_mean.<layer>`, `text_mean.<layer>` (float32)\n"
             f"- `{META_FILE}`: the full provenance and per-layer statistics, with the tensor file's sha256")
    return render_card(
        artifact="steering-vectors", method=str(meta.get("method", "cmrm")),
        title=f"CMRM steering vectors for {display_name(model) or 'a vision-language model'}",
        summary=(f"Per-layer shift vectors (multimodal minus text-only hidden states) at {len(layers)} decoder "
                 f"layer(s), for Cross-Modal Representation Manipulation: at inference the shift is removed "
                 f"from the hidden states of image inputs, which restores the language model's text-only "
                 f"safety behaviour. alpha {alpha}: {tuned}."),
        base_model=meta.get("model_name"), relation="adapter", tags=["steering-vectors", "cmrm", "safety"],
        settings=settings, data=data_fields(meta, items=meta.get("num_items")),
        sections=[("Usage", usage), ("Files", files)], license=meta.get("license"),
    )


def calibration_meta(adapter: ModelAdapter, *, layers: list[int], positions: str, **extra: Any) -> dict[str, Any]:
    """Provenance stored with vectors calibrated on ``adapter``'s model (what :meth:`ShiftVectors.check_compatible`
    validates); ``extra`` adds fields such as the calibration hash or the source of the activations."""
    return {
        "method": "cmrm",
        "model_class": type(adapter.model).__name__,
        "model_name": adapter.model_name,
        "family": adapter.family,
        "hidden_size": adapter.hidden_size,
        "num_layers": adapter.num_layers,
        "layers": list(layers),
        "positions": positions,
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "vlmsafe_version": __version__,
        **({"model_fingerprint": fp} if (fp := model_fingerprint(adapter.model)) else {}),  # see check_fits
        **extra,
    }
