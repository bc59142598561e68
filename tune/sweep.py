"""``tessera tune``: Ray Tune sweeps whose trials are Ray Train runs, tracked in MLflow as one parent run per
sweep with a child run per trial.

Each trial is a small Tune function that starts a TorchTrainer (in a thread) and forwards every epoch's
report to Tune with a pointer checkpoint (the Train checkpoint's path), so schedulers see each epoch, an
interrupted sweep resumes (``Tuner.restore``) from each unfinished trial's last epoch, and PBT can hand one
trial's weights to another.
"""

from __future__ import annotations

import json
import math
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training import tracking
from training.config import TrainRecipe, recipe_tree
from tune.config import Param, SweepConfig, recipe_with

KIND, SWEEP, TRIAL, BEST = "tessera.kind", "tessera.sweep", "tessera.trial", "tessera.best"
PARENT = "mlflow.parentRunId"
POINTER = "train_checkpoint.json"
REPLICATE = "replicate"  # the grid parameter of a replicate group


def tune_space(space: dict[str, Param], grid: bool = False) -> dict[str, Any]:
    """Ray Tune domains for the sweep's parameters (dotted recipe fields as keys); ``grid`` turns choices
    into grid axes."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, p in space.items():
        if p.grid is not None or (grid and p.choice is not None):
            out[key] = tune.grid_search(p.grid if p.grid is not None else p.choice)
        elif p.choice is not None:
            out[key] = tune.choice(p.choice)
        elif p.uniform is not None:
            out[key] = tune.uniform(*p.uniform)
        elif p.loguniform is not None:
            out[key] = tune.loguniform(*p.loguniform)
        else:
            out[key] = tune.randint(*p.randint)
    return out


def concurrency(recipe: TrainRecipe, resources: dict[str, float], use_gpu: bool) -> int:
    """Trials that fit side by side: each needs ``workers`` x (CPUs per worker [+ 1 GPU])."""
    fits = resources.get("CPU", 1) // (recipe.workers * recipe.cpus_per_worker)
    if use_gpu:
        fits = min(fits, resources.get("GPU", 0) // recipe.workers)
    return max(1, int(fits))


def grid_points(space: dict[str, Param], seed: int, repeats: int = 1) -> list[dict[str, Any]]:
    """Every point of a grid (grid and choice values crossed), ``repeats`` times, in a seeded random order.

    Asynchronous schedulers judge a trial against those that reached its rung before it; a grid walked in
    order (every small learning rate first) would have ASHA promote poor trials for want of better ones.
    """
    import itertools
    import random

    keys = list(space)
    values = [p.grid if p.grid is not None else p.choice for p in space.values()]
    points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)] * repeats
    random.Random(seed).shuffle(points)
    return points


def make_searcher(sweep: SweepConfig, metric: str, mode: str, limit: int, points: list | None = None):
    """The search algorithm; random and grid take the concurrency limit themselves (Tune's
    ``max_concurrent_trials`` applies to searchers such as Optuna only). A grid is given as its points."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if sweep.search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode=mode, sampler=optuna.samplers.TPESampler(seed=sweep.search.seed))
    return BasicVariantGenerator(points_to_evaluate=points, random_state=sweep.search.seed, max_concurrent=limit)


def make_scheduler(sweep: SweepConfig, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = sweep.scheduler
    if s.name == "asha":
        return ASHAScheduler(
            time_attr="training_iteration", max_t=epochs, grace_period=s.grace_period,
            reduction_factor=s.reduction_factor,
        )  # fmt: skip
    if s.name == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=tune_space(sweep.space), quantile_fraction=s.quantile_fraction,
        )  # fmt: skip
    return FIFOScheduler()


def _to_tune_callback(queue):
    from ray.train.v2.api.callback import UserCallback

    class ToTune(UserCallback):
        """Runs in the Train controller: hands rank 0's metrics and the checkpoint path to the trial."""

        def __init__(self, q) -> None:
            self.q = q

        def after_report(self, run_context, metrics, checkpoint) -> None:
            self.q.put((metrics[0], checkpoint.path if checkpoint else None))

    return ToTune(queue)


def _child_run(uri: str, sweep_run: str, parent_id: str, trial_id: str, recipe: TrainRecipe) -> str:
    """The trial's MLflow run: the one it made before an interruption, or a new child of the sweep's run."""
    from mlflow import MlflowClient

    from training.launch import start_run

    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    found = client.search_runs([exp], f"tags.`{SWEEP}` = '{sweep_run}' and tags.`{TRIAL}` = '{trial_id}'")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    tags = {PARENT: parent_id, KIND: "trial", SWEEP: sweep_run, TRIAL: trial_id}
    return start_run(recipe, uri, extra_tags=tags, run_name=f"{sweep_run}-{trial_id}")


def trial_params(sweep: SweepConfig, config: dict[str, Any]) -> dict[str, Any]:
    """The recipe fields a trial sets: its sampled parameters, or its replicate's seed and split."""
    if sweep.replicates is not None:
        return sweep.replicates.params(int(config[REPLICATE]), sweep.base().seed)
    return dict(config)


def run_trial(config: dict[str, Any], sweep: dict, uri: str, storage_path: str, parent_id: str, sweep_run: str):
    """One trial (a Tune function): a Ray Train run of the recipe with this trial's fields, its epochs
    reported to Tune as they finish."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from training.launch import fit

    sw = SweepConfig.model_validate(sweep)
    trial_id = tune.get_context().get_trial_id()
    recipe = recipe_with(recipe_tree(sw.recipe), sw.overrides, trial_params(sw, config), f"trial {trial_id}")
    run_id = _child_run(uri, sweep_run, parent_id, trial_id, recipe)
    start, name = None, None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:  # resumed after an interruption, or (PBT) handed another trial's state
        with checkpoint.as_directory() as d:
            pointer = json.loads((Path(d) / POINTER).read_text())
        start = {"path": pointer["path"], "storage": storage_path, "weights_only": pointer["trial"] != trial_id}
        name = f"{recipe.name}-{run_id[:12]}-{uuid.uuid4().hex[:6]}"
        if start["weights_only"]:  # PBT exploit: record whose weights this trial continues from
            from mlflow import MlflowClient

            MlflowClient(uri).set_tag(run_id, "tessera.exploited_from", pointer["run_id"])
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    box: dict[str, Any] = {}

    def train() -> None:
        try:
            box["outcome"] = fit(
                recipe, run_id, uri, storage_path, sw.max_failures, register=False,
                callbacks=[_to_tune_callback(queue)], start_from=start, name=name,
            )  # fmt: skip
        except BaseException as exc:  # re-raised in the trial's thread below
            box["error"] = exc

    thread = threading.Thread(target=train, name="train-run", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            metrics, path = queue.get(timeout=0.5)
        except Empty:
            continue
        if metrics.get("epoch") == recipe.epochs - 1:
            # The last epoch: a scheduler ends the trial on this report, so the run closes first (curves, status).
            thread.join()
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / POINTER).write_text(json.dumps({"path": path, "trial": trial_id, "run_id": run_id}))
            tune.report(metrics | {"mlflow_run_id": run_id}, checkpoint=tune.Checkpoint.from_directory(d))
    thread.join()
    if "error" in box:
        raise box["error"]
    if box["outcome"].error:
        raise RuntimeError(f"trial {trial_id}: training failed: {box['outcome'].error}")


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


def _trainable(sweep: SweepConfig, uri: str, train_storage: str, parent_id: str, sweep_run: str):
    from functools import partial

    from ray import tune

    fn = partial(
        run_trial, sweep=sweep.model_dump(), uri=uri, storage_path=train_storage, parent_id=parent_id,
        sweep_run=sweep_run,
    )  # fmt: skip
    fn.__name__ = "trial"  # Tune names trials after the function
    # The trial function only waits on its Ray Train run, whose workers hold the real resources; even a
    # fraction of a CPU here would keep N trials of N CPUs from fitting (a bundle cannot be empty: 1 byte).
    return tune.with_resources(fn, {"CPU": 0, "memory": 1})


def start_parent(sweep: SweepConfig, uri: str, sweep_run: str, kind: str) -> str:
    """The sweep's parent run: the sweep file and base recipe as params, tagged for lookup and resume."""
    base = sweep.base()
    params = {"sweep.recipe": sweep.recipe, "sweep.kind": kind, "sweep.metric": sweep.objective()[0]}
    params |= {"sweep.mode": sweep.objective()[1], "sweep.search": sweep.search.algorithm}
    params |= {"sweep.scheduler": sweep.scheduler.name, "sweep.num_samples": sweep.search.num_samples}
    params |= {f"space.{k}": json.dumps(p.model_dump(exclude_none=True)) for k, p in sweep.space.items()}
    if sweep.replicates:
        params |= {f"replicates.{k}": v for k, v in sweep.replicates.model_dump().items()}
    tags = {KIND: kind, SWEEP: sweep_run, "recipe": base.name, "git_commit": tracking.git_commit()}
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


def run_sweep(
    sweep: SweepConfig | None,
    uri: str,
    tune_storage: str,
    train_storage: str,
    resume: str | None = None,
    use_gpu: bool | None = None,
) -> SweepOutcome:
    """Run ``sweep`` (or, ``resume`` = a sweep's name, finish an interrupted one: trials that finished are
    kept, unfinished ones continue from their last epoch) on the connected cluster."""
    import ray
    from mlflow import MlflowClient
    from ray import tune

    from training.launch import storage_location, wants_gpu

    if resume:
        sweep_run = resume
        parent_id, sweep = find_parent(uri, resume)
        MlflowClient(uri).update_run(parent_id, status="RUNNING")
    else:
        assert sweep is not None
        sweep_run = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent_id = start_parent(sweep, uri, sweep_run, "replicates" if sweep.replicates else "sweep")
    metric, mode = sweep.objective()
    base = sweep.base()
    print(f"sweep {sweep_run}: MLflow {tracking.run_url_of(uri, parent_id)}", flush=True)
    trainable = _trainable(sweep, uri, train_storage, parent_id, sweep_run)
    path, fs = storage_location(tune_storage)
    ok: bool | None = False
    try:
        if resume:
            tuner = tune.Tuner.restore(
                f"{path.rstrip('/')}/{sweep_run}", trainable, resume_unfinished=True, resume_errored=True,
                storage_filesystem=fs,
            )  # fmt: skip
        else:
            gpu = wants_gpu(base) if use_gpu is None else use_gpu
            limit = sweep.max_concurrent or concurrency(base, ray.cluster_resources(), gpu)
            points, samples = None, sweep.search.num_samples
            if sweep.replicates:
                space = {REPLICATE: tune.grid_search(list(range(sweep.replicates.n)))}
            elif sweep.search.algorithm == "grid":
                points = grid_points(sweep.space, sweep.search.seed, sweep.search.num_samples)
                space = {k: tune.choice(p.grid if p.grid is not None else p.choice) for k, p in sweep.space.items()}
                samples = len(points)
            else:
                space = tune_space(sweep.space)
            searcher = make_searcher(sweep, metric, mode, limit, points)  # PBT samples its starting points with it too
            own_limit = sweep.search.algorithm != "optuna"  # the variant generator takes the limit itself
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    metric=metric, mode=mode, num_samples=samples,
                    search_alg=searcher, scheduler=make_scheduler(sweep, base.epochs),
                    max_concurrent_trials=None if own_limit else limit,
                ),
                run_config=tune.RunConfig(name=sweep_run, storage_path=path, storage_filesystem=fs),
            )  # fmt: skip
        grid = tuner.fit()
        if interrupted(grid, expected_trials(sweep)):  # Ctrl+C: Tune saved its state and returned early
            MlflowClient(uri).set_terminated(parent_id, "KILLED")
            ok = None
            raise SweepInterrupted(f"sweep {sweep_run} interrupted; finish it with: tessera tune --resume {sweep_run}")
        outcome = summarise(grid, sweep, uri, parent_id, sweep_run, metric, mode)
        ok = True
        return outcome
    finally:
        if ok is not None:
            tracking.finish_run(uri, parent_id, ok)


class SweepInterrupted(KeyboardInterrupt):
    """The sweep stopped before all trials ended; its state is saved for ``--resume``."""


def expected_trials(sweep: SweepConfig) -> int:
    """How many trials the sweep runs in all (grid axes multiply ``num_samples``)."""
    if sweep.replicates:
        return sweep.replicates.n
    n = sweep.search.num_samples
    for p in sweep.space.values():
        if p.grid is not None or (sweep.search.algorithm == "grid" and p.choice is not None):
            n *= len(p.grid if p.grid is not None else p.choice)
    return n


def interrupted(grid, expected: int) -> bool:
    """True when trials are missing or some did not end (terminated or errored)."""
    trials = grid._experiment_analysis.trials  # the ResultGrid's trials with their Tune status
    return len(trials) < expected or any(t.status not in ("TERMINATED", "ERROR") for t in trials)


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
    table = pd.DataFrame(rows)
    epochs = sweep.base().epochs
    for row in rows:
        if row["status"] != "ok" or not row["run_id"]:
            continue
        run = client.get_run(row["run_id"])
        # A trial the scheduler stopped ends with its process: its run is left RUNNING, or FAILED when the
        # training thread saw its workers go first. Tune's verdict (no error) is what counts.
        if run.info.status != "FINISHED":
            # Its run may hold an epoch or two more than the scheduler counted (training went on until the
            # trial's process ended); the tag says where the scheduler stopped it.
            client.set_tag(run.info.run_id, "tessera.stopped_early", f"scheduler, after epoch {row['epochs']}")
            client.set_terminated(run.info.run_id, "FINISHED")
    best_col = f"best.{metric}"
    scored = table.dropna(subset=[best_col]) if best_col in table else table.iloc[0:0]
    best_run, best_params, best_value = None, {}, None
    if not scored.empty:
        best = scored.loc[scored[best_col].idxmin() if mode == "min" else scored[best_col].idxmax()]
        best_run, best_value = best["run_id"], float(best[best_col])
        best_params = {k[len("param.") :]: _plain(best[k]) for k in table.columns if k.startswith("param.")}
        client.set_tag(best_run, BEST, "true")
        client.set_tag(parent_id, "best_run_id", best_run)
        logger = tracking.RunLogger(uri, parent_id)
        logger.metrics({f"best_{metric}": best_value, "trials": len(table)}, 0)
        for k, v in best_params.items():
            client.log_param(parent_id, f"best.{k}", v)
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
