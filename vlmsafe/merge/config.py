"""The declarative merge recipe: what ``vlmsafe merge CONFIG.yaml`` reads.

Example (every key but ``vlm``, ``aligned`` and ``output`` is optional)::

    vlm: checkpoints/llava-7b            # VL-adapted model; its layout is the output layout
    aligned: checkpoints/llama-2-7b-chat # safety-aligned text-only LLM
    base: null                           # task-vector methods: common base (default: aligned)
    method: linear                       # linear | slerp | task_arithmetic | ties | dare_linear | dare_ties
    weight: 0.4                          # share of the aligned model; number, list or mapping
    # weight: {default: 0.4, layers: [0.2, 0.6], rules: [{pattern: "norm", value: 0.0}]}
    density: 1.0                         # ties / dare: fraction of each task vector kept, in (0, 1]
    convention: mergekit                 # ties / dare numerics: mergekit | peft
    mask: masks/safety_top20.safetensors # optional: confine the merge to masked entries
    mask_missing: keep                   # tensors absent from the mask: keep (VLM) | merge
    vocab_rows: error                    # error | shared (merge shared token rows, copy the rest)
    allow_passthrough: false             # copy unmatched / mismatched LM tensors instead of failing
    cast_dtype: false                    # merge inputs of different dtypes (in float32)
    dtype: null                          # output dtype (default: the VLM's per tensor)
    max_shard_size: 2GB
    seed: 0                              # DARE randomness
    hash_inputs: true                    # record sha256 of every input file in the recipe
    output: merged/llava-7b-safe

Relative paths are taken relative to the current directory, as on the command line.

Valid numbers (checked when the config is built, before any file is read; every value of a
per-layer schedule counts):

* ``weight`` -- the aligned model's share lam: in [0, 1] for ``linear``, ``slerp``, ``ties``,
  ``dare_linear`` and ``dare_ties`` (0 keeps the VLM, 1 takes the aligned model; outside that range
  they extrapolate, and TIES / DARE sign election and rescaling are not defined for it). For
  ``task_arithmetic`` lam may lie in [-1, 2]: the merge is ``aligned + (1 - lam) * (vlm - aligned)``
  (or, with ``base``, ``base + (1 - lam) * (vlm - base) + lam * (aligned - base)``), and lam > 1
  subtracts part of the VL-adaptation task vector -- task negation, Ilharco et al., ICLR 2023.
* ``density`` -- in (0, 1] for ``ties`` / ``dare_*`` (0 would drop every delta); other methods
  have no density and refuse a value other than 1.
* ``seed`` -- an integer >= 0; ``max_shard_size`` -- a positive size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from vlmsafe.dtypes import dtype_name, torch_dtype
from vlmsafe.errors import FileFormatError, InputError
from vlmsafe.merge.choices import METHODS, TASK_VECTOR_METHODS
from vlmsafe.merge.schedule import Schedule
from vlmsafe.validation import SEED_MAX, parse_size

#: Valid aligned-model shares per method (see the module docstring); the default is [0, 1].
WEIGHT_RANGES: dict[str, tuple[float, float]] = {"task_arithmetic": (-1.0, 2.0)}
#: Methods that use ``density``.
DENSITY_METHODS = frozenset({"ties", "dare_linear", "dare_ties"})
#: Methods that use ``seed`` (DARE's random drop).
SEED_METHODS = frozenset({"dare_linear", "dare_ties"})



@dataclass
class MergeConfig:
    """Everything a checkpoint merge needs; see the module docstring for the YAML form."""

    vlm: Path
    aligned: Path
    output: Path
    method: str = "linear"
    weight: Schedule = field(default_factory=lambda: Schedule(0.5))
    density: Schedule = field(default_factory=lambda: Schedule(1.0))
    base: Path | None = None
    convention: Literal["mergekit", "peft"] = "mergekit"
    normalize: bool | None = None
    mask: Path | None = None
    mask_missing: Literal["keep", "merge"] = "keep"
    vocab_rows: Literal["error", "shared"] = "error"
    allow_passthrough: bool = False
    cast_dtype: bool = False
    dtype: str | None = None
    max_shard_size: str | int = "2GB"
    key_rules: tuple[tuple[str, str], ...] = ()
    seed: int = 0
    hash_inputs: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.vlm, self.aligned, self.output = Path(self.vlm), Path(self.aligned), Path(self.output)
        self.base = Path(self.base) if self.base is not None else None
        self.mask = Path(self.mask) if self.mask is not None else None
        self.weight = Schedule.parse(self.weight, name="weight")
        self.density = Schedule.parse(self.density, name="density")
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.method in TASK_VECTOR_METHODS:  # peft's merge_utils: a missing package named before the work
            from vlmsafe.extras import require_extra

            require_extra("merge", "peft", feature=f"the {self.method} merge")
        if self.base is not None and self.method not in TASK_VECTOR_METHODS:
            raise InputError(f"`base` only applies to {sorted(TASK_VECTOR_METHODS)}; remove it for {self.method}.")
        if self.convention not in ("mergekit", "peft"):
            raise InputError(f"convention must be 'mergekit' or 'peft', got {self.convention!r}.")
        if self.mask_missing not in ("keep", "merge"):
            raise InputError(f"mask_missing must be 'keep' or 'merge', got {self.mask_missing!r}.")
        if self.vocab_rows not in ("error", "shared"):
            raise InputError(f"vocab_rows must be 'error' or 'shared', got {self.vocab_rows!r}.")
        if self.dtype is not None:
            dtype_name(self.dtype, "dtype")
        parse_size(self.max_shard_size)  # validate now, before any work
        self.key_rules = tuple(_pair(r) for r in self.key_rules)
        self._check_numbers()

    def _check_numbers(self) -> None:
        low, high = WEIGHT_RANGES.get(self.method, (0.0, 1.0))
        for where, value in self.weight.items():
            if not low <= value <= high:
                other = "; task_arithmetic accepts [-1, 2]" if self.method != "task_arithmetic" else ""
                raise InputError(
                    f"{where} = {value:g} is outside [{low:g}, {high:g}] for method {self.method} (the aligned "
                    f"model's share: 0 keeps the VLM, 1 takes the aligned model); pass a value in range{other}"
                )
        for where, value in self.density.items("density"):
            if self.method in DENSITY_METHODS and not 0.0 < value <= 1.0:
                raise InputError(
                    f"{where} = {value:g} is outside (0, 1] (the fraction of each task vector kept); e.g. 0.5"
                )
            if self.method not in DENSITY_METHODS and value != 1.0:
                raise InputError(
                    f"{where} = {value:g} has no effect with method {self.method}; remove it or use one of "
                    f"{', '.join(sorted(DENSITY_METHODS))}"
                )
        for name in ("allow_passthrough", "cast_dtype", "hash_inputs", "overwrite"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InputError(f"normalize must be true, false or null, got {self.normalize!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise InputError(f"seed must be an integer in [0, {SEED_MAX}], got {self.seed!r}")
        if self.seed != 0 and self.method not in SEED_METHODS:
            raise InputError(f"seed = {self.seed} has no effect with method {self.method} (nothing is random); "
                             f"remove it or use one of {', '.join(sorted(SEED_METHODS))}")

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    @property
    def out_dtype(self) -> torch.dtype | None:
        return torch_dtype(self.dtype) if self.dtype else None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], **overrides: Any) -> MergeConfig:
        """Build from a mapping (parsed YAML); ``overrides`` that are not None replace its values."""
        merged = {**dict(data), **{k: v for k, v in overrides.items() if v is not None}}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(merged) - names
        if unknown:
            raise InputError(f"unknown merge config keys {sorted(unknown)}; valid keys: {', '.join(sorted(names))}.")
        missing = [k for k in ("vlm", "aligned", "output") if merged.get(k) is None]
        if missing:
            raise InputError(f"merge config is missing {missing}; set them in the YAML or with "
                             "`vlm`/`aligned`/`output`.")
        return cls(**merged)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> MergeConfig:
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileFormatError(f"merge config {p} not found; pass the path to a YAML file.")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise FileFormatError(f"merge config {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise FileFormatError(f"merge config {p} must be a mapping of keys to values.")
        from vlmsafe.merge.mergekit_yaml import is_mergekit_config, translate

        if is_mergekit_config(data):  # mergekit's own form (models: / merge_method:), for the methods both have
            data = translate(data, where=str(p))
        return cls.from_dict(data, **overrides)

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly form, stored in the output's recipe."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Schedule):
                v = v.to_json()
            elif isinstance(v, Path):
                v = str(v)
            elif isinstance(v, tuple):
                v = [list(x) for x in v]
            out[f.name] = v
        return out


def _pair(r: Any) -> tuple[str, str]:
    if isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, str) for x in r):
        return (r[0], r[1])
    raise InputError(f"key_rules entries must be [VLM_PREFIX, LLM_PREFIX] pairs of strings, got {r!r}.")
