"""From tile (or slice) predictions to slide, patient or series predictions (pure)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np

How = Literal["mean", "max", "any"]


def _group_label(labels: np.ndarray, gid: str, how: How) -> np.ndarray:
    if labels.ndim == 2:  # multi-label: a series has a finding when any slice has it
        return labels.max(axis=0)
    values = np.unique(labels)
    if how == "any":  # positive when any member is: a series with one bleeding slice bleeds
        return values.max()
    if len(values) != 1:
        raise ValueError(
            f"group {gid!r} mixes labels {values.tolist()}: aggregating by {how!r} needs one label per group "
            "(eval.how=any makes a negative/positive group positive when any member is)"
        )
    return values[0]


def mixed_groups(pairs: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    """The groups among ``(group, label)`` pairs whose members carry different labels: ``{group: labels}``."""
    seen: dict[str, set[int]] = {}
    for group, label in pairs:
        seen.setdefault(group, set()).add(label)
    return {g: sorted(labels) for g, labels in sorted(seen.items()) if len(labels) > 1}


def _group_probs(member: np.ndarray, how: How, multilabel: bool) -> np.ndarray:
    if how == "mean":
        return member.mean(axis=0)
    if how == "max":
        m = member.max(axis=0)
        return m if multilabel else m / m.sum()
    if how == "any":
        if member.shape[1] != 2:
            raise ValueError("'any' aggregation needs two classes (negative, positive)")
        top = member[:, 1].max()
        return np.array([1.0 - top, top])
    raise ValueError(f"unknown aggregation {how!r}")


def aggregate(
    probs: np.ndarray, labels: np.ndarray, groups: list[str], how: How = "mean"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Group ``probs[N, C]`` by ``groups``; returns ``(group ids, probs[G, C], labels[G] or [G, L])``.

    ``mean`` averages class probabilities (STRIP AI's slide-level submission); ``max`` takes each class's
    maximum (renormalised for multi-class); ``any`` makes ``P(positive)`` the largest member's, so that a
    threshold on it calls a group positive when any member is (paper 002's image model per series).
    A multi-class group's label is its members' label (mixed labels raise ``ValueError``), except under ``any``,
    where a group is positive when any member is; a multi-label group's label is the element-wise maximum.
    """
    if len(labels) != len(probs):
        raise ValueError(f"probs and labels must have the same length ({len(probs)} and {len(labels)})")
    labels = np.asarray(labels)
    ids, out = aggregate_probs(probs, groups, how, labels.ndim == 2)
    index = {gid: i for i, gid in enumerate(ids)}
    g = np.array([index[x] for x in groups])
    out_labels = np.zeros((len(ids), *labels.shape[1:]), dtype=np.int64)
    for i, gid in enumerate(ids):
        out_labels[i] = _group_label(labels[g == i], gid, how)
    return ids, out, out_labels


def aggregate_probs(
    probs: np.ndarray, groups: list[str], how: How = "mean", multilabel: bool = False
) -> tuple[list[str], np.ndarray]:
    """:func:`aggregate`'s ``(group ids, probs[G, C])`` alone: groups of samples that have no labels."""
    if len(groups) != len(probs):
        raise ValueError(f"probs and groups must have the same length ({len(probs)} and {len(groups)})")
    ids = sorted(set(groups))
    index = {g: i for i, g in enumerate(ids)}
    g = np.array([index[x] for x in groups])
    out = np.zeros((len(ids), probs.shape[1]))
    for i in range(len(ids)):
        out[i] = _group_probs(probs[g == i], how, multilabel)
    return ids, out


def any_positive(probs: np.ndarray, groups: list[str], threshold: float = 0.5) -> dict[str, bool]:
    """Series-level call of paper 002's image model: positive if any member's P(positive) >= threshold."""
    out: dict[str, bool] = {}
    for p, grp in zip(probs[:, 1], groups, strict=True):
        out[grp] = out.get(grp, False) or bool(p >= threshold)
    return out
