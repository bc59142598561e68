"""The MLflow side of a sweep: one parent run per sweep, a child run per trial, and the summary logged on the
parent when the sweep ends (best trial marked, trials table, parallel-coordinates plot)."""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards import manifest as mf
from training import tracking
from training.config import TrainRecipe
from tune.config import SweepConfig

KIND, SWEEP, TRIAL, BEST = "tessera.kind", "tessera.sweep", "tessera.trial", "tessera.best"
PARENT = "mlflow.parentRunId"
REPLICATE = "replicate"  # the grid parameter of a replicate group
# A trial's last report to Tune (its metrics and checkpoint), kept in its run before the run closes: a sweep
# interrupted after the run closed (FINISHED) and before Tune took that report resumes the trial by reporting it
# again, rather than training its last epoch anew.
LAST_REPORT = "tune_last_report.json"


def trial_params(sweep: SweepConfig, config: dict[str, Any]) -> dict[str, Any]:
    """The recipe fields a trial sets: its sampled parameters, or its replicate's seed and split."""
    if sweep.replicates is not None:
        return sweep.replicates.params(int(config[REPLICATE]), sweep.base().seed)
    return dict(config)


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    parent_url: str
    best_run_id: str | None
    best_params: dict[str, Any]
    best_metric: float | None
    trials: int
    errors: int


def child_run(
    uri: str, sweep_run: str, parent_id: str, trial_id: str, recipe: TrainRecipe
) -> tuple[str, dict[str, Any] | None]:
    """The trial's MLflow run: the one it made before an interruption, or a new child of the sweep's run; and
    the last report to Tune of a run that had finished (:data:`LAST_REPORT`; None: the trial goes on training)."""
    from mlflow import MlflowClient

    from training.launch import start_run

    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    found = client.search_runs([exp], f"tags.`{SWEEP}` = '{sweep_run}' and tags.`{TRIAL}` = '{trial_id}'")
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status == "FINISHED" and tracking.has_artifact(client, run_id, LAST_REPORT):
            with tempfile.TemporaryDirectory() as tmp:
                return run_id, json.loads(Path(client.download_artifacts(run_id, LAST_REPORT, tmp)).read_text())
        client.update_run(run_id, status="RUNNING")
        return run_id, None
    checked = check_trial_data(client.get_run(parent_id).data.tags, recipe, sweep_run)
    tags = {PARENT: parent_id, KIND: "trial", SWEEP: sweep_run, TRIAL: trial_id}
    return start_run(recipe, uri, extra_tags=tags, run_name=f"{sweep_run}-{trial_id}", loaded=checked), None


def keep_last_report(uri: str, run_id: str, metrics: dict[str, Any], path: str | None) -> None:
    """Keep in run ``run_id``, before it closes, the trial's last report to Tune (:data:`LAST_REPORT`: read only
    once the run has FINISHED). A failure (the tracking server away) is said, not raised: the trial has trained,
    and Tune takes its report all the same."""
    from mlflow import MlflowClient

    report = json.dumps({"metrics": metrics, "path": path}, default=float)
    try:
        MlflowClient(uri).log_text(run_id, report, LAST_REPORT)
    except Exception as exc:  # MLflow's own errors, or the connection's
        why = f"{type(exc).__name__}: {exc}"
        print(f"run {run_id}: its last report to Tune was not kept ({why}); a sweep interrupted before Tune takes it "
              "trains the trial's last epoch again on --resume", flush=True)  # fmt: skip


def check_trial_data(
    parent_tags: dict[str, str], recipe: TrainRecipe, sweep_run: str
) -> tuple[mf.ManifestBrief, bytes] | None:
    """A new trial reads the version of the sweep's dataset that the sweep started on (its parent's tags), so
    that its trials compare on the same data, resumed or not; a trial whose sampled recipe names another
    dataset is left to its own run's version. Returns the manifest checked (None: none), which the trial's run
    then records, rather than one read again a moment later."""
    from training.launch import MANIFEST_TAG, load_manifest

    if recipe.data.dataset != parent_tags.get("dataset"):
        return None
    manifest, data = load_manifest(recipe)
    recorded = parent_tags.get(MANIFEST_TAG)
    mf.check_same_data(recorded, recipe.data.dataset, manifest, data, f"sweep {sweep_run}", "its earlier trials")
    return manifest, data


def start_parent(sweep: SweepConfig, uri: str, sweep_run: str, kind: str) -> str:
    """The sweep's parent run: the sweep file and base recipe as params, tagged for lookup and resume, and with
    the version of the base recipe's dataset its trials read."""
    from training.launch import load_manifest, origin_tags
    from training.preflight import check_each_epoch

    base = sweep.base()
    manifest, data = load_manifest(base)
    check_each_epoch(base, manifest, sweep.objective()[0], "metric")  # before the parent run exists
    params = {"sweep.recipe": sweep.recipe, "sweep.kind": kind, "sweep.metric": sweep.objective()[0]}
    params |= {"sweep.mode": sweep.objective()[1], "sweep.search": sweep.search.algorithm}
    params |= {"sweep.scheduler": sweep.scheduler.name, "sweep.num_samples": sweep.search.num_samples}
    params |= {f"space.{k}": json.dumps(p.model_dump(exclude_none=True)) for k, p in sweep.space.items()}
    if sweep.replicates:
        params |= {f"replicates.{k}": v for k, v in sweep.replicates.model_dump().items()}
    tags = origin_tags(base, manifest, data) | {KIND: kind, SWEEP: sweep_run}  # with its trials' data version
    _, run_id = tracking.start_run(uri, base.experiment or base.name, sweep_run, params, tags)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "sweep.yaml"
        import yaml

        path.write_text(yaml.safe_dump(sweep.model_dump(exclude_none=True), sort_keys=False))
        tracking.RunLogger(uri, run_id).artifact(path)
    return run_id


def find_parent(uri: str, sweep_run: str) -> tuple[str, SweepConfig]:
    """The parent run of ``sweep_run`` (its name) and the sweep it ran, for ``--resume``."""
    import yaml
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.`{SWEEP}` = '{sweep_run}' and tags.`{KIND}` != 'trial'")
    if len(runs) != 1:
        raise ValueError(f"no single sweep named {sweep_run!r} in MLflow (found {len(runs)})")
    run_id = runs[0].info.run_id
    with tempfile.TemporaryDirectory() as d:
        text = Path(client.download_artifacts(run_id, "sweep.yaml", d)).read_text()
    return run_id, SweepConfig.model_validate(yaml.safe_load(text))


def _plain(value: Any) -> Any:
    """NumPy scalars as Python values (for printing and MLflow params)."""
    return value.item() if hasattr(value, "item") else value


def _best_value(df, metric: str, mode: str) -> float | None:
    if df is None or metric not in df:
        return None
    values = df[metric].dropna()
    if values.empty:
        return None
    return float(values.min() if mode == "min" else values.max())


def summarise(grid, sweep: SweepConfig, uri: str, parent_id: str, sweep_run: str, metric: str, mode: str):
    """Mark the best trial, close trials the scheduler stopped, and log the best config, a summary table and
    a parallel-coordinates plot on the parent run."""
    import pandas as pd
    from mlflow import MlflowClient

    from tune.plots import parallel_coordinates_png

    client = MlflowClient(uri)
    rows = []
    for result in grid:
        m = result.metrics or {}
        params = trial_params(sweep, result.config or {})
        rows.append(
            {
                "trial": m.get("trial_id"),
                "run_id": m.get("mlflow_run_id"),
                "status": "error" if result.error else "ok",
                "epochs": m.get("training_iteration"),
                **{f"param.{k}": v for k, v in params.items()},
                f"last.{metric}": m.get(metric),
                f"best.{metric}": _best_value(result.metrics_dataframe, metric, mode),
            }
        )
    epochs = sweep.base().epochs
    runs = {row["run_id"]: client.get_run(row["run_id"]) for row in rows if row["run_id"]}  # each read once
    for row in rows:
        if row["status"] != "ok" or not row["run_id"]:
            continue
        run = runs[row["run_id"]]
        # A trial the scheduler stopped ends with its process: its run is left RUNNING, or FAILED when the
        # training thread saw its workers go first. Tune's verdict (no error) is what counts.
        if run.info.status != "FINISHED":
            # Its workers waited for the verdict on each epoch (``await_go_ahead``): the run holds just the
            # epochs the scheduler counted, and the tag says where it stopped them.
            client.set_tag(run.info.run_id, "tessera.stopped_early", f"scheduler, after epoch {row['epochs']}")
            client.set_terminated(run.info.run_id, "FINISHED")
    table = pd.DataFrame(rows)
    best_col = f"best.{metric}"
    # A failed trial's epochs so far do not make it the best: it may have stopped on its way up or down.
    finished = table[table["status"] == "ok"] if not table.empty else table
    scored = finished.dropna(subset=[best_col]) if best_col in finished else table.iloc[0:0]
    best_run, best_params, best_value = None, {}, None
    if not scored.empty:
        best = scored.loc[scored[best_col].idxmin() if mode == "min" else scored[best_col].idxmax()]
        best_run, best_value = best["run_id"], float(best[best_col])
        best_params = {k[len("param.") :]: _plain(best[k]) for k in table.columns if k.startswith("param.")}
        for run_id, run in runs.items():  # a resumed sweep's earlier summary may have named another
            if run_id != best_run and BEST in run.data.tags:
                client.delete_tag(run_id, BEST)
        client.set_tag(best_run, BEST, "true")
        client.set_tag(parent_id, "best_run_id", best_run)
        logger = tracking.RunLogger(uri, parent_id)
        logger.metrics({f"best_{metric}": best_value, "trials": len(table)}, 0)
        for k, v in best_params.items():  # tags, not params: a resumed sweep's failed trials may change the best
            client.set_tag(parent_id, f"best.{k}", v)
    with tempfile.TemporaryDirectory() as d:
        csv = Path(d) / "trials.csv"
        table.sort_values(best_col, ascending=mode == "min", na_position="last").to_csv(csv, index=False)
        tracking.RunLogger(uri, parent_id).artifact(csv)
        if not scored.empty and any(c.startswith("param.") for c in table.columns):
            png = parallel_coordinates_png(scored, best_col, mode, Path(d) / "parallel_coordinates.png")
            tracking.RunLogger(uri, parent_id).artifact(png)
    errors = int((table["status"] == "error").sum()) if not table.empty else 0
    print(f"{len(table)} trials ({errors} failed, max {epochs} epochs); best {metric} = {best_value}: {best_params}")
    return SweepOutcome(
        sweep_run, parent_id, tracking.run_url_of(uri, parent_id), best_run, best_params,
        None if best_value is None or math.isnan(best_value) else best_value, len(table), errors,
    )  # fmt: skip
