"""Classification metrics (scikit-learn), the Mayo STRIP AI and RSNA hemorrhage competition log losses."""

from __future__ import annotations

import math
import re

import numpy as np
from sklearn import metrics as skm

EPS = 1e-15
# RSNA 2019: ``any`` weighs 2, each of the five subtypes 1.
RSNA_WEIGHTS = (2.0, 1.0, 1.0, 1.0, 1.0, 1.0)
# What a summary shows of a classifier's metrics at a level (the terminal's, each site's).
HEADLINE = ("accuracy", "f1", "auc", "weighted_log_loss", "rsna_log_loss", "brier_loss")


def metric_name(text: str) -> str:
    """A class or label name usable in an MLflow metric key."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def level_prefix(level: str, prefix: str = "") -> str:
    """The start of a metric's key at an aggregation ``level``: ``prefix`` alone at sample level, where the
    metrics were first named (``val_accuracy``), and ``<prefix><level>_`` at the others (``val_patient_accuracy``)."""
    return prefix if level == "sample" else f"{prefix}{level}_"


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


def label_weights(labels: int) -> tuple[float, ...]:
    """A multi-label loss's weight of each of ``labels``: RSNA's (2 for ``any``, 1 per subtype) for its six, else
    1 each."""
    return RSNA_WEIGHTS if labels == len(RSNA_WEIGHTS) else (1.0,) * labels


def rsna_log_loss(y_true: np.ndarray, probs: np.ndarray, weights: tuple[float, ...] = RSNA_WEIGHTS) -> float:
    """RSNA 2019's weighted multi-label log loss on ``probs[N, L]``: binary log loss per label, averaged with
    ``weights`` (2 for ``any``, 1 per subtype)."""
    y = np.asarray(y_true)
    p = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
    losses = [skm.log_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(p.shape[1])]
    return float(np.average(losses, weights=weights[: p.shape[1]]))


def predicted_classes(p: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """The class called for each row of ``p``: the argmax, or (binary, ``threshold``) class 1 at ``P >= threshold``."""
    if threshold is not None and p.shape[1] == 2:
        return (p[:, 1] >= threshold).astype(np.int64)
    return p.argmax(axis=1)


def rates(y_true: np.ndarray, pred: np.ndarray, labels: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sensitivity and specificity of each class (``labels``, one against the rest) or of each column of
    multi-label indicators, from scikit-learn's per-class confusion counts: NaN where the class's positives (or
    its negatives) are absent, so that a split without a class reports no rate for it rather than 0."""
    counts = skm.multilabel_confusion_matrix(y_true, pred, labels=labels).astype(np.float64)
    tn, fp, fn, tp = counts[:, 0, 0], counts[:, 0, 1], counts[:, 1, 0], counts[:, 1, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return tp / (tp + fn), tn / (tn + fp)


def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    prefix: str = "",
    classes: list[str] | None = None,
    threshold: float | None = None,
) -> dict[str, float]:
    """Accuracy, macro and per-class precision/recall/F1, each class's specificity (its other classes' samples
    not called it; NaN where there are none), ROC-AUC (NaN when a class is absent), weighted log loss, the Brier
    score (``brier_loss``: the mean squared distance of the probabilities from the one-hot label; of two classes,
    the positive's alone, as scikit-learn takes it).
    ``threshold`` (binary only) calls a sample positive when ``P(class 1) >= threshold``."""
    y = np.asarray(y_true)
    p = np.asarray(probs, np.float64)
    pred = predicted_classes(p, threshold)
    labels = list(range(p.shape[1]))
    # per class once; the macro scores are their unweighted means (scikit-learn's average="macro")
    per = skm.precision_recall_fscore_support(y, pred, labels=labels, average=None, zero_division=0)
    out = {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "precision": float(np.mean(per[0])),
        "recall": float(np.mean(per[1])),
        "f1": float(np.mean(per[2])),
        "weighted_log_loss": weighted_log_loss(y, p),
        # rows of float32 softmax sum to 1 within 1e-7, which scikit-learn warns of
        "brier_loss": float(skm.brier_score_loss(y, p / p.sum(axis=1, keepdims=True), labels=labels)),
        "auc": math.nan,
    }
    names = classes or [str(c) for c in labels]
    specificity = rates(y, pred, labels)[1]
    for c, name in enumerate(names):
        for metric, values in zip(("precision", "recall", "f1", "specificity"), (*per[:3], specificity), strict=True):
            out[f"{metric}_{metric_name(name)}"] = float(values[c])
    if len(np.unique(y)) == p.shape[1]:
        if p.shape[1] == 2:
            out["auc"] = float(skm.roc_auc_score(y, p[:, 1]))
        else:
            out["auc"] = float(skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels))
    return {f"{prefix}{k}": v for k, v in out.items()}


def multilabel_metrics(
    y_true: np.ndarray, probs: np.ndarray, names: list[str], prefix: str = "", threshold: float = 0.5
) -> dict[str, float]:
    """Per label: AUC (NaN when one value is absent), F1, accuracy, recall (sensitivity) and specificity at
    ``threshold`` (a rate NaN where the label's positives, or negatives, are absent); the macro means of AUC, F1
    and accuracy; RSNA's weighted log loss (``any`` first); the labels' mean Brier score (``brier_loss``)."""
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, np.float64)
    pred = (p >= threshold).astype(np.int64)
    out: dict[str, float] = {"rsna_log_loss": rsna_log_loss(y, p)}
    out["brier_loss"] = float(
        np.mean([skm.brier_score_loss(y[:, j], p[:, j], labels=[0, 1]) for j in range(p.shape[1])])
    )
    aucs, f1s, accs = [], [], []
    recall, specificity = rates(y, pred)
    for j, name in enumerate(names):
        auc = float(skm.roc_auc_score(y[:, j], p[:, j])) if len(np.unique(y[:, j])) == 2 else math.nan
        f1 = float(skm.f1_score(y[:, j], pred[:, j], zero_division=0))
        acc = float(skm.accuracy_score(y[:, j], pred[:, j]))
        key = metric_name(name)
        out |= {f"auc_{key}": auc, f"f1_{key}": f1, f"accuracy_{key}": acc}
        out |= {f"recall_{key}": float(recall[j]), f"specificity_{key}": float(specificity[j])}
        aucs.append(auc)
        f1s.append(f1)
        accs.append(acc)
    present = [a for a in aucs if not math.isnan(a)]
    out |= {"auc": float(np.mean(present)) if present else math.nan, "f1": float(np.mean(f1s))}
    out["accuracy"] = float(np.mean(accs))
    return {f"{prefix}{k}": v for k, v in out.items()}


def confusion(y_true: np.ndarray, probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Confusion matrix ``[C, C]`` (rows true, columns predicted) over all ``C`` classes."""
    p = np.asarray(probs)
    labels = list(range(p.shape[1]))
    return skm.confusion_matrix(np.asarray(y_true), predicted_classes(p, threshold), labels=labels)
