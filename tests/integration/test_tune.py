"""Sweeps, replicates and comparison on the real stack: Ray Tune trials that are Ray Train runs, MLflow
parent/child runs, an interrupted sweep resumed, and two replicate groups compared."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from shards import storage
from tests.datasets import make_dataset
from training.tracking import has_artifact
from tune.config import SweepConfig, replicate_sweep
from tune.runs import BEST, KIND, LAST_REPORT, PARENT, SWEEP
from tune.sweep import grid_points, run_sweep

OVERRIDES = ["data.image_size=32", "batch_size=4", "workers=1", "eval.levels=[patient]"]


@pytest.fixture(scope="module")
def work(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("tune")
    make_dataset(str(work / "ds"), {"train": 16, "val": 8}, size=32, shard_samples=4)
    return work


def _overrides(work, epochs: int) -> list[str]:
    return [f"data.dataset={work / 'ds'}", f"epochs={epochs}", *OVERRIDES]


def _stores(work) -> dict:
    return {"tune_storage": str(work / "sweeps"), "train_storage": str(work / "ckpt")}


def _children(client, parent_id):
    exp = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp], f"tags.`{PARENT}` = '{parent_id}'")


def test_asha_sweep_tracks_parent_and_children(stack, work):
    sweep = SweepConfig(
        name="it-asha",
        recipe="demo_tiles",
        overrides=_overrides(work, 3),
        space={"optim.lr": {"grid": [1e-3, 3e-3, 0.5, 0.8]}, "optim.name": {"choice": ["adamw"]}},
        search={"algorithm": "grid", "num_samples": 1},
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        max_concurrent=2,
    )
    out = run_sweep(sweep, stack.mlflow_url, **_stores(work))
    client = MlflowClient(stack.mlflow_url)
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[KIND] == "sweep"
    assert parent.data.tags["best_run_id"] == out.best_run_id
    assert parent.data.metrics["best_val_loss"] == pytest.approx(out.best_metric)
    assert {"best.optim.lr", "best.optim.name"} <= set(parent.data.tags)
    assert {a.path for a in client.list_artifacts(out.parent_run_id)} >= {
        "trials.csv", "parallel_coordinates.png", "sweep.yaml"
    }  # fmt: skip
    children = _children(client, out.parent_run_id)
    assert len(children) == 4 and out.trials == 4 and out.errors == 0
    assert all(c.info.status == "FINISHED" for c in children)
    assert [c.info.run_id for c in children if c.data.tags.get(BEST) == "true"] == [out.best_run_id]
    # every epoch reached the scheduler: the trials it kept ran all 3 epochs, and exactly the ones it stopped
    # earlier are tagged with where it stopped them (trials.csv holds the epochs the scheduler counted)
    with tempfile.TemporaryDirectory() as d:
        table = pd.read_csv(client.download_artifacts(out.parent_run_id, "trials.csv", d))
    counted = dict(zip(table["run_id"], table["epochs"], strict=True))
    stopped = {c.info.run_id: c.data.tags.get("tessera.stopped_early") for c in children}
    assert {r for r, tag in stopped.items() if tag} == {r for r, n in counted.items() if n < 3}
    assert 3 in counted.values() and min(counted.values()) >= 1 and any(stopped.values())
    for run_id, tag in stopped.items():
        if tag:
            assert tag == f"scheduler, after epoch {counted[run_id]}"
        # each run trained and logged just the epochs the scheduler saw: workers wait for its verdict on each
        # (a stopped one's used to go on for an epoch or two until its process ended)
        assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == list(range(counted[run_id]))
    # at most two trials at a time (max_concurrent): the grid's first two points (seeded order) start first
    starts = sorted((c.info.start_time, float(c.data.params["optim.lr"])) for c in children)
    first = sorted(p["optim.lr"] for p in grid_points(sweep.space, sweep.search.seed)[:2])
    assert sorted(lr for _, lr in starts[:2]) == first
    best = [m.value for m in client.get_metric_history(out.best_run_id, "val_loss")]
    assert min(best) == pytest.approx(out.best_metric)


def _wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(stack, work):
    sweep_file = work / "grid.yaml"
    sweep_file.write_text(
        yaml.safe_dump(
            {
                "name": "it-grid",
                "recipe": "demo_tiles",
                "overrides": _overrides(work, 2),
                "space": {"optim.lr": {"grid": [1e-3, 1e-2]}},
                "search": {"algorithm": "grid", "num_samples": 1},
                "scheduler": {"name": "none"},
                "max_concurrent": 1,
            }
        )
    )
    # Sweep state and trial checkpoints on the stack's S3, as on a multi-node cluster: the resume reads them there.
    sweeps, trials = f"s3://{stack.checkpoints_bucket}/it-sweeps", f"s3://{stack.checkpoints_bucket}/it-trials"
    env = dict(os.environ, TESSERA_SWEEPS_URL=sweeps, TESSERA_CHECKPOINTS_URL=trials)
    cmd = [sys.executable, "-m", "cluster.cli", "tune", str(sweep_file)]
    log_path = work / "interrupted.log"  # a file, not a pipe: Ray's output would fill a pipe and block the sweep
    client = MlflowClient(stack.mlflow_url)

    def first_finished():
        """The first trial's run, as soon as it has finished. A trial's run closes just before its last report to
        Tune: interrupted between the two, the trial is still running for Tune, and on resume it gives Tune the
        report its run kept before closing rather than train its last epoch again (tune.runs.LAST_REPORT; before,
        CI saw the run's end time move)."""
        exps = [e.experiment_id for e in client.search_experiments()]  # the sweep may create its experiment
        runs = client.search_runs(exps, f"tags.`{KIND}` = 'trial' and tags.`{SWEEP}` like 'it-grid-%'")
        done = [r for r in runs if r.info.status == "FINISHED"]
        assert all(has_artifact(client, r.info.run_id, LAST_REPORT) for r in done)  # kept before it closed
        return done[0] if done else None

    with open(log_path, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            finished = _wait_for(first_finished, 300, "the first trial to finish")
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=120)
    log = log_path.read_text()
    assert proc.returncode == 130, log[-3000:]
    sweep_run = finished.data.tags[SWEEP]
    assert f"tessera tune --resume {sweep_run}" in log
    parent_id = client.get_run(finished.info.run_id).data.tags[PARENT]
    assert client.get_run(parent_id).info.status == "KILLED"
    assert any(storage.list_urls(f"{sweeps}/{sweep_run}/")), "no sweep state on S3"

    resumed = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "tune", "--resume", sweep_run],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert client.get_run(parent_id).info.status == "FINISHED"
    children = _children(client, parent_id)
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    lrs = sorted(float(c.data.params["optim.lr"]) for c in children)
    assert lrs == [1e-3, 1e-2]  # one run per grid point: none duplicated, none lost
    again = client.get_run(finished.info.run_id)
    assert again.info.end_time == finished.info.end_time  # the finished trial did not run again
    for c in children:
        steps = [m.step for m in client.get_metric_history(c.info.run_id, "train_loss")]
        # the interrupted trial may log the epoch it was in again when it continues; every trial has both
        assert set(steps) == {0, 1}, f"trial {c.info.run_name}: epochs {steps}"
    steps = [m.step for m in client.get_metric_history(finished.info.run_id, "train_loss")]
    assert steps == [0, 1]


def test_replicate_groups_compared(stack, work):
    a = run_sweep(replicate_sweep("demo_tiles", _overrides(work, 1), 2), stack.mlflow_url, **_stores(work))
    # group B re-splits: three patient folds, each replicate validating on two of them (paper 002's protocol);
    # a fixed test split is evaluated by every replicate's selected model. Two replicates a group: one round of
    # the stack's two CPUs (the statistics themselves are unit-tested)
    splits = {"f0": 8, "f1": 8, "f2": 8, "test": 8}
    make_dataset(str(work / "folds"), splits, size=32, shard_samples=4, seed=5)
    b_overrides = [*_overrides(work, 1), f"data.dataset={work / 'folds'}", "optim.lr=1e-5"]
    b_sweep = replicate_sweep("demo_tiles", b_overrides, 2, resplit_folds=["f0", "f1", "f2"])
    b = run_sweep(b_sweep, stack.mlflow_url, **_stores(work))
    client = MlflowClient(stack.mlflow_url)
    seeds = sorted(int(c.data.params["seed"]) for c in _children(client, a.parent_run_id))
    assert seeds == [0, 1]
    b_runs = _children(client, b.parent_run_id)
    for run in b_runs:
        train, val = run.data.params["data.train_split"], run.data.params["data.val_split"]
        assert sorted([train, *val.split("+")]) == ["f0", "f1", "f2"]
        # one fold trains, two folds together validate (8 + 8 samples)
        assert run.data.params["data.train_samples"] == "8" and run.data.params["data.val_samples"] == "16"
    assert len({r.data.params["data.train_split"] for r in b_runs}) > 1  # not one split repeated
    assert all("test_accuracy" in r.data.metrics and "test_patient_accuracy" in r.data.metrics for r in b_runs)
    assert not any("test_accuracy" in r.data.metrics for r in _children(client, a.parent_run_id))  # no test split
    # compared through the CLI, as a user compares them: the report is printed and logged
    cli = subprocess.run(
        [*[sys.executable, "-m", "cluster.cli", "compare", a.name, b.name], "--metrics", "val_loss,val_accuracy",
         "--alpha", "0.01"],
        env=dict(os.environ), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert f"# {a.name} (A) vs {b.name} (B)" in cli.stdout and "alpha = 0.01" in cli.stdout
    assert "## val_loss" in cli.stdout and "Mann-Whitney U" in cli.stdout and "Cohen's d" in cli.stdout
    (run_id,) = re.findall(r"comparison logged: http\S*/runs/(\w+)", cli.stdout)
    names = {a.path for a in client.list_artifacts(run_id, "comparison")}
    assert {
        "comparison/report.md", "comparison/box_val_loss.png", "comparison/confusion_mean_A.png",
        "comparison/comparison.json",
    } <= names  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        found = json.loads(Path(client.download_artifacts(run_id, "comparison/comparison.json", d)).read_text())
    assert [c["metric"] for c in found] == ["val_loss", "val_accuracy"]
    assert all(c["a"]["n"] == 2 and c["b"]["n"] == 2 for c in found)


def test_optuna_search_suggests_every_trial(stack, tmp_path):
    """The sweep's Optuna searcher (TPE, seeded) drives a Tune run; its study holds every trial's result."""
    from ray import tune

    from tune.sweep import make_searcher, tune_space

    sweep = SweepConfig(
        name="toy",
        recipe="demo_tiles",
        space={"optim.lr": {"loguniform": [1e-5, 1e-1]}, "optim.name": {"choice": ["adamw", "sgd"]}},
        search={"algorithm": "optuna", "num_samples": 6, "seed": 0},
        scheduler={"name": "none"},
    )

    def toy(config):
        bonus = 1.0 if config["optim.name"] == "adamw" else 0.0
        tune.report({"score": bonus - (math.log10(config["optim.lr"]) + 3) ** 2})

    searcher = make_searcher(sweep, "score", "max", 2)
    grid = tune.Tuner(
        tune.with_resources(toy, {"CPU": 0.5}),
        param_space=tune_space(sweep.space),
        tune_config=tune.TuneConfig(metric="score", mode="max", num_samples=6, search_alg=searcher),
        run_config=tune.RunConfig(name="optuna-toy", storage_path=str(tmp_path)),
    ).fit()
    reported = sorted(round(r.metrics["score"], 9) for r in grid)
    study = searcher._ot_study  # the Optuna study behind Ray Tune's OptunaSearch
    assert len(study.trials) == 6
    assert sorted(round(t.value, 9) for t in study.trials) == reported
    assert {t.params["optim.name"] for t in study.trials} <= {"adamw", "sgd"}


def test_pbt_continues_a_trial_from_anothers_weights(stack, work):
    sweep = SweepConfig(
        name="it-pbt",
        recipe="demo_tiles",
        overrides=_overrides(work, 4),
        space={"optim.lr": {"loguniform": [1e-4, 3e-2]}},
        # Ranked by their (constant) learning rate, not val_loss: on a tiny dataset the two trials' losses cross
        # from epoch to epoch. With a fixed ranking the lower trial is the one exploited.
        metric="lr",
        mode="max",
        search={"algorithm": "random", "num_samples": 2, "seed": 3},
        # Synchronous: both trials pause at epoch 2 and are perturbed together, so the exploit does not depend on
        # the two trials running side by side (asynchronous PBT compares a report only with the other trial's
        # last one while that trial still runs, and on CI one trial's start once lagged the other's whole run).
        scheduler={"name": "pbt", "perturbation_interval": 2, "quantile_fraction": 0.5, "synch": True},
        max_concurrent=2,
    )
    stores = _stores(work) | {"train_storage": str(work / "ckpt-pbt")}  # its own, to count what is left
    out = run_sweep(sweep, stack.mlflow_url, **stores)
    client = MlflowClient(stack.mlflow_url)
    children = _children(client, out.parent_run_id)
    assert len(children) == 2 and out.errors == 0 and all(c.info.status == "FINISHED" for c in children)
    exploited = [c for c in children if "tessera.exploited_from" in c.data.tags]
    assert len(exploited) == 1, "PBT did not exploit the lower trial once"
    (c,) = exploited
    (other,) = [o for o in children if o is not c]
    assert c.data.tags["tessera.exploited_from"] == other.info.run_id
    own = float(c.data.params["optim.lr"])
    assert own < float(other.data.params["optim.lr"])
    # It went on from the other trial's checkpoint of the interval's end (the start of epoch 2, 0-based) with a
    # mutated learning rate and trained the last two epochs: a trial's last report ends it (``done``) and is
    # never perturbed (CI once saw a trial restarted from the other's last epoch that trained nothing). Its
    # workers waited for each verdict, so each epoch is logged once (before, they ran ahead of a pause).
    assert [m.value for m in client.get_metric_history(c.info.run_id, "resumed_at_epoch")] == [2]
    history = sorted(client.get_metric_history(c.info.run_id, "lr"), key=lambda m: m.step)
    assert [m.step for m in history] == [0, 1, 2, 3]
    lrs = [m.value for m in history]
    assert lrs[:2] == pytest.approx([own, own]) and lrs[2] == lrs[3] != pytest.approx(own), lrs
    # The better trial was paused there too and went on from its own checkpoint, each epoch logged once.
    assert [m.step for m in client.get_metric_history(other.info.run_id, "lr")] == [0, 1, 2, 3]
    assert [m.value for m in client.get_metric_history(other.info.run_id, "resumed_at_epoch")] == [2]
    # Every checkpoint was kept while the sweep ran (an exploit may take any); once it ended, each trial's last.
    left = [p for p in (work / "ckpt-pbt").rglob("checkpoint_*") if p.is_dir()]
    assert len(left) == 2 and all(list(p.rglob("*_model_states.pt")) for p in left)
