"""``tessera tune``: Ray Tune sweeps whose trials are Ray Train runs, tracked in MLflow as one parent run per
sweep with a child run per trial.

Each trial is a small Tune function that starts a TorchTrainer (in a thread) and forwards every epoch's
report to Tune with a pointer checkpoint (the Train checkpoint's path), so schedulers see each epoch, an
interrupted sweep resumes (``Tuner.restore``) from each unfinished trial's last epoch, and PBT can hand one
trial's weights to another.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from shards.nodes import alive_resources
from training import tracking
from training.capacity import groups_that_fit
from training.config import TrainRecipe, recipe_tree
from tune.config import Param, SweepConfig, recipe_with
from tune.runs import (
    REPLICATE,
    SweepOutcome,
    child_run,
    find_parent,
    keep_last_report,
    start_parent,
    summarise,
    trial_params,
)

POINTER = "train_checkpoint.json"


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


def concurrency(recipe: TrainRecipe, nodes: list[dict[str, float]], use_gpu: bool) -> int:
    """Trials whose worker groups the nodes (each one's resources) hold side by side. Counted node by node: from
    the cluster's total, 3 nodes of 4 CPUs held two groups of 2 workers of 3 CPUs, and the second trial's group
    waited, its Ray Train controller printing a traceback a minute."""
    fits = groups_that_fit(nodes, recipe.cpus_per_worker, int(use_gpu), recipe.placement, recipe.workers)
    return max(1, fits)


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
            hyperparam_mutations=tune_space(sweep.space), quantile_fraction=s.quantile_fraction, synch=s.synch,
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


def _report(metrics: dict[str, Any], path: str | None, trial_id: str, run_id: str) -> None:
    """Report an epoch to Tune, its checkpoint a pointer to the Ray Train checkpoint at ``path``."""
    from ray import tune

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / POINTER).write_text(json.dumps({"path": path, "trial": trial_id, "run_id": run_id}))
        tune.report(metrics | {"mlflow_run_id": run_id}, checkpoint=tune.Checkpoint.from_directory(d))


def _start_from(checkpoint, trial_id: str, run_id: str, recipe_name: str, storage_path: str, uri: str):
    """Where a trial that Tune hands ``checkpoint`` (resumed after an interruption, or, under PBT, handed another
    trial's state) starts its Ray Train run, and the run's new name; ``(None, None)`` without one."""
    if checkpoint is None:
        return None, None
    with checkpoint.as_directory() as d:
        pointer = json.loads((Path(d) / POINTER).read_text())
    start = {"path": pointer["path"], "storage": storage_path, "weights_only": pointer["trial"] != trial_id}
    if start["weights_only"]:  # PBT exploit: record whose weights this trial continues from
        from mlflow import MlflowClient

        MlflowClient(uri).set_tag(run_id, "tessera.exploited_from", pointer["run_id"])
    return start, f"{recipe_name}-{run_id[:12]}-{uuid.uuid4().hex[:6]}"


def run_trial(config: dict[str, Any], sweep: dict, uri: str, storage_path: str, parent_id: str, sweep_run: str):
    """One trial (a Tune function): a Ray Train run of the recipe with this trial's fields, its epochs
    reported to Tune as they finish."""
    from ray import tune
    from ray.util.queue import Empty, Queue

    from training.console import quiet_libraries
    from training.data import wait_for_store
    from training.launch import fit

    quiet_libraries()
    sw = SweepConfig.model_validate(sweep)
    trial_id = tune.get_context().get_trial_id()
    recipe = recipe_with(recipe_tree(sw.recipe), sw.overrides, trial_params(sw, config), f"trial {trial_id}")
    # a trial started while S3 restarts reads its manifest first: it waits, as a training's workers do
    wait_for_store(recipe.data.dataset, recipe.data.outage_wait_s, f"trial {trial_id}")
    run_id, last = child_run(uri, sweep_run, parent_id, trial_id, recipe)
    if last is not None:  # its run had closed, and the sweep was interrupted before Tune took the last report
        print(f"trial {trial_id}: its run {run_id} had finished; its last report is given to Tune again", flush=True)
        _report(last["metrics"], last["path"], trial_id, run_id)
        return
    start, name = _start_from(tune.get_checkpoint(), trial_id, run_id, recipe.name, storage_path, uri)
    # Under PBT another trial may be handed any checkpoint this one reported, after this one has trained on: Ray
    # Train's pruning (two kept) deleted it first when epochs were short, and the exploit found an empty folder.
    keep = None if sw.scheduler.name == "pbt" else 2
    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    # The epochs Tune let this trial go on after. ASHA and PBT may stop or pause a trial after any epoch, so its
    # workers wait for each verdict; without a scheduler (replicates too) none comes, and they do not wait for
    # nothing (Ray Train reads a report when it next polls its workers: launch.RAY_TRAIN_ENV).
    gate = Queue(actor_options={"num_cpus": 0}) if sw.scheduler.name != "none" else None
    box: dict[str, Any] = {}

    def train() -> None:
        try:
            box["outcome"] = fit(
                recipe, run_id, uri, storage_path, sw.max_failures, register=False,
                held_out=sw.replicates is not None,  # replicates: test_* per run, for `tessera compare`
                callbacks=[_to_tune_callback(queue)], start_from=start, name=name, keep_checkpoints=keep, gate=gate,
            )  # fmt: skip
        except BaseException as exc:  # re-raised in the trial's thread below
            box["error"] = exc

    def closed() -> None:
        """Wait for the run to close; raise what failed in it."""
        thread.join()
        if "error" in box:
            raise box["error"]
        if box["outcome"].error:
            raise RuntimeError(f"trial {trial_id}: training failed: {box['outcome'].error}")

    thread = threading.Thread(target=train, name="train-run", daemon=True)
    thread.start()
    while thread.is_alive() or not queue.empty():
        try:
            metrics, path = queue.get(timeout=0.5)
        except Empty:
            continue
        if metrics.get("done"):
            # The last epoch (or an early stop): Tune ends the trial on this report, so the run closes first
            # (curves, status, held-out step), and an error in that is raised here rather than lost. The report
            # is kept in the run first, for a resume that finds the run FINISHED but the trial not ended.
            keep_last_report(uri, run_id, metrics, path)
            closed()
        _report(metrics, path, trial_id, run_id)
        if gate is not None:  # Tune returns from the report only if the scheduler lets this trial go on
            gate.put(metrics["epoch"])
    closed()


def prune_checkpoints(run_ids: list[str], recipe_name: str, train_storage: str) -> int:
    """Delete the Ray Train checkpoints of a finished PBT sweep's trials, except each trial's newest complete one.

    While the sweep runs its trials keep every checkpoint (another trial may be handed any of them); once it has
    ended only the newest is worth keeping, to train a trial on. A trial's Ray Train runs are the folders
    ``<recipe>-<MLflow run id[:12]>``, and ``...-<suffix>`` for each continuation. Returns how many were deleted.
    """
    import pyarrow.fs as pafs

    from training.launch import has_model_states, run_checkpoints, storage_location

    base, fs = storage_location(train_storage)
    fs = fs or pafs.LocalFileSystem()
    found = fs.get_file_info(pafs.FileSelector(base.rstrip("/"), allow_not_found=True))
    runs = [f for f in found if f.type == pafs.FileType.Directory]
    deleted = 0
    for run_id in run_ids:
        prefix = f"{recipe_name}-{run_id[:12]}"
        mine = [r for r in runs if r.base_name == prefix or r.base_name.startswith(prefix + "-")]
        checkpoints = sorted((c for r in mine for c in run_checkpoints(r.path, fs)), key=lambda c: c.base_name)
        complete = [c for c in checkpoints if has_model_states(c.path, fs)]
        for c in checkpoints:
            if not complete or c.path != complete[-1].path:
                fs.delete_dir(c.path)
                deleted += 1
    return deleted


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


def run_sweep(
    sweep: SweepConfig | None,
    uri: str,
    tune_storage: str,
    train_storage: str,
    resume: str | None = None,
) -> SweepOutcome:
    """Run ``sweep`` (or, ``resume`` = a sweep's name, finish an interrupted one: trials that finished are
    kept, unfinished ones continue from their last epoch) on the connected cluster."""
    from mlflow import MlflowClient
    from ray import tune

    from training.capacity import check_capacity, wants_gpu
    from training.launch import storage_location
    from tune.open_trials import OpenTrials

    if resume:
        sweep_run = resume
        parent_id, sweep = find_parent(uri, resume)
        base = sweep.base()
        MlflowClient(uri).update_run(parent_id, status="RUNNING")
    else:
        assert sweep is not None
        base = sweep.base()
        gpu = wants_gpu(base)  # as each trial's worker group decides it (training.launch.worker_group)
        check_capacity(base, gpu)  # a trial's worker group, before the sweep's MLflow parent exists
        sweep_run = f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent_id = start_parent(sweep, uri, sweep_run, "replicates" if sweep.replicates else "sweep")
    metric, mode = sweep.objective()
    print(f"sweep {sweep_run}: MLflow {tracking.run_url_of(uri, parent_id)}", flush=True)
    trainable = _trainable(sweep, uri, train_storage, parent_id, sweep_run)
    path, fs = storage_location(tune_storage)
    status = "FAILED"
    try:
        if resume:
            tuner = tune.Tuner.restore(
                f"{path.rstrip('/')}/{sweep_run}", trainable, resume_unfinished=True, resume_errored=True,
                storage_filesystem=fs,
            )  # fmt: skip
        else:
            limit = sweep.max_concurrent or concurrency(base, alive_resources(), gpu)
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
                run_config=tune.RunConfig(
                    name=sweep_run, storage_path=path, storage_filesystem=fs, callbacks=[OpenTrials()]
                ),
            )  # fmt: skip
        OpenTrials.count = 0
        grid = tuner.fit()  # a restored tuner brings back its own OpenTrials
        if interrupted(grid, expected_trials(sweep)):  # Ctrl+C: Tune saved its state and returned early
            status = "KILLED"
            raise SweepInterrupted(f"sweep {sweep_run} interrupted; finish it with: tessera tune --resume {sweep_run}")
        outcome = summarise(grid, sweep, uri, parent_id, sweep_run, metric, mode)
        if sweep.scheduler.name == "pbt":
            run_ids = [r.metrics["mlflow_run_id"] for r in grid if (r.metrics or {}).get("mlflow_run_id")]
            pruned = prune_checkpoints(run_ids, base.name, train_storage)
            print(f"sweep {sweep_run}: deleted {pruned} checkpoints PBT no longer needs", flush=True)
        status = "FINISHED"
        return outcome
    except SweepInterrupted:
        raise
    except KeyboardInterrupt as exc:  # SIGTERM (see cluster.cli): Tune's own Ctrl+C path was not taken
        status = "KILLED"
        raise SweepInterrupted(
            f"{exc or 'interrupted'}: finish sweep {sweep_run} with: tessera tune --resume {sweep_run}"
        ) from exc
    finally:
        tracking.finish_run(uri, parent_id, status)


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
    """True when trials are missing or some did not end (terminated or errored) before Tune's loop stopped."""
    from tune.open_trials import OpenTrials

    trials = grid._experiment_analysis.trials  # the ResultGrid's trials with their Tune status
    return (
        OpenTrials.count > 0 or len(trials) < expected or any(t.status not in ("TERMINATED", "ERROR") for t in trials)
    )
