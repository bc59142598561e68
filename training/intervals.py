"""Confidence intervals of held-out metrics: a percentile bootstrap that resamples patients, not samples.

A test split's tiles, slices and slides are not independent: a patient's samples share a specimen, a scanner and a
label. Resampling samples as if they were independent makes an interval far too narrow (a cohort of 30 patients
with 3,000 tiles looks like 3,000 observations). Each resample here draws the split's patients (its clusters) with
replacement and takes every sample of each drawn patient, as often as it is drawn (the cluster bootstrap); at the
patient level that is the plain bootstrap of patients. Where samples name no patient, each sample is its own.

A resample is a weight per sample (how often its patient was drawn), and the metrics are weighted sums over the
samples sorted once: a resample of 75,000 slices costs a few passes over arrays, not a sort and scikit-learn's
checks (4 ms a call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# the least share of resamples in which a metric must be defined (an AUC needs both classes in its resample) for
# its interval to be given: fewer, and the interval would describe only the resamples that happened to hold them.
# A class of k of n patients is absent from a resample with probability (1 - k/n)^n, about e^-k: a class of one
# patient is absent from 37 % of them, of two from 14 %, of three from 5 %, so a class needs three patients.
LEAST_DEFINED = 0.9
# the names of a metric's bounds, after its own (``test_patient_auc_ci_low``)
BOUNDS = ("_ci_low", "_ci_high")


@dataclass(frozen=True)
class Interval:
    """A metric's value on the split, and its interval from the resamples in which it was defined."""

    metric: str
    value: float
    low: float
    high: float
    defined: int  # resamples in which the metric was defined (not NaN)


def clusters_of(keys: Sequence[object | None]) -> np.ndarray:
    """Each unit's cluster as an integer code: units of one key share one; a unit without a key (None) is its own."""
    codes: dict[object, int] = {}
    out = np.empty(len(keys), np.int64)
    for i, key in enumerate(keys):
        out[i] = codes.setdefault(("key", key) if key is not None else ("unit", i), len(codes))
    return out


def resamples(clusters: np.ndarray, count: int, seed: int):
    """``count`` resamples of the units' clusters, each of as many clusters as there are, drawn with
    replacement: each as a weight per unit, how often its cluster was drawn."""
    _, codes = np.unique(clusters, return_inverse=True)
    k = int(codes.max()) + 1 if len(codes) else 0
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield np.bincount(rng.integers(0, k, k), minlength=k)[codes].astype(np.float64)


def bootstrap(
    statistic: Callable[[np.ndarray], dict[str, float]],
    clusters: np.ndarray,
    keep: Callable[[str], bool],
    count: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[Interval]:
    """Percentile intervals of the metrics of ``statistic`` (of a weight per unit: every unit once, then each
    resample of :func:`resamples`) that ``keep`` names. A metric NaN on the whole split, or defined in fewer than
    :data:`LEAST_DEFINED` of the resamples, gets NaN bounds."""
    value = statistic(np.ones(len(clusters)))
    wanted = [m for m in value if keep(m)]
    drawn = np.array([[d.get(m, math.nan) for m in wanted] for d in map(statistic, resamples(clusters, count, seed))])
    drawn = drawn.reshape(count, len(wanted))
    tail = (1 - confidence) / 2 * 100
    out = []
    for j, metric in enumerate(wanted):
        ok = drawn[:, j][~np.isnan(drawn[:, j])]
        low = high = math.nan
        if not math.isnan(value[metric]) and len(ok) >= LEAST_DEFINED * count and len(ok):
            low, high = (float(v) for v in np.percentile(ok, [tail, 100 - tail]))
        out.append(Interval(metric, float(value[metric]), low, high, len(ok)))
    return out


class Ranked:
    """One score column sorted once, with its ties grouped: its ROC AUC under any weighting of the samples, as
    the Mann-Whitney statistic (a tie counts half, as scikit-learn's trapezoids do)."""

    def __init__(self, positive: np.ndarray, scores: np.ndarray) -> None:
        self.order = np.argsort(scores, kind="stable")
        ordered = np.asarray(scores)[self.order]
        self.starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(ordered) else np.array([0])
        self.positive = np.asarray(positive, bool)[self.order]

    def auc(self, weights: np.ndarray) -> float:
        """NaN where the weighted samples hold no positive or no negative."""
        w = weights[self.order]
        pos = np.add.reduceat(np.where(self.positive, w, 0.0), self.starts) if len(w) else np.zeros(1)
        neg = np.add.reduceat(np.where(self.positive, 0.0, w), self.starts) if len(w) else np.zeros(1)
        total_pos, total_neg = pos.sum(), neg.sum()
        if not total_pos or not total_neg:
            return math.nan
        below = np.cumsum(neg) - neg
        return float(np.sum(pos * (below + 0.5 * neg)) / (total_pos * total_neg))


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def class_statistic(
    y: np.ndarray, p: np.ndarray, names: list[str], calls: np.ndarray
) -> Callable[[np.ndarray], dict[str, float]]:
    """``statistic(weights)``: what :func:`training.metrics.classification_metrics` reports that gets an interval
    (accuracy, macro F1, AUC, the weighted log loss, the Brier score, each class's recall and specificity) of the
    samples weighted so, from the class ``calls`` made of ``p``. A class without samples has no recall (NaN),
    where scikit-learn counts 0. Tested equal to it on resamples."""
    from training.metrics import EPS, metric_name

    y = np.asarray(y)
    c = p.shape[1]
    cells = y * c + np.asarray(calls)
    q = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    q = q / q.sum(axis=1, keepdims=True)
    nll = -np.log(q[np.arange(len(y)), y])  # STRIP AI's loss of each sample, its class's
    unit = np.asarray(p, np.float64) / np.asarray(p, np.float64).sum(axis=1, keepdims=True)
    squares = np.sum((unit - np.eye(c)[y]) ** 2, axis=1) / (2 if c == 2 else 1)  # scikit-learn's Brier scaling
    ranked = [Ranked(y == 1, p[:, 1])] if c == 2 else [Ranked(y == k, p[:, k]) for k in range(c)]
    keys = [(f"recall_{metric_name(n)}", f"specificity_{metric_name(n)}") for n in names]

    def statistic(w: np.ndarray) -> dict[str, float]:
        total = w.sum()
        counts = np.bincount(cells, weights=w, minlength=c * c).reshape(c, c)
        tp, true, called = np.diag(counts), counts.sum(1), counts.sum(0)
        fn, fp = true - tp, called - tp
        tn = total - tp - fn - fp
        per_class = _ratio(np.bincount(y, weights=w * nll, minlength=c), true, math.nan)
        out = {
            "accuracy": float(tp.sum() / total),
            "f1": float(_ratio(2 * tp, 2 * tp + fp + fn, 0.0).mean()),
            "weighted_log_loss": float(np.nanmean(per_class)),
            "brier_loss": float(np.dot(w, squares) / total),
            "auc": math.nan,
        }
        if (true > 0).all():
            out["auc"] = float(np.mean([r.auc(w) for r in ranked]))
        recall, specificity = _ratio(tp, tp + fn, math.nan), _ratio(tn, tn + fp, math.nan)
        for k, (r, s) in enumerate(keys):
            out |= {r: float(recall[k]), s: float(specificity[k])}
        return out

    return statistic


def label_statistic(
    y: np.ndarray, p: np.ndarray, names: list[str], threshold: float, called: np.ndarray | None = None
) -> Callable[[np.ndarray], dict[str, float]]:
    """``statistic(weights)``: what :func:`training.metrics.multilabel_metrics` reports that gets an interval
    (RSNA's weighted log loss, the Brier score, the macro AUC, F1 and accuracy, each label's AUC, recall and
    specificity), as :func:`class_statistic`; the calls ``p >= threshold``, or ``called`` (0/1 per label)."""
    from training.metrics import EPS, RSNA_WEIGHTS, metric_name

    y = np.asarray(y)
    labels = y.shape[1]
    q = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    bce = -(y * np.log(q) + (1 - y) * np.log(1 - q))
    squares = np.sum((np.asarray(p, np.float64) - y) ** 2, axis=1) / labels
    positive = (y == 1).astype(np.float64)
    called = (p >= threshold if called is None else np.asarray(called) == 1).astype(np.float64)
    hits = positive * called
    ranked = [Ranked(y[:, j] == 1, p[:, j]) for j in range(labels)]
    keys = [metric_name(n) for n in names]

    def statistic(w: np.ndarray) -> dict[str, float]:
        total = w.sum()
        out = {"rsna_log_loss": float(np.average(w @ bce / total, weights=RSNA_WEIGHTS[:labels]))}
        out["brier_loss"] = float(np.dot(w, squares) / total)
        tp, pos, call = w @ hits, w @ positive, w @ called
        fp, fn = call - tp, pos - tp
        tn = total - tp - fp - fn
        aucs = [r.auc(w) for r in ranked]
        f1, accuracy = _ratio(2 * tp, 2 * tp + fp + fn, 0.0), (tp + tn) / total
        recall, specificity = _ratio(tp, tp + fn, math.nan), _ratio(tn, tn + fp, math.nan)
        for j, key in enumerate(keys):
            out |= {
                f"auc_{key}": aucs[j],
                f"recall_{key}": float(recall[j]),
                f"specificity_{key}": float(specificity[j]),
            }
        present = [a for a in aucs if not math.isnan(a)]
        out |= {"auc": float(np.mean(present)) if present else math.nan, "f1": float(f1.mean())}
        out["accuracy"] = float(accuracy.mean())
        return out

    return statistic


def exact(successes: int, trials: int, confidence: float) -> tuple[float, float]:
    """The Clopper-Pearson interval of a proportion (scipy's exact binomial), NaN of no trials. Where each unit
    is its own patient it replaces the bootstrap's for a proportion: a bootstrap of 10 patients all called right
    gives [1, 1], Clopper-Pearson [0.69, 1], as a diagnostic accuracy study reports it."""
    from scipy.stats import binomtest

    if not trials:
        return math.nan, math.nan
    found = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=confidence, method="exact")
    return float(found.low), float(found.high)


def proportions(y: np.ndarray, calls: np.ndarray, names: list[str]) -> dict[str, tuple[int, int]]:
    """``(successes, trials)`` of the proportions among the statistics' metrics, from scikit-learn's one-vs-rest
    confusion counts: each class's (or label's: ``y`` and ``calls`` 0/1 per label) recall (its samples called
    it) and specificity (the others not called it), and a multi-class accuracy (a multi-label one is a mean of
    the labels', not one proportion)."""
    from sklearn.metrics import multilabel_confusion_matrix

    from training.metrics import metric_name

    y, calls = np.asarray(y), np.asarray(calls)
    multilabel = y.ndim == 2
    counts = multilabel_confusion_matrix(y, calls, labels=None if multilabel else list(range(len(names))))
    out = {} if multilabel else {"accuracy": (int(np.sum(y == calls)), len(y))}
    for name, ((tn, fp), (fn, tp)) in zip(names, counts.tolist(), strict=True):
        out[f"recall_{metric_name(name)}"] = (tp, tp + fn)
        out[f"specificity_{metric_name(name)}"] = (tn, tn + fp)
    return out
