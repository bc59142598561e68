"""Losses: cross-entropy (optionally class-weighted) and the RSNA-weighted multi-label BCE."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from training.metrics import label_weights


def balanced_weights(counts: list[int]) -> list[float]:
    """``n / (C * n_c)`` per class (scikit-learn's ``balanced``); an absent class weighs 0."""
    n, c = sum(counts), len(counts)
    return [n / (c * k) if k else 0.0 for k in counts]


def class_counts(inputs, split: str, num_classes: int) -> list[int]:
    """Samples per class in ``split`` (``a+b`` for several) from the manifest's input records."""
    from shards.manifest import split_names

    names = set(split_names(split))
    counts = [0] * num_classes
    for rec in inputs:
        if rec.split in names and rec.label is not None and rec.status == "ingested":
            counts[rec.label] += rec.samples
    return counts


class Loss:
    """``loss(logits, labels)``: softmax CE for multi-class, weighted BCE-with-logits for multi-label."""

    def __init__(self, multilabel: bool, class_weights: list[float] | None = None, outputs: int = 0) -> None:
        self.multilabel = multilabel
        self.weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        if multilabel:
            self.weights = torch.tensor(label_weights(outputs), dtype=torch.float32)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, class_weighted: bool = True) -> torch.Tensor:
        """Mean loss of the batch. ``class_weighted=False`` (validation) leaves class weights out, so the
        validation loss stays comparable across recipes; the multi-label weights are the metric's own."""
        w = None if self.weights is None else self.weights.to(logits.device)
        if self.multilabel:
            per = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
            return (per * w).sum(1).mean() / w.sum()
        return F.cross_entropy(logits.float(), labels, weight=w if class_weighted else None)

    def probabilities(self, logits: torch.Tensor) -> np.ndarray:
        """Sigmoid per label, or softmax over classes."""
        f = torch.sigmoid if self.multilabel else lambda t: torch.softmax(t, 1)
        return f(logits.float()).cpu().numpy()
