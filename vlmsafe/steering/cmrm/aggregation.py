"""How CMRM calibration turns per-item shifts into one vector per layer: the aggregators (mean, first principal
component, or any callable) and the running float64 sums they read (:class:`ShiftAccumulator`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from vlmsafe.errors import IncompatibleVectorsError, InputError
from vlmsafe.steering.choices import AGGREGATES
from vlmsafe.steering.vectors import ShiftVectors

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
