"""A classifier's metrics at sample level and after aggregation to each of the recipe's levels (slide, patient,
series), or a detector's: what training's validation and the held-out evaluation report."""

from __future__ import annotations

import csv
import io
import math
from functools import partial
from typing import Any

import numpy as np

from training.aggregate import aggregate, aggregate_probs
from training.config import TrainRecipe
from training.intervals import BOUNDS
from training.metas import values
from training.metrics import (
    HEADLINE,
    classification_metrics,
    level_prefix,
    metric_name,
    multilabel_metrics,
    predicted_classes,
)
from training.predictions import LabelledTable


def by_level(pred: dict[str, Any], recipe: TrainRecipe):
    """``(level, group ids, probs[G, C], labels[G])`` for each recipe level that every sample's metadata names
    (labels None where ``pred["labels"]`` is: samples without labels). Of a calibrated ``pred``
    (:func:`training.calibration.calibrated`), the groups' probabilities aggregated from the samples' unscaled
    ones, at the level's temperature."""
    from training.calibration import scaled

    how = recipe.eval.how if recipe.task == "multiclass" else "max"
    probs, temps = pred.get("uncalibrated", pred["probs"]), pred.get("temperatures") or {}
    multilabel = recipe.task == "multilabel"
    for level in recipe.eval.levels:
        groups = values(pred["metas"], level)
        if groups and all(g is not None for g in groups):
            if pred["labels"] is None:
                ids, p = aggregate_probs(probs, groups, how, multilabel)
                yield level, ids, scaled(p, temps.get(level, 1.0), multilabel), None
            else:
                ids, p, y = aggregate(probs, pred["labels"], groups, how)
                yield level, ids, scaled(p, temps.get(level, 1.0), multilabel), y


def level_threshold(recipe: TrainRecipe, level: str) -> float | None:
    """The positive-call threshold of a multi-class ``level``: only groups aggregated by ``any`` use one
    (samples and other aggregations take the argmax)."""
    return recipe.eval.threshold if recipe.eval.how == "any" and level != "sample" else None


def evaluate(
    pred: dict[str, Any], recipe: TrainRecipe, outputs: list[str], prefix: str = "val_", at: list | None = None
) -> dict[str, float]:
    """Sample-level metrics plus the same metrics after aggregation to each of the recipe's levels; a detector's
    boxes by :func:`training.detection.metrics`. ``at``: :func:`units` of ``pred``, where the caller has them."""
    if recipe.task == "detect":
        from training.detection import metrics as box_metrics

        return box_metrics(pred, outputs, recipe.eval.threshold, prefix)

    def metrics(y, p, level):
        pre = level_prefix(level, prefix)
        if recipe.task == "multilabel":
            return multilabel_metrics(y, p, outputs, pre, recipe.eval.threshold)
        return classification_metrics(y, p, pre, outputs, level_threshold(recipe, level))

    out = {f"{prefix}loss": pred["loss"]}
    for level, _, p, y in (
        [("sample", None, pred["probs"], pred["labels"]), *by_level(pred, recipe)] if at is None else at
    ):
        out |= metrics(y, p, level)
    return out


def units(pred: dict[str, Any], recipe: TrainRecipe) -> list[tuple[str, list, Any, Any]]:
    """``(level, each unit's patient, probs, labels)`` at sample level and at each of :func:`by_level`'s levels:
    what a bootstrap resamples by patient."""
    patients = values(pred["metas"], "patient")
    out = [("sample", patients, pred["probs"], pred["labels"])]
    for level, ids, p, y in by_level(pred, recipe):
        patient_of: dict[Any, Any] = {}
        for group, patient in zip(values(pred["metas"], level), patients, strict=True):
            patient_of.setdefault(group, patient)
        out.append((level, [patient_of[i] for i in ids], p, y))
    return out


def with_interval(metric: str) -> bool:
    """Whether a held-out metric (unprefixed) gets a confidence interval: the headline ones, and each class's or
    label's sensitivity, specificity and AUC."""
    return metric in HEADLINE or metric.startswith(("recall_", "specificity_", "auc_"))


INTERVAL_COLUMNS = (
    *("level", "metric", "value", "ci_low", "ci_high", "method", "confidence", "resamples", "defined"),
    *("units", "clusters", "resampled"),
)
EXACT = "exact binomial"  # the method of a proportion's interval where each unit is its own patient


def exact_where_single(found: list, clusters, proportions: dict, confidence: float) -> list[tuple[Any, str]]:
    """Each interval of ``found`` with its method: where every unit is its own cluster (the patient level), a
    proportion's (``proportions``: its successes and trials) is Clopper-Pearson's, which a bootstrap of units all
    alike (every patient called right) would give no width; the rest stay the bootstrap's."""
    from dataclasses import replace

    from training.intervals import exact

    single = len(set(clusters.tolist())) == len(clusters)
    out = []
    for iv in found:
        if single and iv.metric in proportions and not math.isnan(iv.value):
            low, high = exact(*proportions[iv.metric], confidence)
            out.append((replace(iv, low=low, high=high), EXACT))
        else:
            out.append((iv, "bootstrap"))
    return out


def intervals(
    pred: dict[str, Any], recipe: TrainRecipe, outputs: list[str], prefix: str, at: list | None = None
) -> tuple[dict, str]:
    """Confidence intervals of a classifier's held-out metrics at sample level and at each of the recipe's levels
    (:func:`training.intervals.bootstrap`: ``eval.bootstrap`` resamples of the split's patients, at
    ``eval.confidence``): as MLflow metrics (``<metric>_ci_low``, ``<metric>_ci_high``) and as a CSV table
    (:data:`INTERVAL_COLUMNS`). Empty for a detector, samples without labels or ``eval.bootstrap: 0``. ``at``:
    :func:`units` of ``pred``, where the caller has them."""
    from training.intervals import bootstrap, class_statistic, clusters_of, label_statistic, proportions

    if recipe.task == "detect" or not recipe.eval.bootstrap or pred["labels"] is None:
        return {}, ""
    rows, out, confidence = [], {}, recipe.eval.confidence
    for level, keys, p, y in units(pred, recipe) if at is None else at:
        clusters = clusters_of(keys)
        patients = len(set(clusters.tolist()))
        if recipe.task == "multilabel":
            stat = label_statistic(y, p, outputs, recipe.eval.threshold)
            counted = proportions(y, (p >= recipe.eval.threshold).astype(int), outputs)
        else:
            calls = predicted_classes(p, level_threshold(recipe, level))
            stat, counted = class_statistic(y, p, outputs, calls), proportions(y, calls, outputs)
        resampled = "patients" if any(k is not None for k in keys) else f"{level}s"
        found = bootstrap(stat, clusters, with_interval, recipe.eval.bootstrap, confidence, recipe.seed)
        pre = level_prefix(level, prefix)
        for iv, method in exact_where_single(found, clusters, counted, confidence):
            out |= dict(zip((f"{pre}{iv.metric}{b}" for b in BOUNDS), (iv.low, iv.high), strict=True))
            counts = [iv.defined, len(y), patients, resampled]
            rows.append(
                [level, iv.metric, iv.value, iv.low, iv.high, method, confidence, recipe.eval.bootstrap, *counts]
            )
    return out, _csv(INTERVAL_COLUMNS, rows)


OPERATING_COLUMNS = (
    *("level", "output", "rule", "threshold", "metric", "validation", "value", "ci_low", "ci_high", "method"),
)


def validation_levels(recipe: TrainRecipe, validation: dict[str, LabelledTable], notes: list[str]):
    """``(level, its table)`` of the run's validation predictions (``validation``: each level's
    ``predictions_<level>.csv``, read once by :func:`read_validation`) at sample level and each of the recipe's
    levels; each level the run logged none at is a note in ``notes``."""
    for level in ("sample", *recipe.eval.levels):
        if level not in validation:
            notes.append(f"{level}: none (the run logged no validation predictions at this level)")
            continue
        yield level, validation[level]


def read_validation(texts: dict[str, str]) -> dict[str, LabelledTable]:
    """Each level's validation ``predictions_<level>.csv`` (``{level: its text}``) read: what the calibration and
    the operating point both fit on."""
    from training.predictions import read_table

    return {level: read_table(text, f"the run's validation predictions_{level}.csv") for level, text in texts.items()}


def thresholds(
    recipe: TrainRecipe, outputs: list[str], validation: dict[str, LabelledTable], temps: dict[str, float] | None = None
) -> tuple[dict[str, dict[int, tuple[float, dict[str, float]]]], list[str]]:
    """``{level: {output index: (threshold, its rates on validation)}}``: what ``eval.operating_point`` chooses on
    the validation split's predictions at each level (``validation``: the run's ``predictions_<level>.csv``; at
    the level's temperature of ``temps``, where the held-out probabilities are scaled so, :mod:`training.calibration`)
    for ``eval.positive`` (each label of a multi-label task), and a note for each level or output that has none,
    saying why. Empty where the recipe asks for none."""
    from training.calibration import scaled
    from training.operating import choose_threshold, rates_at

    rule = recipe.eval.operating_point
    if not rule or recipe.task == "detect":
        return {}, []
    multilabel = recipe.task == "multilabel"
    chosen = list(enumerate(outputs)) if multilabel else [(outputs.index(recipe.eval.positive), recipe.eval.positive)]
    out, notes = {}, []
    for level, table in validation_levels(recipe, validation, notes):
        probs = scaled(table.probs, (temps or {}).get(level, 1.0), multilabel)  # once for each output's
        for k, name in chosen:
            j = table.outputs.index(metric_name(name))
            truth = np.array([label[j] == 1 if multilabel else label == name for label in table.labels])
            scores = probs[:, j]
            try:
                cut = choose_threshold(truth, scores, rule)
            except ValueError as exc:
                notes.append(f"{level} {name}: none ({exc} in the validation split)")
                continue
            out.setdefault(level, {})[k] = (cut, rates_at(truth, scores, cut))
    return out, notes


def operating_points(
    pred: dict[str, Any], recipe: TrainRecipe, outputs: list[str], prefix: str, chosen: dict, at: list | None = None
) -> tuple[dict[str, float], str]:
    """The held-out sensitivity, specificity, PPV and NPV (with their bootstrap intervals, as :func:`intervals`)
    at each level and output of the thresholds ``chosen`` on validation (:func:`thresholds`): metrics
    ``<prefix><level_>op_<metric>_<output>`` (``op_threshold_<output>`` too) and a CSV table
    (:data:`OPERATING_COLUMNS`). ``at``: :func:`units` of ``pred``, where the caller has them."""
    from training.intervals import Interval, bootstrap, clusters_of
    from training.operating import counts_at, rates_at

    rule, count = recipe.eval.operating_point, recipe.eval.bootstrap
    if not chosen or pred["labels"] is None:
        return {}, ""
    out, rows = {}, []
    for level, keys, p, y in units(pred, recipe) if at is None else at:
        pre = level_prefix(level, prefix)
        for k, (cut, seen) in chosen.get(level, {}).items():
            name, n = outputs[k], metric_name(outputs[k])
            positive = (y[:, k] == 1) if recipe.task == "multilabel" else (y == k)
            stat, clusters = partial(rates_at, positive, p[:, k], cut), clusters_of(keys)
            if count:
                found = bootstrap(stat, clusters, lambda _: True, count, recipe.eval.confidence, recipe.seed)
                proportions = counts_at(positive, p[:, k], cut)
                found = exact_where_single(found, clusters, proportions, recipe.eval.confidence)
            else:  # the values alone
                found = [(Interval(m, v, math.nan, math.nan, 0), "") for m, v in stat(np.ones(len(y))).items()]
            out[f"{pre}op_threshold_{n}"] = cut
            for iv, method in found:
                key = f"{pre}op_{iv.metric}_{n}"
                out[key] = iv.value
                if count:
                    out |= dict(zip((key + b for b in BOUNDS), (iv.low, iv.high), strict=True))
                rows.append([level, name, rule, cut, iv.metric, seen[iv.metric], iv.value, iv.low, iv.high, method])
    return out, _csv(OPERATING_COLUMNS, rows)


def _csv(header, rows) -> str:
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
    return table.getvalue()
