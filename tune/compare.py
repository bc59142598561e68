"""``tessera compare A B``: two groups of runs from MLflow, compared metric by metric (:mod:`tune.stats`),
with box plots, mean confusion matrices and a Markdown report, all logged to MLflow and printed."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training import tracking
from tune.runs import KIND, SWEEP
from tune.stats import Comparison, compare


@dataclass
class Group:
    label: str
    runs: list  # mlflow Run objects
    source: str


def find_group(client, ref: str) -> Group:
    """Runs of a group: the children of a sweep or replicates parent (its name or run id), or every finished
    training run (a plain one or a sweep's trial) matching an MLflow filter (``tags.model = 'vivit'``)."""
    from mlflow.exceptions import MlflowException

    exps = [e.experiment_id for e in client.search_experiments()]
    if "=" in ref or " like " in ref.lower():
        # MLflow's filters are clauses joined by `and`, without parentheses
        runs = client.search_runs(exps, f"{ref} and attributes.status = 'FINISHED'", max_results=5000)
        runs = [r for r in runs if r.data.tags.get(KIND, "trial") == "trial"]  # not sweep parents, comparisons
        return Group(ref, runs, f"filter {ref}")
    parents = client.search_runs(exps, f"tags.`{SWEEP}` = '{ref}' and tags.`{KIND}` != 'trial'")
    if not parents:
        try:
            parents = [client.get_run(ref)]
        except MlflowException:
            raise ValueError(f"{ref!r} is neither a sweep/replicates name, a run id, nor a filter") from None
    parent = parents[0]
    children = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'FINISHED'",
        max_results=5000,
    )
    label = parent.data.tags.get(SWEEP) or parent.info.run_name or ref
    return Group(label, children, f"children of run {parent.info.run_id}")


def values(group: Group, metric: str) -> list[float]:
    """The metric's final value in each run; a run without it is an error naming the run."""
    missing = [r.info.run_id for r in group.runs if metric not in r.data.metrics]
    if missing:
        raise ValueError(f"group {group.label}: run(s) {missing[:3]} have no metric {metric!r}")
    return [float(r.data.metrics[metric]) for r in group.runs]


def mean_confusion(client, group: Group, level: str) -> tuple[list[str], np.ndarray] | None:
    """The element-wise mean of the runs' ``confusion_<level>.json`` (None when no run logged one)."""
    mats, classes = [], None
    with tempfile.TemporaryDirectory() as d:
        for run in group.runs:
            name = f"confusion_{level}.json"
            if not tracking.has_artifact(client, run.info.run_id, name):
                continue
            data = json.loads(Path(client.download_artifacts(run.info.run_id, name, d)).read_text())
            classes = classes or data["classes"]
            mats.append(np.asarray(data["matrix"], dtype=float))
    return (classes, np.mean(mats, axis=0)) if mats else None


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.4g}")
    return str(v)


def markdown(a: Group, b: Group, results: list[Comparison], alpha: float) -> str:
    """The report: groups, then one section per metric with descriptive statistics, tests and the verdict."""
    lines = [
        f"# {a.label} (A) vs {b.label} (B)",
        "",
        f"A: {len(a.runs)} runs ({a.source}); B: {len(b.runs)} runs ({b.source}); alpha = {alpha:.4g}.",
        "",
        "Procedure (paper 002): Shapiro-Wilk per group; Levene picks Student's or Welch's t; the verdict uses the",
        "t-test when both groups look normal, Mann-Whitney U otherwise; Cohen's d with the t-test's power.",
    ]
    for c in results:
        lines += [
            "",
            f"## {c.metric}",
            "",
            "| group | n | mean | SD | min | max | Shapiro W | Shapiro p |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for label, s in (("A", c.a), ("B", c.b)):
            row = [label, s.n, s.mean, s.sd, s.min, s.max, s.shapiro_w, s.shapiro_p]
            lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
            if s.note:
                lines.append(f"| {label}: {s.note} | | | | | | | |")
        lines += [
            "",
            f"- Levene: W = {_fmt(c.levene_w)}, p = {_fmt(c.levene_p)} (equal variances: {c.equal_var})",
            f"- {c.t_test}: t = {_fmt(c.t_stat)}, df = {_fmt(c.t_df)}, p = {_fmt(c.t_p)}",
            f"- Mann-Whitney U: U = {_fmt(c.mwu_u)}, p = {_fmt(c.mwu_p)}",
            f"- Cohen's d = {_fmt(c.cohens_d)}, power = {_fmt(c.power)}",
            f"- **{c.verdict}**",
        ]
    return "\n".join(lines) + "\n"


def run_compare(uri: str, ref_a: str, ref_b: str, metrics: list[str], alpha: float = 0.05, level: str = "patient"):
    """Compare groups ``ref_a`` and ``ref_b`` on ``metrics``; returns ``(comparisons, report text, run id)``."""
    from mlflow import MlflowClient

    from training.plots import confusion_png
    from tune.plots import box_plot_png

    client = MlflowClient(uri)
    a, b = find_group(client, ref_a), find_group(client, ref_b)
    for g in (a, b):
        if len(g.runs) < 2:
            raise ValueError(f"group {g.label}: {len(g.runs)} finished run(s); a comparison needs at least 2")
    results = [compare(values(a, m), values(b, m), m, alpha) for m in metrics]
    report = markdown(a, b, results, alpha)
    exp = a.runs[0].info.experiment_id
    name = f"compare-{a.label}-vs-{b.label}"
    params = {"group_a": ref_a, "group_b": ref_b, "metrics": ",".join(metrics), "alpha": alpha}
    _, run_id = tracking.start_run(uri, client.get_experiment(exp).name, name, params, {KIND: "comparison"})
    log = tracking.RunLogger(uri, run_id)
    ok = False
    try:
        with tempfile.TemporaryDirectory() as d:
            out = Path(d)
            (out / "report.md").write_text(report)
            (out / "comparison.json").write_text(json.dumps([c.as_dict() for c in results], indent=1, default=str))
            for m in metrics:
                box_plot_png({f"A: {a.label}": values(a, m), f"B: {b.label}": values(b, m)}, m, out / f"box_{m}.png")
            for tag, g in (("A", a), ("B", b)):
                mean = mean_confusion(client, g, level)
                if mean:
                    title = f"{tag}: {g.label}, mean of {len(g.runs)} ({level})"
                    confusion_png(mean[1], mean[0], out / f"confusion_mean_{tag}.png", title)
            log.artifacts(out, "comparison")
        log.metrics({f"{c.metric}_p": c.t_p if c.decided_by != "Mann-Whitney U" else c.mwu_p for c in results}, 0)
        ok = True
    finally:
        tracking.finish_run(uri, run_id, "FINISHED" if ok else "FAILED")
    return results, report, run_id
