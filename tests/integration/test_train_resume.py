"""Fault tolerance of training on the real stack: a worker SIGKILLed mid-epoch (ZeRO-2, two workers) is replaced
and the run resumes from its checkpoint at the right epoch; a run that failed outright continues with
``--resume``, its checkpoints on the stack's S3 (every rank's ZeRO shards there, as on a multi-node cluster). On
the CPU with fixed seeds both end with exactly the weights of an uninterrupted run. A failed run also continues
on another number of workers."""

import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from shards import manifest as mf
from tests.datasets import make_dataset
from training.config import load_recipe
from training.engine import checkpoint_weights, partition_ranks
from training.launch import FAULT_ENV, resume_training, run_training, storage_location
from training.live_runs import DRIVER_TAG, driver_tag


@pytest.fixture(scope="module")
def setup(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("train-resume")
    make_dataset(str(work / "ds"), {"train": 24, "val": 8}, size=32, shard_samples=4)
    overrides = [
        f"data.dataset={work / 'ds'}",
        "data.image_size=32",
        "data.augment={hflip: 0.5, vflip: 0.5, rotate_p: 0.5}",
        "epochs=3",
        "batch_size=4",
        "workers=2",
        "deepspeed.zero_stage=2",
        "schedule.name=cosine",
        "eval.levels=[patient]",
    ]
    recipe = load_recipe("demo_tiles", overrides)
    baseline = run_training(recipe, stack.mlflow_url, str(work / "ckpt"))
    weights, run = checkpoint_weights(baseline.checkpoint), baseline.run_id
    return {"recipe": recipe, "overrides": overrides, "work": work, "baseline": weights, "baseline_run": run}


def _same(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert different == [], f"weights differ from the uninterrupted run: {different[:5]}"


def _history(stack, run_id, key):
    return [(m.step, m.value) for m in MlflowClient(stack.mlflow_url).get_metric_history(run_id, key)]


def test_killed_worker_resumes_from_checkpoint(setup, stack, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "1,1,1")  # epoch 1, step 1 of 3, rank 1
    out = run_training(setup["recipe"], stack.mlflow_url, str(setup["work"] / "ckpt"))
    assert MlflowClient(stack.mlflow_url).get_run(out.run_id).info.status == "FINISHED"
    assert _history(stack, out.run_id, "resumed_at_epoch") == [(1, 1.0)]
    assert sorted(s for s, _ in _history(stack, out.run_id, "val_loss")) == [0, 1, 2]
    _same(checkpoint_weights(out.checkpoint), setup["baseline"])
    _same_validation(stack, out.run_id, setup["baseline_run"])


def _same_validation(stack, run_id: str, baseline_run: str) -> None:
    """Every epoch's validation equals the uninterrupted run's, the first after the restore too: the ranks
    validate one model (BatchNorm statistics averaged over them), which the checkpoint holds whole."""
    for key in ("val_loss", "val_patient_accuracy"):
        assert sorted(_history(stack, run_id, key)) == sorted(_history(stack, baseline_run, key)), key


def test_a_worker_lost_in_the_held_out_step_is_replaced_and_the_step_completes(setup, stack, monkeypatch):
    """The held-out evaluation runs on the training's workers after its last epoch. Rank 1 killed there: the
    group restarts from the last checkpoint, trains no more epochs, and evaluates; no error is left tagged."""
    work = setup["work"]
    make_dataset(str(work / "ds-test"), {"train": 8, "val": 4, "test": 8}, size=32, shard_samples=4)
    recipe = setup["recipe"].model_copy(update={"epochs": 2})
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"dataset": str(work / "ds-test")})})
    monkeypatch.setenv(FAULT_ENV, "2,0,1")  # epoch 2 of 2: the held-out step
    out = run_training(recipe, stack.mlflow_url, str(work / "ckpt-held-out"))
    run = MlflowClient(stack.mlflow_url).get_run(out.run_id)
    assert run.info.status == "FINISHED" and out.error is None and out.held_out_error is None
    assert _history(stack, out.run_id, "resumed_at_epoch") == [(2, 2.0)]  # restored after its last epoch
    assert sorted(s for s, _ in _history(stack, out.run_id, "val_loss")) == [0, 1]  # no epoch trained again
    assert "held_out_error" not in run.data.tags  # rank 0's report of the lost peer, removed by the retry
    assert {"test_accuracy", "test_patient_accuracy"} <= set(out.held_out.metrics)


def _s3_objects(stack, bucket: str, prefix: str) -> list[str]:
    from shards.storage import s3_client

    pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_failed_run_continues_with_resume(setup, stack, monkeypatch):
    storage = f"s3://{stack.checkpoints_bucket}/it-resume"
    run, failed = _failed_run(stack, setup["recipe"], storage, monkeypatch)
    client = MlflowClient(stack.mlflow_url)
    assert run.data.tags[DRIVER_TAG] == driver_tag()  # who trained it (a `--resume` meanwhile is refused)
    # said in one line (Ray Train's own message holds rank 0's traceback), with the epochs done and `--resume`
    assert re.fullmatch(r"rank 0: \w+: [^\n]*(died|dead)[^\n]*", failed.error), failed.error
    assert failed.resume == (
        f"run {failed.run_id} has 2 of 3 epochs in its last checkpoint; "
        f"`tessera train --resume {failed.run_id}` continues it from epoch 3"
    )

    # The dataset changed since the run started: grown (ingest --append) or made again. A resumed run would train
    # on other data than its first epochs did, so either is refused before any worker starts.
    manifest_file = setup["work"] / "ds" / mf.MANIFEST_NAME
    original = manifest_file.read_bytes()
    first = mf.Manifest.model_validate_json(original)
    change = mf.Amendment(time="t", added=1, previous_sha256=mf.sha256_of(original))
    for changed, says in ((first.model_copy(update={"amended": [change]}), "was amended"), (first, "was made again")):
        manifest_file.write_text(changed.model_dump_json(indent=1))
        with pytest.raises(ValueError, match=f"ds {says}.* since run {run.info.run_id} started"):
            resume_training(run.info.run_id, stack.mlflow_url, storage)
    manifest_file.write_bytes(original)

    out = resume_training(run.info.run_id, stack.mlflow_url, storage)
    assert out.run_id == run.info.run_id and client.get_run(out.run_id).info.status == "FINISHED"
    assert _history(stack, out.run_id, "resumed_at_epoch") == [(2, 2.0)]
    assert out.model_version is not None
    _same_validation(stack, out.run_id, setup["baseline_run"])
    assert out.checkpoint.startswith(storage + "/")
    keys = _s3_objects(stack, stack.checkpoints_bucket, out.checkpoint.split("/", 3)[3])
    assert any(k.endswith("zero_pp_rank_0_mp_rank_00_optim_states.pt") for k in keys), keys
    assert any(k.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for k in keys), keys  # rank 1's shard too
    _same(checkpoint_weights(out.checkpoint), setup["baseline"])


def _failed_run(stack, recipe, storage, monkeypatch):
    """A run of ``recipe`` that fails in its third epoch (checkpoints of epochs 0 and 1 kept): its MLflow run and
    the training's outcome."""
    monkeypatch.setenv(FAULT_ENV, "2,0,0")
    failed = run_training(recipe, stack.mlflow_url, storage, max_failures=0)
    monkeypatch.delenv(FAULT_ENV)
    run = MlflowClient(stack.mlflow_url).get_run(failed.run_id)
    assert run.info.status == "FAILED" and run.data.tags["workers_used"] == str(recipe.workers)
    return run, failed


def _universal_folders() -> tuple[set[str], set[str]]:
    """The names of this node's shared universal-checkpoint folders (with their reader markers) and of their lock
    files (see :func:`training.engine.universal_checkpoint`)."""
    found = {p.name for p in Path(tempfile.gettempdir()).glob("tessera-universal-*")}
    locks = {n for n in found if n.endswith(".lock")}
    return found - locks, locks


@pytest.mark.parametrize(("before", "after", "stage"), [(1, 2, "0"), (2, 1, "3")])
def test_a_run_continues_on_another_worker_count(setup, stack, monkeypatch, before, after, stage):
    """``--resume RUN workers=N``. One worker runs ZeRO-2 as stage 0, whose checkpoint is not partitioned and
    continues on two as it is; two workers' ZeRO-3 partitions are made universal and read by one. (Two ranks'
    ZeRO-2 partitions read by three workers: the Ctrl+C test below; by one, exactly: test_recipes_train.py.)"""
    storage = str(setup["work"] / f"ckpt-{before}-to-{after}-{stage}")
    recipe = setup["recipe"]
    if stage == "3":
        recipe = recipe.model_copy(update={"deepspeed": recipe.deepspeed.model_copy(update={"zero_stage": 3})})
    run, _ = _failed_run(stack, recipe.model_copy(update={"workers": before}), storage, monkeypatch)
    overrides = [f"workers={after}"] + (["cpus_per_worker=0.5"] if after > 2 else [])  # the stack has two CPUs
    folders, locks = _universal_folders()
    out = resume_training(run.info.run_id, stack.mlflow_url, storage, overrides)
    run = MlflowClient(stack.mlflow_url).get_run(out.run_id)
    assert run.info.status == "FINISHED" and out.model_version is not None
    assert run.data.tags["workers_used"] == str(after) and run.data.tags["resume_overrides"] == " ".join(overrides)
    assert run.data.tags["deepspeed.zero_stage_used"] == stage
    assert run.data.params["workers"] == str(before)  # the recipe as started; the tags say where it ended
    assert _history(stack, out.run_id, "resumed_at_epoch") == [(2, 2.0)]
    assert sorted(s for s, _ in _history(stack, out.run_id, "val_loss")) == [0, 1, 2]
    if stage != "0":
        _nothing_left_behind(folders, locks)
    assert partition_ranks(*storage_location(out.checkpoint)) == (0 if stage == "0" else after)


def _nothing_left_behind(folders: set[str], locks: set[str]) -> None:
    """A ZeRO checkpoint made universal through the node's shared folder left nothing behind: its last reader
    removed the folder and its lock file (``folders``, ``locks``: :func:`_universal_folders` before the resume)."""
    now_folders, now_locks = _universal_folders()
    assert now_locks <= locks and now_folders <= folders


def test_ctrl_c_stops_a_run_that_resume_then_finishes_on_three_workers(setup, stack):
    """Ctrl+C in `tessera train`: Ray Train aborts the workers, the CLI says what was done and how to go on
    (status 130), the MLflow run is KILLED, and `--resume` continues it from the last checkpoint to the end, here
    on three workers of half a CPU each (the stack has two CPUs): the two ranks' ZeRO-2 partitions are made
    universal once, in a folder the node's three workers share, which the last of them removes."""
    overrides = [o.replace("epochs=3", "epochs=8") for o in setup["overrides"]]  # time to interrupt it mid-run
    cmd = [sys.executable, "-m", "cluster.cli", "train", "demo_tiles", *overrides]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the first epoch's line: the run is under way, with a checkpoint
        if " epoch 1/8: " in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    # its last registered checkpoint, which Ray Train restores: the workers log each epoch before its controller
    # registers its checkpoint, and go on training while the abort reaches it, so that can be an epoch or two
    # behind the epochs logged
    said = re.search(
        r"tessera: interrupted: run (\w+) has (\d) of 8 epochs in its last checkpoint( \(\d logged\))?; "
        r"`tessera train --resume \1` continues it from epoch (\d)",
        err,
    )
    assert said, err[-2000:]
    run_id, done = said.group(1), int(said.group(2))
    client = MlflowClient(stack.mlflow_url)
    assert client.get_run(run_id).info.status == "KILLED" and 1 <= done < 8 and int(said.group(4)) == done + 1

    folders, locks = _universal_folders()
    overrides = ["workers=3", "cpus_per_worker=0.5"]
    resumed = resume_training(run_id, stack.mlflow_url, stack.checkpoints, overrides)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and resumed.error is None
    assert _history(stack, run_id, "resumed_at_epoch") == [(done, float(done))]  # where the hint said
    assert {s for s, _ in _history(stack, run_id, "val_loss")} == set(range(8))
    assert run.data.tags["workers_used"] == "3" and run.data.tags["resume_overrides"] == " ".join(overrides)
    assert run.data.tags["deepspeed.zero_stage_used"] == "2" and run.data.params["workers"] == "2"
    _nothing_left_behind(folders, locks)
    assert partition_ranks(*storage_location(resumed.checkpoint)) == 3


def test_resume_refuses_a_run_being_trained_now_or_finished(stack, tmp_path):
    """`--resume` of a run whose driver is alive would train it twice at once (one run's checkpoints, one MLflow
    run), and of a finished run trained nothing and evaluated its test split again. A run left RUNNING by a
    driver that is gone (killed, its cluster restarted) is resumed as any stopped run."""
    from training.launch import check_resumable
    from training.live_runs import live_driver

    client = MlflowClient(stack.mlflow_url)
    exp = client.create_experiment("resume-guard", str(tmp_path / "artifacts"))
    tag = driver_tag()  # this test process's Ray job, alive now
    assert tag and live_driver(tag) == tag.split("/")[0]
    run = client.create_run(exp, tags={DRIVER_TAG: tag})
    with pytest.raises(ValueError, match=r"is being trained now \(Ray job \w+ on this cluster\)"):
        check_resumable(client.get_run(run.info.run_id), run.info.run_id)

    job_id, _ = tag.split("/")
    for gone in (f"{job_id}/{'0' * 56}", "7f000000/ab", "no-slash", None):  # another driver, unknown job, bad tag
        assert live_driver(gone) is None
    stale = client.create_run(exp, tags={DRIVER_TAG: f"{job_id}/{'0' * 56}"})
    check_resumable(client.get_run(stale.info.run_id), stale.info.run_id)  # its driver is gone: allowed

    client.set_terminated(run.info.run_id, "FINISHED")
    with pytest.raises(ValueError, match=r"finished: nothing is left to continue; `tessera evaluate"):
        check_resumable(client.get_run(run.info.run_id), run.info.run_id)
    client.set_terminated(stale.info.run_id, "FAILED")
    check_resumable(client.get_run(stale.info.run_id), stale.info.run_id)
