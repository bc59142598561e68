"""Prediction tables: one row per sample or per slide/patient/series, for reading a model's errors one by one."""

from __future__ import annotations

import csv
import io
from typing import Any

import numpy as np

from training.metrics import metric_name, predicted_classes

# What names a sample in its metadata (pseudonyms and coordinates, never a source path).
IDENTITY = ("patient", "slide", "series", "image", "x", "y", "slices")


def sample_columns(metas: list[dict[str, Any]]) -> dict[str, list]:
    """The identifying metadata fields (:data:`IDENTITY`) that every sample has, as columns."""
    keys = [k for k in IDENTITY if metas and all(m.get(k) is not None for m in metas)]
    return {k: [" ".join(map(str, m[k])) if isinstance(m[k], list) else m[k] for m in metas] for k in keys}


def prediction_table(
    columns: dict[str, list],
    probs: np.ndarray,
    labels: np.ndarray,
    outputs: list[str],
    multilabel: bool,
    threshold: float | None = None,
) -> str:
    """CSV: the ``columns``, then the true label, the call (multi-class: the class; multi-label: 0/1 per label at
    ``threshold``) and a probability per output."""
    names = [metric_name(o) for o in outputs]
    if multilabel:
        cut = 0.5 if threshold is None else threshold
        header = [f"label_{n}" for n in names] + [f"predicted_{n}" for n in names]
        calls = [list(map(int, y)) + list(map(int, p >= cut)) for y, p in zip(labels, probs, strict=True)]
    else:
        header = ["label", "predicted"]
        calls = [[outputs[y], outputs[c]] for y, c in zip(labels, predicted_classes(probs, threshold), strict=True)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, *header, *(f"p_{n}" for n in names)])
    for i, (call, p) in enumerate(zip(calls, probs, strict=True)):
        writer.writerow([*(c[i] for c in columns.values()), *call, *(f"{v:.6g}" for v in p)])
    return out.getvalue()
