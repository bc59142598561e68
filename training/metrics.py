"""Classification metrics (scikit-learn) and the Mayo STRIP AI weighted multi-class log loss."""

from __future__ import annotations

import math

import numpy as np
from sklearn import metrics as skm

EPS = 1e-15


def weighted_log_loss(y_true: np.ndarray, probs: np.ndarray) -> float:
    """STRIP AI's metric on ``probs[N, C]``: per-class mean of ``-log p`` over that class's samples, then
    the mean over classes (equal weights). Probabilities are clipped to ``[1e-15, 1 - 1e-15]`` and each row
    re-normalised to sum 1. Classes with no samples are left out of the mean.
    """
    p = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
    p = p / p.sum(axis=1, keepdims=True)
    y = np.asarray(y_true)
    per_class = [-np.log(p[y == c, c]).mean() for c in range(p.shape[1]) if np.any(y == c)]
    return float(np.mean(per_class))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, prefix: str = "") -> dict[str, float]:
    """Accuracy, macro precision/recall/F1, ROC-AUC (NaN when a class is absent) and weighted log loss."""
    y = np.asarray(y_true)
    p = np.asarray(probs, np.float64)
    pred = p.argmax(axis=1)
    labels = list(range(p.shape[1]))
    prec, rec, f1, _ = skm.precision_recall_fscore_support(y, pred, labels=labels, average="macro", zero_division=0)
    out = {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(prec),
        "recall": float(rec),
        "f1": float(f1),
        "weighted_log_loss": weighted_log_loss(y, p),
        "auc": math.nan,
    }
    if len(np.unique(y)) == p.shape[1]:
        if p.shape[1] == 2:
            out["auc"] = float(skm.roc_auc_score(y, p[:, 1]))
        else:
            out["auc"] = float(skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels))
    return {f"{prefix}{k}": v for k, v in out.items()}


def confusion(y_true: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Confusion matrix ``[C, C]`` (rows true, columns predicted) over all ``C`` classes."""
    labels = list(range(np.asarray(probs).shape[1]))
    return skm.confusion_matrix(np.asarray(y_true), np.asarray(probs).argmax(axis=1), labels=labels)
