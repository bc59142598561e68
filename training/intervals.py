"""Confidence intervals of held-out metrics: a percentile bootstrap that resamples patients, not samples.

A test split's tiles, slices and slides are not independent: a patient's samples share a specimen, a scanner and a
label. Resampling samples as if they were independent makes an interval far too narrow (a cohort of 30 patients
with 3,000 tiles looks like 3,000 observations). Each resample here draws the split's patients (its clusters) with
replacement and takes every sample of each drawn patient, as often as it is drawn (the cluster bootstrap); at the
patient level that is the plain bootstrap of patients. Where samples name no patient, each sample is its own.
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
    """``count`` index arrays into the units, each of as many clusters as there are, drawn with replacement,
    every unit of a drawn cluster taken each time it is drawn."""
    order = np.argsort(clusters, kind="stable")
    _, starts, sizes = np.unique(clusters[order], return_index=True, return_counts=True)
    rng = np.random.default_rng(seed)
    k = len(starts)
    for _ in range(count):
        drawn = rng.integers(0, k, k)
        # the positions of each drawn cluster's units in ``order``: its start plus 0..size-1
        lengths = sizes[drawn]
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        yield order[np.repeat(starts[drawn], lengths) + offsets]


def bootstrap(
    statistic: Callable[[np.ndarray], dict[str, float]],
    clusters: np.ndarray,
    keep: Callable[[str], bool],
    count: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[Interval]:
    """Percentile intervals of the metrics of ``statistic`` (of an index array into the units: every unit, then
    each resample of :func:`resamples`) that ``keep`` names. A metric NaN on the whole split, or defined in fewer
    than :data:`LEAST_DEFINED` of the resamples, gets NaN bounds."""
    value = statistic(np.arange(len(clusters)))
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


def _auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive`` (the Mann-Whitney statistic over average ranks, which
    counts a tie as half, as scikit-learn's trapezoids do); NaN where one of the two is absent."""
    from scipy.stats import rankdata

    pos = int(positive.sum())
    neg = len(positive) - pos
    if not pos or not neg:
        return math.nan
    return float((rankdata(scores)[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _brier(p: np.ndarray, onehot: np.ndarray) -> float:
    """The mean over rows of the summed squared differences (scikit-learn's Brier score before its scaling)."""
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def _ratio(num: np.ndarray, den: np.ndarray, empty: float) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), empty)


def class_statistic(y: np.ndarray, p: np.ndarray, names: list[str], calls: np.ndarray) -> dict[str, float]:
    """What :func:`training.metrics.classification_metrics` reports that gets an interval (accuracy, macro F1,
    AUC, the weighted log loss, the Brier score, each class's recall and specificity), from the class ``calls``
    made of ``p``, computed from confusion counts: scikit-learn's checks cost 4 ms a call, 12 s for a thousand
    resamples at three levels. A class without samples has no recall (NaN), where scikit-learn counts 0. Tested
    equal to it."""
    from training.metrics import metric_name, weighted_log_loss

    c = p.shape[1]
    counts = np.bincount(y * c + calls, minlength=c * c).reshape(c, c).astype(np.float64)
    tp, true, called = np.diag(counts), counts.sum(1), counts.sum(0)
    fn, fp = true - tp, called - tp
    tn = len(y) - tp - fn - fp
    out = {
        "accuracy": float(tp.sum() / len(y)),
        "f1": float(_ratio(2 * tp, 2 * tp + fp + fn, 0.0).mean()),
        "weighted_log_loss": weighted_log_loss(y, p),
        "brier_loss": _brier(p / p.sum(axis=1, keepdims=True), np.eye(c)[y]) / (2 if c == 2 else 1),
        "auc": math.nan,
    }
    if (true > 0).all():
        out["auc"] = _auc(y == 1, p[:, 1]) if c == 2 else float(np.mean([_auc(y == k, p[:, k]) for k in range(c)]))
    recall, specificity = _ratio(tp, tp + fn, math.nan), _ratio(tn, tn + fp, math.nan)
    for k, name in enumerate(names):
        out |= {
            f"recall_{metric_name(name)}": float(recall[k]),
            f"specificity_{metric_name(name)}": float(specificity[k]),
        }
    return out


def label_statistic(y: np.ndarray, p: np.ndarray, names: list[str], threshold: float) -> dict[str, float]:
    """What :func:`training.metrics.multilabel_metrics` reports that gets an interval (RSNA's weighted log loss,
    the Brier score, the macro AUC, F1 and accuracy, each label's AUC, recall and specificity), as
    :func:`class_statistic` does."""
    from training.metrics import EPS, RSNA_WEIGHTS, metric_name

    q = np.clip(p, EPS, 1 - EPS)
    losses = -(y * np.log(q) + (1 - y) * np.log(1 - q)).mean(axis=0)
    out: dict[str, float] = {"rsna_log_loss": float(np.average(losses, weights=RSNA_WEIGHTS[: p.shape[1]]))}
    out["brier_loss"] = _brier(p, y) / p.shape[1]
    called = p >= threshold
    tp = (called & (y == 1)).sum(0).astype(np.float64)
    fp, fn = called.sum(0) - tp, (y == 1).sum(0) - tp
    tn = len(y) - tp - fp - fn
    aucs = [_auc(y[:, j] == 1, p[:, j]) for j in range(p.shape[1])]
    f1, accuracy = _ratio(2 * tp, 2 * tp + fp + fn, 0.0), (tp + tn) / len(y)
    recall, specificity = _ratio(tp, tp + fn, math.nan), _ratio(tn, tn + fp, math.nan)
    for j, name in enumerate(names):
        key = metric_name(name)
        out |= {f"auc_{key}": aucs[j], f"recall_{key}": float(recall[j]), f"specificity_{key}": float(specificity[j])}
    present = [a for a in aucs if not math.isnan(a)]
    out |= {"auc": float(np.mean(present)) if present else math.nan, "f1": float(f1.mean())}
    out["accuracy"] = float(accuracy.mean())
    return out
