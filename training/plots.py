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
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
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
