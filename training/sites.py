"""Metrics per centre (site): a model tested on centres it never saw may fail on one of them, and the metrics of
all of them together hide which. Samples name their site (``site``, as the label table wrote it) when the dataset's
label table had a site column (STRIP AI's ``center_id``)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np

from shards.schema import site_order
from training.config import TrainRecipe
from training.intervals import BOUNDS
from training.metas import Metas, values
from training.metrics import HEADLINE, level_prefix, metric_name


def site_keys(sites: list[str]) -> dict[str, str]:
    """Each site's part of a metric name (``site_<key>_...``); sites whose names read alike there (``a b``,
    ``a_b``) take their order's number after it."""
    keys = {s: metric_name(s) for s in sites}
    alike = [k for k in keys.values() if list(keys.values()).count(k) > 1]
    return {s: f"{k}_{i}" if k in alike else k for i, (s, k) in enumerate(keys.items())}


def by_site(
    pred: dict[str, Any], recipe: TrainRecipe, outputs: list[str], bounds: bool = False
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{site: {level: {"count": n, metric: value, "classes": {output: n}}}}`` for each site the samples name,
    at sample level and each aggregation level of the recipe (``count``: samples, or slides, patients...): the
    :data:`HEADLINE` metrics of :func:`training.levels.evaluate`, and how many of them are of each class (of a
    multi-label task: positive for each label), without which a site's AUC, absent where it has one class, or
    its accuracy, reads wrong. Empty where fewer than two sites are named (one site's are the split's own),
    for samples without labels and for a detector. A sample of no site is in none; a patient of two sites counts
    in each, with its samples there. ``bounds`` (the held-out evaluation's): each metric's confidence interval
    too (``<metric>_ci_low``, ``_ci_high``), from resamples of the site's own patients
    (:func:`training.levels.intervals`): a centre's few patients make its figures the least certain of all."""
    from training.levels import evaluate, intervals, units

    if recipe.task == "detect" or pred["labels"] is None:
        return {}
    column = values(pred["metas"], "site")
    sites = site_order(column)
    if len(sites) < 2:
        return {}
    found = np.array([s or "" for s in column])
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for site in sites:
        at = np.flatnonzero(found == site)
        metas = pred["metas"]
        part = {
            "probs": pred["probs"][at],
            "labels": pred["labels"][at],
            "metas": metas.take(at) if isinstance(metas, Metas) else [metas[i] for i in at.tolist()],
            "loss": math.nan,
        }
        if "uncalibrated" in pred:  # its groups scaled as the split's are (training.calibration)
            part |= {"uncalibrated": pred["uncalibrated"][at], "temperatures": pred["temperatures"]}
        grouped = units(part, recipe)  # its groups aggregated once, for its metrics and their intervals
        metrics = evaluate(part, recipe, outputs, prefix="", at=grouped)
        if bounds:
            metrics |= intervals(part, recipe, outputs, prefix="", at=grouped)[0]
        labels = {level: y for level, _, _, y in grouped}
        out[site] = {}
        for level, y in labels.items():
            pre = level_prefix(level)
            counts = y.sum(axis=0) if y.ndim == 2 else np.bincount(y, minlength=len(outputs))
            named = [k + b for k in HEADLINE if pre + k in metrics for b in ("", *BOUNDS) if pre + k + b in metrics]
            out[site][level] = (
                {"count": len(y)}
                | {k: metrics[pre + k] for k in named}
                | {"classes": dict(zip(outputs, counts.tolist(), strict=True))}
            )
    return out


def group_sites(metas, level: str, ids: list[str]) -> dict[str, list[str]]:
    """``{"site": [...]}``: the site of each group ``ids`` of ``level`` (a patient's, a slide's), for its row of a
    prediction table; a group whose samples are of several sites names them all (``1+3``). Empty unless every
    sample names its site."""
    sites, groups = values(metas, "site"), values(metas, level)
    if not sites or not all(sites):
        return {}
    of: dict[str, set[str]] = {}
    for group, site in zip(groups, sites, strict=True):
        of.setdefault(group, set()).add(site)
    return {"site": ["+".join(site_order(of[g])) for g in ids]}


def site_metrics(results: dict[str, dict[str, dict[str, Any]]], prefix: str, counts: bool = True) -> dict[str, float]:
    """:func:`by_site`'s results as MLflow metrics: ``<prefix>site_<site>_<level_><metric>``
    (``test_site_3_patient_accuracy``; sample level without a level, ``count`` as ``samples``, left out unless
    ``counts``), and each metric's worst site, ``<prefix>worst_site_<level_><metric>``: what a model chosen or
    compared for the centres it has not seen is judged by (:func:`worst_sites`)."""
    keys = site_keys(list(results))
    out = {}
    for site, levels in results.items():
        for level, metrics in levels.items():
            pre = level_prefix(level, f"{prefix}site_{keys[site]}_")
            named = {k: v for k, v in metrics.items() if k != "classes" and (counts or k != "count")}
            out |= {pre + ("samples" if k == "count" and level == "sample" else k): v for k, v in named.items()}
    return out | worst_sites(results, prefix)


def worst_sites(results: dict[str, dict[str, dict[str, Any]]], prefix: str) -> dict[str, float]:
    """``<prefix>worst_site_<level_><metric>``: of each headline metric, its worst value over the sites (the
    highest log loss, the lowest accuracy, F1 or AUC). A site without the metric (an AUC of one class) is passed
    over; NaN where no site has it. Empty for fewer than two sites."""
    if len(results) < 2:
        return {}
    out = {}
    for level in dict.fromkeys(lv for levels in results.values() for lv in levels):
        for metric in HEADLINE:
            found = [m[metric] for levels in results.values() if metric in (m := levels.get(level, {}))]
            if not found:
                continue
            known = [v for v in found if not math.isnan(v)]
            pick = max if metric.endswith("loss") else min
            out[f"{level_prefix(level, prefix + 'worst_site_')}{metric}"] = pick(known) if known else math.nan
    return out


def site_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """:func:`by_site`'s results as CSV: a row per site and level (``site,level,count,n_<class>...,<metric>...``)."""
    rows = [m for levels in results.values() for m in levels.values()]
    names = list(dict.fromkeys(k for m in rows for k in m if k not in ("count", "classes")))
    classes = list(dict.fromkeys(c for m in rows for c in m.get("classes", {})))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["site", "level", "count", *(f"n_{metric_name(c)}" for c in classes), *names])
    for site, levels in results.items():
        for level, m in levels.items():
            counts = [m.get("classes", {}).get(c, 0) for c in classes]
            cells = ["" if k not in m or math.isnan(m[k]) else f"{m[k]:.6g}" for k in names]
            writer.writerow([site, level, int(m["count"]), *counts, *cells])
    return out.getvalue()
