"""A classifier's metrics at sample level and after aggregation to each of the recipe's levels (slide, patient,
series), or a detector's: what training's validation and the held-out evaluation report."""

from __future__ import annotations

import csv
import io
import math
from functools import partial
from typing import Any

from training.aggregate import aggregate, aggregate_probs
from training.config import TrainRecipe
from training.metas import values
from training.metrics import HEADLINE, classification_metrics, multilabel_metrics, predicted_classes


def by_level(pred: dict[str, Any], recipe: TrainRecipe):
    """``(level, group ids, probs[G, C], labels[G])`` for each recipe level that every sample's metadata names
    (labels None where ``pred["labels"]`` is: samples without labels)."""
    how = recipe.eval.how if recipe.task == "multiclass" else "max"
    for level in recipe.eval.levels:
        groups = values(pred["metas"], level)
        if groups and all(g is not None for g in groups):
            if pred["labels"] is None:
                yield level, *aggregate_probs(pred["probs"], groups, how, recipe.task == "multilabel"), None
            else:
                yield level, *aggregate(pred["probs"], pred["labels"], groups, how)


def level_threshold(recipe: TrainRecipe, level: str) -> float | None:
    """The positive-call threshold of a multi-class ``level``: only groups aggregated by ``any`` use one
    (samples and other aggregations take the argmax)."""
    return recipe.eval.threshold if recipe.eval.how == "any" and level != "sample" else None


def evaluate(pred: dict[str, Any], recipe: TrainRecipe, outputs: list[str], prefix: str = "val_") -> dict[str, float]:
    """Sample-level metrics plus the same metrics after aggregation to each of the recipe's levels; a detector's
    boxes by :func:`training.detection.metrics`."""
    if recipe.task == "detect":
        from training.detection import metrics as box_metrics

        return box_metrics(pred, outputs, recipe.eval.threshold, prefix)

    def metrics(y, p, level):
        pre = prefix if level == "sample" else f"{prefix}{level}_"
        if recipe.task == "multilabel":
            return multilabel_metrics(y, p, outputs, pre, recipe.eval.threshold)
        return classification_metrics(y, p, pre, outputs, level_threshold(recipe, level))

    out = {f"{prefix}loss": pred["loss"]} | metrics(pred["labels"], pred["probs"], "sample")
    for level, _, gp, gy in by_level(pred, recipe):
        out |= metrics(gy, gp, level)
    return out


def with_interval(metric: str) -> bool:
    """Whether a held-out metric (unprefixed) gets a confidence interval: the headline ones, and each class's or
    label's sensitivity, specificity and AUC."""
    return metric in HEADLINE or metric.startswith(("recall_", "specificity_", "auc_"))


INTERVAL_COLUMNS = (
    *("level", "metric", "value", "ci_low", "ci_high", "confidence", "resamples", "defined"),
    *("units", "clusters", "resampled"),
)


def intervals(pred: dict[str, Any], recipe: TrainRecipe, outputs: list[str], prefix: str) -> tuple[dict, str]:
    """Confidence intervals of a classifier's held-out metrics at sample level and at each of the recipe's levels
    (:func:`training.intervals.bootstrap`: ``eval.bootstrap`` resamples of the split's patients, at
    ``eval.confidence``): as MLflow metrics (``<metric>_ci_low``, ``<metric>_ci_high``) and as a CSV table
    (:data:`INTERVAL_COLUMNS`). Empty for a detector, samples without labels or ``eval.bootstrap: 0``."""
    from training.intervals import bootstrap, clusters_of

    if recipe.task == "detect" or not recipe.eval.bootstrap or pred["labels"] is None:
        return {}, ""
    patients = values(pred["metas"], "patient")
    units = [("sample", patients, pred["probs"], pred["labels"])]
    for level, ids, p, y in by_level(pred, recipe):
        patient_of: dict[Any, Any] = {}
        for group, patient in zip(values(pred["metas"], level), patients, strict=True):
            patient_of.setdefault(group, patient)
        units.append((level, [patient_of[i] for i in ids], p, y))
    rows, out = [], {}
    for level, keys, p, y in units:
        clusters = clusters_of(keys)
        if recipe.task == "multilabel":
            stat = partial(_of_labels, y, p, outputs, recipe.eval.threshold)
        else:
            stat = partial(_of_classes, y, p, outputs, predicted_classes(p, level_threshold(recipe, level)))
        resampled = "patients" if any(k is not None for k in keys) else f"{level}s"
        found = bootstrap(stat, clusters, with_interval, recipe.eval.bootstrap, recipe.eval.confidence, recipe.seed)
        pre = prefix if level == "sample" else f"{prefix}{level}_"
        how = [recipe.eval.confidence, recipe.eval.bootstrap]
        for iv in found:
            out |= {f"{pre}{iv.metric}_ci_low": iv.low, f"{pre}{iv.metric}_ci_high": iv.high}
            counts = [iv.defined, len(y), len(set(clusters.tolist())), resampled]
            rows.append([level, iv.metric, iv.value, iv.low, iv.high, *how, *counts])
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(INTERVAL_COLUMNS)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return out, table.getvalue()


def _of_classes(y, p, outputs, calls, idx):
    from training.intervals import class_statistic

    return class_statistic(y[idx], p[idx], outputs, calls[idx])


def _of_labels(y, p, outputs, threshold, idx):
    from training.intervals import label_statistic

    return label_statistic(y[idx], p[idx], outputs, threshold)
