"""``tessera compare A B --paired``: two trained runs compared on the same held-out patients, prediction by prediction.

Paper 000 compares six architectures, each trained once, on one test split. Their metrics' difference is then not
a difference of groups of replicates (:mod:`tune.compare`) but of two models on the same patients: the paired
question is whether model B, on these patients, does better than A by more than these patients' draw explains.
Each resample draws the split's patients with replacement (as :mod:`training.intervals` does) and measures both
models on it; the differences give an interval, and a two-sided p-value: twice the share of resamples on the far
side of 0 (a percentile bootstrap test). For accuracy, McNemar's exact test on the samples one model calls right
and the other wrong is given too.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from training.predictions import LabelledTable, read_table

RESAMPLES = 2000


@dataclass
class Paired:
    """One metric of two models on the same units: each's value, B - A with its interval, the test."""

    metric: str
    a: float
    b: float
    diff: float
    low: float
    high: float
    p: float
    defined: int
    verdict: str
    mcnemar_p: float | None = None  # accuracy's exact test on the discordant calls


def align(a: LabelledTable, b: LabelledTable, names: tuple[str, str]) -> np.ndarray:
    """The row of ``b`` holding each row of ``a``'s unit: the two must hold the same units, with the same labels
    and classes; refused otherwise, saying how they differ."""
    if a.outputs != b.outputs:
        raise ValueError(f"{names[0]} and {names[1]} have other classes ({a.outputs} and {b.outputs})")
    for name, table in zip(names, (a, b), strict=True):
        if len(set(table.keys)) != len(table.keys):
            raise ValueError(f"{name}'s table names {len(table.keys) - len(set(table.keys))} of its rows as another")
    where = {k: i for i, k in enumerate(b.keys)}
    missing, extra = set(a.keys) - set(where), set(b.keys) - set(a.keys)
    if missing or extra or len(a.keys) != len(b.keys):
        raise ValueError(
            f"{names[0]} and {names[1]} were evaluated on other units ({len(missing)} of {names[0]}'s not in "
            f"{names[1]}'s, {len(extra)} the other way): a paired comparison needs the same split"
        )
    order = np.array([where[k] for k in a.keys])
    if [b.labels[i] for i in order] != a.labels:
        raise ValueError(f"{names[0]} and {names[1]} label the same units otherwise")
    return order


def compare_paired(
    a: LabelledTable, b: LabelledTable, metrics: list[str], names=("A", "B"), alpha=0.05, seed=0
) -> list[Paired]:
    """Each of ``metrics`` (of :func:`training.intervals.class_statistic`: accuracy, f1, auc, weighted_log_loss,
    brier_loss, recall_<class>, specificity_<class>; of a multi-label task, of ``label_statistic``: rsna_log_loss,
    auc_<label>...) of both tables' models, each with its own calls, on the same resamples of their patients;
    B - A, its 1 - alpha interval and p-value (:data:`RESAMPLES`)."""
    from scipy.stats import binomtest

    from training.intervals import class_statistic, clusters_of, label_statistic, resamples
    from training.metrics import metric_name

    order = align(a, b, names)
    pb, calls_b = b.probs[order], [b.calls[i] for i in order]
    if a.multilabel:
        y, ca, cb = np.array(a.labels), np.array(a.calls), np.array(calls_b)
        stat_a = label_statistic(y, a.probs, a.outputs, 0.5, called=ca)
        stat_b = label_statistic(y, pb, a.outputs, 0.5, called=cb)
    else:
        # the label and call columns name a class as it is; its probability column as a metric name (no spaces)
        index = {o: k for k, o in enumerate(a.outputs)}
        y = np.array([index[metric_name(label)] for label in a.labels])
        ca = np.array([index[metric_name(c)] for c in a.calls])
        cb = np.array([index[metric_name(c)] for c in calls_b])
        stat_a, stat_b = class_statistic(y, a.probs, a.outputs, ca), class_statistic(y, pb, a.outputs, cb)

    def both(w: np.ndarray) -> tuple[dict, dict]:
        return stat_a(w), stat_b(w)

    whole_a, whole_b = both(np.ones(len(y)))
    unknown = [m for m in metrics if m not in whole_a]
    if unknown:
        raise ValueError(f"metric(s) {unknown}: a paired comparison takes {', '.join(sorted(whole_a))}")
    diffs = np.array(
        [[d[1][m] - d[0][m] for m in metrics] for d in map(both, resamples(clusters_of(a.patients), RESAMPLES, seed))]
    )
    out = []
    for j, m in enumerate(metrics):
        d = diffs[:, j][~np.isnan(diffs[:, j])]
        diff = whole_b[m] - whole_a[m]
        low = high = p = math.nan
        if len(d) >= 0.9 * RESAMPLES and not math.isnan(diff):
            low, high = (float(v) for v in np.percentile(d, [alpha / 2 * 100, 100 - alpha / 2 * 100]))
            p = float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))
        mcnemar = None
        if m == "accuracy" and not a.multilabel:
            right_a, right_b = ca == y, cb == y
            only_a, only_b = int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a))
            mcnemar = float(binomtest(only_a, only_a + only_b, 0.5).pvalue) if only_a + only_b else 1.0
        out.append(
            Paired(m, whole_a[m], whole_b[m], diff, low, high, p, len(d), _verdict(m, diff, p, alpha, names), mcnemar)
        )
    return out


def _verdict(metric: str, diff: float, p: float, alpha: float, names: tuple[str, str]) -> str:
    if math.isnan(p):
        return "undefined on too many resamples (a class of few patients)"
    if p >= alpha:
        return f"no difference shown at alpha {alpha:g} (p = {p:.3g})"
    better = names[1] if (diff > 0) != metric.endswith("loss") else names[0]
    return f"{better} better (p = {p:.3g} < {alpha:g})"


def markdown(results: list[Paired], names: tuple[str, str], level: str, split: str, units: int, alpha: float) -> str:
    """The report: a row per metric."""
    lines = [
        f"# {names[0]} (A) vs {names[1]} (B), paired on the {split} split's {units} {level}(s)",
        "",
        f"B - A with its {1 - alpha:.0%} interval and p-value from {RESAMPLES} resamples of the patients (both models "
        "on each); McNemar's exact test for accuracy.",
        "",
        "| metric | A | B | B - A | interval | p | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        p = f"{r.p:.3g}" + (f" (McNemar {r.mcnemar_p:.3g})" if r.mcnemar_p is not None else "")
        interval = f"[{r.low:+.4f}, {r.high:+.4f}]"
        lines.append(f"| {r.metric} | {r.a:.4f} | {r.b:.4f} | {r.diff:+.4f} | {interval} | {p} | {r.verdict} |")
    return "\n".join(lines) + "\n"


def run_paired(uri: str, run_a: str, run_b: str, metrics: list[str], split: str, level: str, alpha: float):
    """Compare runs ``run_a`` and ``run_b`` on their held-out evaluation of ``split`` (its name: ``test``, or
    ``external_test`` for another dataset) at ``level``; logged as a comparison run. ``(results, report, run
    id)``. Refused where the two were not evaluated on the same version of the same dataset."""
    from mlflow import MlflowClient

    from training import tracking
    from training.evaluation import metric_prefix
    from tune.runs import KIND

    client = MlflowClient(uri)
    ids = [tracking.resolve_run(client, r) for r in (run_a, run_b)]
    prefix = metric_prefix(split)
    runs = [client.get_run(i) for i in ids]
    versions = [r.data.tags.get(f"{prefix}manifest_sha256") for r in runs]
    for given, v in zip((run_a, run_b), versions, strict=True):
        if v is None:
            raise ValueError(f"run {given}: no {split} evaluation ({prefix}*); `tessera evaluate {given}` makes one")
    if versions[0] != versions[1]:
        where = [r.data.tags.get(f"{prefix}dataset") for r in runs]
        raise ValueError(
            f"runs {run_a} and {run_b} were evaluated on other datasets or versions of one ({where[0]} "
            f"{versions[0][:12]}, {where[1]} {versions[1][:12]}): a paired comparison needs the same patients"
        )
    names = (runs[0].info.run_name or ids[0], runs[1].info.run_name or ids[1])
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in zip(ids, names, strict=True):
            path = f"{prefix}predictions_{level}.csv"
            if not tracking.has_artifact(client, i, path):
                raise ValueError(f"run {name}: no {path} (its recipe's eval.levels lack {level}?)")
            text = Path(client.download_artifacts(i, path, tmp)).read_text()
            tables.append(read_table(text, f"run {name}'s {path}"))
    results = compare_paired(tables[0], tables[1], metrics, names, alpha)
    report = markdown(results, names, level, split, len(tables[0].keys), alpha)
    exp = runs[0].info.experiment_id
    params = {
        "run_a": ids[0],
        "run_b": ids[1],
        "metrics": ",".join(metrics),
        "alpha": alpha,
        "paired": f"{split}/{level}",
    }
    tags = {KIND: "comparison"}
    _, run_id = tracking.start_run(
        uri, client.get_experiment(exp).name, f"paired-{names[0]}-vs-{names[1]}", params, tags
    )
    log, ok = tracking.RunLogger(uri, run_id), False
    try:
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "report.md").write_text(report)
            (Path(d) / "paired.json").write_text(json.dumps([asdict(r) for r in results], indent=1))
            log.artifacts(Path(d), "comparison")
        log.metrics({f"{r.metric}_diff": r.diff for r in results} | {f"{r.metric}_p": r.p for r in results}, 0)
        ok = True
    finally:
        tracking.finish_run(uri, run_id, "FINISHED" if ok else "FAILED")
    return results, report, run_id
