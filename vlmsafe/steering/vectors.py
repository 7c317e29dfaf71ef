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

Nothing is ever unpickled. Vectors support algebra like repeng's (``a + b``, ``0.5 * a``, ``-a``),
which combines the shifts; the means are dropped from the result because they no longer describe it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmsafe import __version__
from vlmsafe.adapters import ModelAdapter, get_adapter
from vlmsafe.cards import CARD_FILE, display_name, push_saved, render_card, resolve, write_card
from vlmsafe.errors import FileFormatError, IncompatibleVectorsError, InputError
from vlmsafe.io import atomic_path, parse_json, sha256_file
from vlmsafe.loading import model_fingerprint, warn_if_other_model
from vlmsafe.steering.choices import AGGREGATES, DEFAULT_ALPHA

TENSOR_FILE = "vectors.safetensors"
META_FILE = "vectors.json"
FORMAT_VERSION = 1
#: What a vectors folder holds: all a Hub download fetches (and an upload sends).
VECTOR_FILES = (TENSOR_FILE, META_FILE, CARD_FILE)


def write_layer_tables(
    folder: Path,
    tables: Mapping[str, Mapping[int, torch.Tensor]],
    meta: Mapping[str, Any],
    *,
    tensor_file: str,
    meta_file: str,
    fmt: str,
) -> None:
    """Write ``{prefix.layer: tensor}`` as float32 safetensors and ``meta`` (+ the tensor file's sha256) as JSON.

    The one on-disk format of per-layer artifacts (shift vectors, ShiftDC directions): tensors only,
    nothing pickled, with a checksum so a truncated copy is refused on load.
    """
    tensors = {f"{prefix}.{layer}": vec.detach().to("cpu", torch.float32).contiguous()
               for prefix, table in tables.items() for layer, vec in table.items()}
    save_file(tensors, str(folder / tensor_file), metadata={"format": fmt, "version": str(FORMAT_VERSION)})
    meta = {**meta, "tensor_sha256": sha256_file(folder / tensor_file)}
    (folder / meta_file).write_text(json.dumps(meta, indent=2) + "\n")


def read_layer_tables(
    root: Path, prefixes: tuple[str, ...], *, tensor_file: str, meta_file: str, what: str, fix: str,
    schema: Mapping[str, Field] | None = None,
) -> tuple[dict[str, Any], dict[str, dict[int, torch.Tensor]]]:
    """``(meta, {prefix: {layer: tensor}})`` written by :func:`write_layer_tables`, checked on the way.

    Refused with a :class:`FileFormatError` naming the file and ``fix``: a missing file, meta that is not
    a JSON object, a tensor file whose sha256 differs from the recorded one (corrupted or truncated), an
    unreadable safetensors file, an unknown tensor name, or no ``<prefixes[0]>.<layer>`` tensor at all;
    and, whether or not a checksum was recorded (a hand-made or edited folder has none), a tensor that is
    not a vector of floats, non-finite values, or vectors of a size other than the others' and the
    recorded ``hidden_size``; and metadata whose fields do not match ``schema`` (default :data:`META_SCHEMA`,
    see :func:`check_meta`).
    """
    tensor_path, meta_path = root / tensor_file, root / meta_file
    for path in (tensor_path, meta_path):
        if not path.is_file():
            raise FileFormatError(f"{path} not found: {what} holds {tensor_file} and {meta_file}; {fix}")
    meta = parse_json(meta_path.read_text(encoding="utf-8", errors="replace"), where=str(meta_path), fix=fix)
    if not isinstance(meta, dict):
        raise FileFormatError(f"{meta_path}: expected a JSON object; {fix}")
    expected = meta.get("tensor_sha256")
    if expected and sha256_file(tensor_path) != expected:
        raise FileFormatError(f"{tensor_path} is corrupted or truncated: its sha256 does not match the one "
                              f"recorded in {meta_file}; {fix}")
    try:
        raw = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{tensor_path} is not a readable safetensors file ({exc}); {fix}") from None
    tables: dict[str, dict[int, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    for key, value in raw.items():
        prefix, _, layer = key.rpartition(".")
        if prefix not in tables or not layer.isdigit():
            expected_names = ", ".join(f"{p}.<layer>" for p in prefixes)
            raise FileFormatError(f"{tensor_path}: unexpected tensor {key!r}; expected {expected_names}; {fix}")
        tables[prefix][int(layer)] = value
    if not tables[prefixes[0]]:
        raise FileFormatError(f"{tensor_path} holds no {prefixes[0]}.<layer> tensors; {fix}")
    check_meta(meta, META_SCHEMA if schema is None else schema, meta_path, layers=sorted(tables[prefixes[0]]))
    _check_vectors(raw, meta.get("hidden_size"), tensor_path, fix)
    return meta, tables


def _check_vectors(raw: Mapping[str, torch.Tensor], hidden_size: Any, path: Path, fix: str) -> None:
    """Every tensor a finite float vector of one size (``hidden_size`` where recorded): a NaN vector would steer
    every answer into NaN, a wrong size fails inside the model's forward."""
    sizes = {hidden_size} if isinstance(hidden_size, int) and not isinstance(hidden_size, bool) else set()
    for key, value in raw.items():
        if value.dim() != 1 or not value.is_floating_point():
            raise FileFormatError(f"{path}: {key} is a {value.dtype} tensor of shape {list(value.shape)}, not a "
                                  f"vector of floats; {fix}")
        if not bool(torch.isfinite(value).all()):
            raise FileFormatError(f"{path}: {key} holds non-finite values (NaN or inf); {fix}")
        sizes.add(value.shape[0])
        if len(sizes) > 1:
            what = f"the recorded hidden_size {hidden_size}" if hidden_size in sizes else "the other vectors'"
            raise FileFormatError(f"{path}: {key} has {value.shape[0]} values, unlike {what}; {fix}")


# --------------------------------------------------------------------------- metadata schema
#: A metadata field: ``(check(value) -> ok, what a valid value is)``.
Field = tuple[Callable[[Any], bool], str]


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _optional_str(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _is_sha256(value: Any) -> bool:
    return value is None or (isinstance(value, str) and len(value) == 64
                             and all(c in "0123456789abcdef" for c in value.lower()))


def _int_list(length: int | None = None, low: int = 0, high: int | None = None) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        return (isinstance(value, list) and (length is None or len(value) == length)
                and all(_is_int(v, low) and (high is None or v <= high) for v in value))
    return check


def _stats_problem(stats: dict) -> str | None:
    """What is wrong with ``stats`` (``{"<layer>": {"<statistic>": number, "count": int}}``), or ``None``."""
    for key, entry in stats.items():
        if not (isinstance(key, str) and key.isdigit()):
            return f"has the key {json.dumps(key)}, not a layer number"
        if not isinstance(entry, dict):
            return f"entry {key!r} must be an object {{statistic: number}}, got {json.dumps(entry)[:40]}"
        for name, value in entry.items():
            if not _is_number(value):
                return f"entry {key!r}: {name!r} must be a number, got {json.dumps(value)[:40]}"
        if "count" in entry and not _is_int(entry["count"]):
            return f"entry {key!r}: 'count' must be a non-negative integer, got {json.dumps(entry['count'])}"
    return None


#: Every field vlmsafe writes in ``vectors.json``, with the values it accepts on load (types and ranges). A field
#: may be absent (older or hand-made vectors hold fewer); fields it does not know are kept as they are, so
#: provenance added later (a model fingerprint, ...) loads in this version too.
META_SCHEMA: dict[str, Field] = {
    "format_version": (lambda v: _is_int(v, 1), f"an integer from 1 to {FORMAT_VERSION}"),
    "method": (_is_str, "a string such as 'cmrm'"),
    "model_class": (_optional_str, "a model class name such as 'LlavaForConditionalGeneration'"),
    "model_name": (_optional_str, "a string (the model's path or hub id)"),
    "family": (_optional_str, "an adapter family such as 'llava'"),
    "hidden_size": (lambda v: _is_int(v, 1), "a positive integer"),
    "num_layers": (lambda v: _is_int(v, 1), "a positive integer"),
    "layers": (_int_list(), "a list of layer indices (integers >= 0)"),
    "positions": (_is_str, "a string such as 'last'"),
    "dtype": (_is_str, "a dtype name such as 'float32'"),
    "vlmsafe_version": (_is_str, "a version string"),
    "system_prompt": (_optional_str, "a string or null"),
    "calibration_sha256": (_is_sha256, "64 hex digits or null"),
    "calibration_data": (_optional_str, "a path string or null"),
    "num_items": (lambda v: _is_int(v, 1), "a positive integer"),
    "aggregate": (lambda v: v in ("mean", "pca") or (_is_str(v) and v.startswith("custom:") and len(v) > 7),
                  "'mean', 'pca' or 'custom:NAME'"),
    "anchor": (lambda v: v in ("real", "blank", "noise", "image"), "one of 'real', 'blank', 'noise', 'image'"),
    "anchor_colour": (_int_list(3, 0, 255), "three integers in 0..255"),
    "anchor_seed": (lambda v: _is_int(v), "a non-negative integer"),
    "anchor_size": (_int_list(2, 1), "[width, height], positive integers"),
    "anchor_sha256": (_is_sha256, "64 hex digits"),
    "stats": (lambda v: isinstance(v, dict), "an object {layer: {statistic: number}}"),
    "derived": (lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of strings"),
    "tensor_sha256": (_is_sha256, "64 hex digits"),
    "alpha": (lambda v: _is_number(v) and v is not None and 0 <= v < float("inf"), "a number >= 0"),
}


def check_meta(meta: Mapping[str, Any], schema: Mapping[str, Field], path: Path, *,
               layers: list[int] | None = None) -> None:
    """Refuse metadata (``vectors.json``, ``directions.json``) that an edit by hand or another tool left with a
    field of the wrong type or range, with one :class:`FileFormatError` naming the field, the file and what the
    field must be -- not a ``ValueError`` from deep inside a later step. Also: a ``format_version`` newer than
    this vlmsafe reads, ``num_layers`` below a stored layer, and ``layers`` / ``stats`` naming layers the tensor
    file does not hold (``layers``: the stored ones)."""
    fix = "correct it, or re-create the folder with `vlmsafe calibrate`"

    def refuse(name: str, problem: str) -> FileFormatError:
        return FileFormatError(f"{path}: field {name!r} {problem}; {fix}")

    for name, (ok, expected) in schema.items():
        if name in meta and not ok(meta[name]):
            raise refuse(name, f"must be {expected}, got {json.dumps(meta[name])[:60]}")
    problem = _stats_problem(meta["stats"]) if isinstance(meta.get("stats"), dict) else None
    if problem:
        raise refuse("stats", problem)
    version = meta.get("format_version")
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise FileFormatError(f"{path}: format_version {version} is newer than this vlmsafe reads ({FORMAT_VERSION}); "
                              "upgrade vlmsafe")
    if layers is None:
        return
    n = meta.get("num_layers")
    if isinstance(n, int) and layers and max(layers) >= n:
        raise refuse("num_layers", f"is {n}, but the tensor file holds layer {max(layers)}")
    if "layers" in meta and sorted(set(meta["layers"])) != layers:
        raise refuse("layers", f"lists {meta['layers']}, but the tensor file holds layers {layers}")
    extra = sorted(int(k) for k in meta.get("stats", {}) if int(k) not in layers)
    if extra:
        raise refuse("stats", f"has statistics for layer(s) {extra} that the tensor file does not hold ({layers})")


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
        if not isinstance(scalar, (int, float)):
            return NotImplemented
        return self._map(lambda v: v * float(scalar), note=f"*{scalar}")

    __rmul__ = __mul__

    def __truediv__(self, scalar: float) -> ShiftVectors:
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
        check_fits(self.meta, self.hidden_size, self.layers, model, what="vectors", title="steering vectors",
                   fix="Calibrate vectors for this model with `vlmsafe calibrate`.", strict=strict)

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
#: How per-item shifts become one vector per layer (see :meth:`ShiftAccumulator.to_vectors`).
Aggregator = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


def mean_shift(diffs: torch.Tensor | None, mean: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean shift itself (the default aggregate; needs no per-item shifts)."""
    return mean.float(), {}


def resolve_aggregate(aggregate: str | Aggregator) -> tuple[str, Aggregator]:
    """``(name recorded in meta, function)`` of an aggregation strategy: a callable, or a name of :data:`AGGREGATORS`.

    A callable ``fn(diffs, mean)`` gets one layer's per-item shifts ``(N, H)`` and their mean ``(H,)``
    (float64) and returns the layer's vector ``(H,)``, or it and a dict of float statistics; one of the
    table's is recorded by its name, any other as ``"custom:<its name>"``.
    """
    if callable(aggregate):
        named = next((name for name, fn in AGGREGATORS.items() if fn is aggregate), None)
        return named or f"custom:{getattr(aggregate, '__name__', type(aggregate).__name__)}", aggregate
    if aggregate not in AGGREGATORS:
        raise InputError(f"aggregate must be one of {', '.join(map(repr, AGGREGATES))} or a function "
                         f"fn(per_item_shifts, mean) -> vector, got {aggregate!r}")
    return aggregate, AGGREGATORS[aggregate]


def first_principal_component(diffs: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The first principal component of per-item shifts ``diffs`` (N, H), oriented and scaled by ``mean``.

    The component is the top right-singular vector of the centred ``diffs`` (the direction along
    which the items' shifts vary most, as in ``sklearn.decomposition.PCA``). Its sign is chosen so
    that the mean shift projects positively on it, and it is scaled by that projection, so the
    result is the part of the mean shift that lies along the component (``alpha`` keeps its meaning
    of "how much of the gap to remove"). Returns the vector and its statistics: the share of
    variance the component explains and its cosine with the mean shift.
    """
    d = diffs.double()
    if d.shape[0] < 2:
        raise InputError(f"a principal component needs at least 2 calibration items, got {d.shape[0]}; "
                         "use aggregate='mean'")
    _, singular, vh = torch.linalg.svd(d - d.mean(dim=0), full_matrices=False)
    if float(singular[0]) <= 1e-12 * max(1.0, float(d.norm())):
        raise InputError("the per-item shifts do not vary, so they have no principal component; use aggregate='mean'")
    component = vh[0]
    mean = mean.double()
    projection = float(mean @ component)
    if projection < 0:
        component, projection = -component, -projection
    stats = {"pca_explained_variance": float(singular[0] ** 2 / (singular**2).sum()),
             "pca_cosine_to_mean": projection / max(float(mean.norm()), 1e-30)}
    return (projection * component).float(), stats


#: The aggregation strategies by name (``--aggregate``, the ``"aggregate"`` recorded in ``vectors.json``): the one
#: table from a name to its function; :data:`~vlmsafe.steering.choices.AGGREGATES` lists its names for the CLI.
AGGREGATORS: dict[str, Aggregator] = {"mean": mean_shift, "pca": first_principal_component}


def check_fits(meta: Mapping[str, Any], hidden_size: int, layers: list[int], model: Any, *, what: str,
               fix: str, title: str | None = None, strict: bool = False) -> None:
    """Raise :class:`IncompatibleVectorsError` unless per-layer tensors read from a model (described by
    ``meta``: ``num_layers``, ``model_class``, ``family``, ``model_name``) fit ``model``'s residual stream."""
    adapter: ModelAdapter = get_adapter(model)
    problems = []
    if adapter.hidden_size != hidden_size:
        problems.append(f"hidden size: {what} have {hidden_size}, model has {adapter.hidden_size}")
    n = meta.get("num_layers")
    if n is not None and int(n) != adapter.num_layers:
        problems.append(f"layer count: {what} were calibrated on a model with {n} layers, "
                        f"model has {adapter.num_layers}")
    cls = meta.get("model_class")
    if cls and cls != type(adapter.model).__name__:
        problems.append(f"model class: {what} were calibrated on {cls}, model is {type(adapter.model).__name__}")
    fam = meta.get("family")
    if fam and fam != adapter.family:
        problems.append(f"family: {what} are for {fam!r}, model is {adapter.family!r} "
                        f"({type(adapter.model).__name__})")
    bad = [l for l in layers if l >= adapter.num_layers]
    if bad and n is None:
        problems.append(f"layers {bad} do not exist in a model with {adapter.num_layers} layers")
    if problems:
        source = meta.get("model_name") or meta.get("model_class") or "another model"
        raise IncompatibleVectorsError(
            f"{title or what} calibrated on {source} do not fit {type(adapter.model).__name__}: "
            + "; ".join(problems) + ". " + fix
        )
    warn_if_other_model(meta, adapter.model, what=title or what, strict=strict)  # same shapes, other weights


class ShiftAccumulator:
    """Running float64 sums of paired activations, turned into :class:`ShiftVectors` at the end.

    Calibration streams items through the model batch by batch; this keeps what the vectors and
    their statistics need (per-layer sums of the multimodal and text-only states, and the sums of
    the per-item norms) without storing any activation, and sums across processes exactly.
    With ``keep_items=True`` (needed for ``aggregate="pca"``) it also keeps each item's shift, in
    float32: ``items x layers x hidden x 4`` bytes (300 items, 32 layers of 4096: 157 MB).
    """

    def __init__(self, layers: list[int], hidden_size: int, *, keep_items: bool = False) -> None:
        self.layers = list(layers)
        self.hidden_size = hidden_size
        self.mm_sum = {l: torch.zeros(hidden_size, dtype=torch.float64) for l in self.layers}
        self.text_sum = {l: torch.zeros(hidden_size, dtype=torch.float64) for l in self.layers}
        self.norms = {l: torch.zeros(3, dtype=torch.float64) for l in self.layers}  # |mm - text|, |mm|, |text|
        self.count = 0
        self.item_shifts: dict[int, list[torch.Tensor]] | None = {l: [] for l in self.layers} if keep_items else None

    def add(self, mm: Mapping[int, torch.Tensor], text: Mapping[int, torch.Tensor]) -> None:
        """Add a batch: ``mm[l]`` and ``text[l]`` are ``(B, H)`` paired rows (same item order)."""
        n = None
        for l in self.layers:
            a, b = mm[l].detach().to("cpu", torch.float64), text[l].detach().to("cpu", torch.float64)
            if a.shape != b.shape or a.dim() != 2:
                raise IncompatibleVectorsError(
                    f"layer {l}: paired activations have shapes {tuple(a.shape)} and {tuple(b.shape)}"
                )
            self.mm_sum[l] += a.sum(0)
            self.text_sum[l] += b.sum(0)
            self.norms[l] += torch.stack([(a - b).norm(dim=1).sum(), a.norm(dim=1).sum(), b.norm(dim=1).sum()])
            if self.item_shifts is not None:
                self.item_shifts[l].append((a - b).float())
            n = a.shape[0]
        self.count += int(n or 0)

    def all_reduce(self, accelerator: Any | None) -> ShiftAccumulator:
        """Sum the statistics of every process (in place; identity without an accelerator)."""
        from vlmsafe.distributed import all_reduce_sum, is_distributed

        if not is_distributed(accelerator):
            return self
        H = self.hidden_size
        packed = torch.stack([torch.cat([self.mm_sum[l], self.text_sum[l], self.norms[l]]) for l in self.layers])
        packed = all_reduce_sum(packed, accelerator)
        for i, l in enumerate(self.layers):
            self.mm_sum[l], self.text_sum[l] = packed[i, :H].clone(), packed[i, H : 2 * H].clone()
            self.norms[l] = packed[i, 2 * H :].clone()
        self.count = int(all_reduce_sum(torch.tensor([self.count], dtype=torch.float64), accelerator).item())
        if self.item_shifts is not None:
            from vlmsafe.distributed import gather

            for l in self.layers:  # process order = shard order = item order
                local = self.item_shifts[l]
                mine = torch.cat(local) if local else torch.zeros(0, H)
                self.item_shifts[l] = [t for t in gather([mine], accelerator) if t.numel()]
        return self

    def to_vectors(self, meta: dict[str, Any], *, aggregate: str | Aggregator = "mean") -> ShiftVectors:
        """Per-layer shifts (multimodal minus text-only) with statistics and ``meta``.

        ``aggregate="mean"``: the mean shift. ``"pca"``: the first principal component of the
        per-item shifts, oriented and scaled by the mean (:func:`first_principal_component`), or any
        function of the per-item shifts (:func:`resolve_aggregate`); both need ``keep_items=True``.
        The means of both sides are kept either way.
        """
        if self.count == 0:
            raise IncompatibleVectorsError("no calibration items were seen; pass at least one (prompt, image) pair")
        name, fn = resolve_aggregate(aggregate)
        if fn is not mean_shift and self.item_shifts is None:
            raise InputError(f"aggregate={name!r} needs the per-item shifts; "
                             "create the ShiftAccumulator with keep_items=True")
        shifts, mm_means, text_means, stats = {}, {}, {}, {}
        n = self.count
        for layer in self.layers:
            mm_mean, text_mean = (self.mm_sum[layer] / n).float(), (self.text_sum[layer] / n).float()
            shifts[layer] = mm_mean - text_mean
            mm_means[layer], text_means[layer] = mm_mean, text_mean
            diff, mm_norm, text_norm = (float(x) / n for x in self.norms[layer])
            stats[layer] = {"count": n, "shift_norm": float(shifts[layer].norm()), "mean_item_shift_norm": diff,
                            "mm_norm": mm_norm, "text_norm": text_norm}
            if fn is not mean_shift:
                mean = self.mm_sum[layer] / n - self.text_sum[layer] / n
                out = fn(torch.cat(self.item_shifts[layer]), mean)
                vector, extra = out if isinstance(out, tuple) else (out, {})
                if not isinstance(vector, torch.Tensor) or vector.shape != (self.hidden_size,):
                    raise InputError(f"aggregate {name!r} returned {getattr(vector, 'shape', type(vector).__name__)} "
                                     f"for layer {layer}; return one vector of {self.hidden_size} values")
                shifts[layer] = vector.float()
                stats[layer].update(extra, mean_shift_norm=stats[layer]["shift_norm"],
                                    shift_norm=float(shifts[layer].norm()))
        return ShiftVectors(shifts=shifts, mm_means=mm_means, text_means=text_means, stats=stats,
                            meta={**meta, "num_items": n, "aggregate": name})
