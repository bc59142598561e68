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
from training.metas import Metas, values
from training.metrics import HEADLINE, metric_name


def site_keys(sites: list[str]) -> dict[str, str]:
    """Each site's part of a metric name (``site_<key>_...``); sites whose names read alike there (``a b``,
    ``a_b``) take their order's number after it."""
    keys = {s: metric_name(s) for s in sites}
    alike = [k for k in keys.values() if list(keys.values()).count(k) > 1]
    return {s: f"{k}_{i}" if k in alike else k for i, (s, k) in enumerate(keys.items())}


def by_site(pred: dict[str, Any], recipe: TrainRecipe, outputs: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    """``{site: {level: {"count": n, metric: value}}}`` for each site the samples name, at sample level and each
    aggregation level of the recipe (``count``: samples, or slides, patients...), the :data:`HEADLINE` metrics of
    :func:`training.levels.evaluate`. Empty where fewer than two sites are named (one site's are the split's own),
    for samples without labels and for a detector. A sample of no site is in none; a patient of two sites counts
    in each, with its samples there."""
    from training.levels import evaluate

    if recipe.task == "detect" or pred["labels"] is None:
        return {}
    column = values(pred["metas"], "site")
    sites = site_order(column)
    if len(sites) < 2:
        return {}
    found = np.array([s or "" for s in column])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for site in sites:
        at = np.flatnonzero(found == site)
        metas = pred["metas"]
        part = {
            "probs": pred["probs"][at],
            "labels": pred["labels"][at],
            "metas": metas.take(at) if isinstance(metas, Metas) else [metas[i] for i in at.tolist()],
            "loss": math.nan,
        }
        metrics = evaluate(part, recipe, outputs, prefix="")
        out[site] = {}
        for level in ("sample", *recipe.eval.levels):
            pre = "" if level == "sample" else f"{level}_"
            if level != "sample" and pre + "accuracy" not in metrics:
                continue  # the samples do not name this level
            count = len(at) if level == "sample" else len(set(values(part["metas"], level)))
            out[site][level] = {"count": count} | {k: metrics[pre + k] for k in HEADLINE if pre + k in metrics}
    return out


def site_metrics(results: dict[str, dict[str, dict[str, float]]], prefix: str) -> dict[str, float]:
    """:func:`by_site`'s results as MLflow metrics: ``<prefix>site_<site>_<level_><metric>``
    (``test_site_3_patient_accuracy``; sample level without a level, ``count`` as ``samples``)."""
    keys = site_keys(list(results))
    out = {}
    for site, levels in results.items():
        for level, metrics in levels.items():
            pre = f"{prefix}site_{keys[site]}_" + ("" if level == "sample" else f"{level}_")
            out |= {pre + ("samples" if k == "count" and level == "sample" else k): v for k, v in metrics.items()}
    return out


def site_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """:func:`by_site`'s results as CSV: a row per site and level (``site,level,count,<metric>...``)."""
    names = list(dict.fromkeys(k for levels in results.values() for m in levels.values() for k in m if k != "count"))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["site", "level", "count", *names])
    for site, levels in results.items():
        for level, m in levels.items():
            cells = ["" if k not in m or math.isnan(m[k]) else f"{m[k]:.6g}" for k in names]
            writer.writerow([site, level, int(m["count"]), *cells])
    return out.getvalue()
