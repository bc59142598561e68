"""From tile (or slice) predictions to slide, patient or series predictions (pure)."""

from __future__ import annotations

from typing import Literal

import numpy as np


def aggregate(
    probs: np.ndarray, labels: np.ndarray, groups: list[str], how: Literal["mean", "max"] = "mean"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Group ``probs[N, C]`` by ``groups``; returns ``(group ids, probs[G, C], labels[G])``.

    ``mean`` averages class probabilities (STRIP AI's slide-level submission); ``max`` takes each class's
    maximum and renormalises. A group's label is its members' label; mixed labels raise ``ValueError``.
    """
    if len(groups) != len(probs) or len(labels) != len(probs):
        raise ValueError("probs, labels and groups must have the same length")
    ids = sorted(set(groups))
    index = {g: i for i, g in enumerate(ids)}
    g = np.array([index[x] for x in groups])
    out = np.zeros((len(ids), probs.shape[1]))
    out_labels = np.zeros(len(ids), dtype=np.int64)
    for i in range(len(ids)):
        member = probs[g == i]
        member_labels = np.unique(labels[g == i])
        if len(member_labels) != 1:
            raise ValueError(f"group {ids[i]!r} mixes labels {member_labels.tolist()}")
        out_labels[i] = member_labels[0]
        if how == "mean":
            out[i] = member.mean(axis=0)
        elif how == "max":
            m = member.max(axis=0)
            out[i] = m / m.sum()
        else:
            raise ValueError(f"unknown aggregation {how!r}")
    return ids, out, out_labels


def any_positive(probs: np.ndarray, groups: list[str], threshold: float = 0.5) -> dict[str, bool]:
    """Series-level call of paper 002's image model: positive if any member's P(positive) >= threshold."""
    out: dict[str, bool] = {}
    for p, grp in zip(probs[:, 1], groups, strict=True):
        out[grp] = out.get(grp, False) or bool(p >= threshold)
    return out
