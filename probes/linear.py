"""Linear safety probes: does a layer's hidden state linearly encode "harmful vs benign"?

A probe is a scikit-learn ``Pipeline(StandardScaler, LogisticRegression)``. Standardising first
matters because residual-stream features have wildly different scales (a few "massive
activation" dimensions dominate raw dot products); the regularisation strength ``C`` is chosen by
stratified k-fold cross-validation on the training set only, and the pipeline is then refitted on
all training rows. Labels are ``1`` = harmful, ``0`` = benign.

The probe's *harmful direction* is its weight vector mapped back to raw hidden-state space
(``coef / scale``): moving a hidden state along it raises the harmful logit. The shift analysis
projects the CMRM shift onto this direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from tqdm.auto import tqdm

from vlmsafe.errors import InputError
from vlmsafe.options import check_options, float_option, int_option
from vlmsafe.validation import SEED_MAX, check_float

#: Regularisation strengths tried by cross-validation (inverse L2 penalty).
DEFAULT_CS: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)

HARMFUL, BENIGN = 1, 0


@dataclass
class ProbeFit:
    """How the probes are fitted: the held-out share, the cross-validation folds and ``C`` grid, the seed.

    ``test_size`` is the share of the items :func:`probes.probe_layers` holds out (stratified; :func:`probes.
    analyze_shift` fits on every item and ignores it); ``cv`` folds choose ``C`` among ``Cs`` (capped by the
    smaller class, see :func:`fit_probe`); ``seed`` fixes the split, the folds and the solver. Checked once, here.
    """

    test_size: float = float_option(0.3, "share of the items held out to test the probes", low=0.0, high=1.0,
                                    low_open=True, high_open=True)
    cv: int = int_option(5, "cross-validation folds that choose C", low=2)
    Cs: Sequence[float] = field(default=DEFAULT_CS)
    seed: int = int_option(0, "seed of the split, the folds and the solver", low=0, high=SEED_MAX)

    def __post_init__(self) -> None:
        check_options(self)
        if isinstance(self.Cs, (str, bytes)) or not len(self.Cs):
            raise InputError(f"Cs must be a non-empty sequence of regularisation strengths, got {self.Cs!r}")
        self.Cs = tuple(check_float(c, "Cs", low=0.0, low_open=True) for c in self.Cs)


def labels_from_items(items: Sequence[object]) -> np.ndarray:
    """``1`` for items whose ``label`` is ``"harmful"``, ``0`` for ``"benign"``."""
    out = []
    for item in items:
        label = getattr(item, "label", None) if not isinstance(item, dict) else item.get("label")
        if label not in ("harmful", "benign"):
            raise InputError(
                f"item {getattr(item, 'id', item)!r} has label {label!r}; probes need 'harmful' or 'benign' labels"
            )
        out.append(HARMFUL if label == "harmful" else BENIGN)
    return np.asarray(out, dtype=np.int64)


def check_binary(y: np.ndarray, *, min_per_class: int = 2, what: str = "training set") -> None:
    """Raise an actionable error unless ``y`` holds both classes, each at least ``min_per_class`` times."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=2)
    if counts.min() < min_per_class:
        raise InputError(
            f"the {what} has {counts[HARMFUL]} harmful and {counts[BENIGN]} benign items; a probe needs at least "
            f"{min_per_class} of each. Add labelled items (field 'label': 'harmful' | 'benign') to the data file"
        )


@dataclass
class LayerProbe:
    """A fitted probe for one layer, with its cross-validation figures."""

    layer: int
    pipeline: Pipeline
    C: float
    cv_accuracy: float
    cv_std: float
    cv_folds: int
    n_train: int

    @property
    def direction(self) -> np.ndarray:
        """Unit vector in raw hidden-state space along which the harmful logit grows."""
        scaler: StandardScaler = self.pipeline.named_steps["scaler"]
        clf: LogisticRegression = self.pipeline.named_steps["logreg"]
        w = clf.coef_[0] / scaler.scale_
        norm = float(np.linalg.norm(w))
        return w / norm if norm > 0 else w

    def harmful_probability(self, X: np.ndarray) -> np.ndarray:
        return self.pipeline.predict_proba(np.asarray(X))[:, list(self.pipeline.classes_).index(HARMFUL)]

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.pipeline.predict(np.asarray(X))

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> dict[str, float | int | None]:
        """Accuracy, AUROC and per-class recall of the probe on ``(X, y)``.

        ``harmful_recall`` is the share of harmful inputs the probe still flags: the figure that
        drops when images shift harmful prompts towards the benign side.
        """
        return classification_metrics(np.asarray(y), self.predict(X), self.harmful_probability(X))


def classification_metrics(y: np.ndarray, pred: np.ndarray, score: np.ndarray) -> dict[str, float | int | None]:
    y = np.asarray(y)
    harmful, benign = y == HARMFUL, y == BENIGN
    both = bool(harmful.any() and benign.any())
    return {
        "accuracy": float((pred == y).mean()) if len(y) else None,
        "auroc": float(roc_auc_score(y, score)) if both else None,
        "harmful_recall": float((pred[harmful] == HARMFUL).mean()) if harmful.any() else None,
        "benign_recall": float((pred[benign] == BENIGN).mean()) if benign.any() else None,
        "n": len(y),
    }


def make_pipeline(C: float = 1.0, *, seed: int = 0) -> Pipeline:
    """``StandardScaler`` + L2 logistic regression: the probe architecture."""
    return Pipeline([
        ("scaler", StandardScaler()),
        ("logreg", LogisticRegression(C=C, max_iter=5000, random_state=seed)),
    ])


def fit_probe(
    X: np.ndarray,
    y: np.ndarray,
    *,
    layer: int = -1,
    cv: int = 5,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
) -> LayerProbe:
    """Fit a probe on ``(X, y)``, choosing ``C`` by stratified ``cv``-fold cross-validation.

    The number of folds is capped by the size of the smaller class (at least 2 items per class
    are required). ``cv_accuracy`` is the mean validation accuracy at the chosen ``C``.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or len(X) != len(y):
        raise InputError(
            f"probe inputs must be (n, hidden) with one label per row; got X {X.shape} and {len(y)} labels"
        )
    check_binary(y)
    folds = int(min(cv, np.bincount(y, minlength=2).min()))
    if folds < 2:
        raise InputError(f"cross-validation needs at least 2 folds; got cv={cv}")
    search = GridSearchCV(
        make_pipeline(seed=seed),
        {"logreg__C": list(Cs)},
        cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
        scoring="accuracy",
        refit=True,
    )
    search.fit(X, y)
    best = search.best_index_
    return LayerProbe(
        layer=layer,
        pipeline=search.best_estimator_,
        C=float(search.best_params_["logreg__C"]),
        cv_accuracy=float(search.cv_results_["mean_test_score"][best]),
        cv_std=float(search.cv_results_["std_test_score"][best]),
        cv_folds=folds,
        n_train=len(y),
    )


def train_layer_probes(
    activations: Mapping[int, np.ndarray],
    y: np.ndarray,
    *,
    cv: int = 5,
    Cs: Sequence[float] = DEFAULT_CS,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, LayerProbe]:
    """One :func:`fit_probe` per layer of ``activations`` (``{layer: (n, hidden)}``)."""
    probes = {}
    for layer in tqdm(sorted(activations), desc="fitting probes", unit="layer", disable=not progress):
        probes[layer] = fit_probe(activations[layer], y, layer=layer, cv=cv, Cs=Cs, seed=seed)
    return probes
