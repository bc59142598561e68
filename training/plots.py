"""Pictures a person would rather look at: confusion matrices and learning curves (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def confusion_png(cm: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Write a confusion matrix (rows true, columns predicted) with counts in each cell."""
    fig, ax = plt.subplots(figsize=(3.2 + 0.5 * len(classes), 3.0 + 0.5 * len(classes)), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = cm.max() if cm.size else 0
    for (i, j), v in np.ndenumerate(cm):
        text = str(v) if float(v).is_integer() else f"{v:.3g}"  # counts, or means over replicates
        ax.text(j, i, text, ha="center", va="center", color="white" if v > top / 2 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def curves_png(history: list[dict[str, float]], keys: list[str], path: Path, title: str) -> Path:
    """Plot ``keys`` of per-epoch ``history`` rows against the epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    epochs = [h["epoch"] for h in history]
    for k in keys:
        ax.plot(epochs, [h.get(k, np.nan) for h in history], marker="o", label=k)
    ax.set_xlabel("epoch")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def roc_png(y: np.ndarray, probs: np.ndarray, names: list[str], task: str, path: Path, title: str) -> Path:
    """ROC curves: the positive class (binary), one-vs-rest per class, or one per label (multi-label)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=120)
    for name, truth, score in _curves(y, probs, names, task):
        if len(np.unique(truth)) < 2:
            continue
        fpr, tpr, _ = roc_curve(truth, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(truth, score):.3f})")
    return _on_diagonal(fig, ax, ("false positive rate", "true positive rate"), title, path, "lower right")


def _on_diagonal(fig, ax, axes: tuple[str, str], title: str, path: Path, legend: str) -> Path:
    """A plot of curves against the diagonal (chance, or perfect calibration), titled, saved to ``path``."""
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc=legend)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _curves(y: np.ndarray, probs: np.ndarray, names: list[str], task: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, truth, score)``: the positive class (binary), each class against the rest, or each label."""
    if task == "multilabel":
        return [(names[j], y[:, j] == 1, probs[:, j]) for j in range(len(names))]
    if probs.shape[1] == 2:
        return [(names[1], y == 1, probs[:, 1])]
    return [(names[c], y == c, probs[:, c]) for c in range(len(names))]


def calibration_png(y: np.ndarray, probs: np.ndarray, names: list[str], task: str, path: Path, title: str) -> Path:
    """Reliability diagram (scikit-learn's calibration curve, 10 bins of equal width; each point at its bin's
    mean predicted probability and its observed frequency of positives) for the curves of :func:`roc_png`, with
    each one's Brier score: a model whose probabilities are read as risks should lie on the diagonal."""
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import brier_score_loss

    fig, ax = plt.subplots(figsize=(4.2, 4.0), dpi=120)
    for name, truth, score in _curves(y, probs, names, task):
        if len(np.unique(truth)) < 2:
            continue
        observed, predicted = calibration_curve(truth, score, n_bins=10)
        ax.plot(predicted, observed, marker="o", ms=3, label=f"{name} (Brier {brier_score_loss(truth, score):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    return _on_diagonal(fig, ax, ("mean predicted probability", "observed frequency"), title, path, "upper left")


# The learning-curve PNGs of a run: each file's title and the per-epoch metrics it plots, those the run has.
CURVES = {
    "curve_loss.png": ("loss", ["train_loss", "val_loss", "val_swa_loss"]),
    "curve_accuracy.png": ("accuracy", ["train_accuracy", "val_accuracy", "val_patient_accuracy"]),
    "curve_log_loss.png": ("log loss", ["val_weighted_log_loss", "val_patient_weighted_log_loss", "val_rsna_log_loss"]),
    "curve_lr.png": ("learning rate", ["lr"]),
}


def log_curves(logger, history: list[dict[str, float]]) -> None:
    """The learning curves of ``history`` (per-epoch metric rows) into the run of ``logger`` (a RunLogger)."""
    import tempfile

    if not history:
        return
    keys = set().union(*history)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (title, wanted) in CURVES.items():
            present = [k for k in wanted if k in keys]
            if present:
                logger.artifact(curves_png(history, present, Path(tmp) / name, title))
