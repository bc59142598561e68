"""`tessera submit`: an ingest and a training submitted as Ray jobs to the local head (token auth), their logs
followed, their MLflow run on the local server; secrets travel to the job without being printed."""

import os
import subprocess
import sys

from mlflow import MlflowClient

from ingest.synthetic import make_slides


def _tessera(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "cluster.cli", *args]
    return subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=timeout)


def test_submit_ingest_and_train_jobs(stack, tmp_path):
    slides = tmp_path / "slides"
    _, labels = make_slides(slides, n=4, size=1024, seed=11)  # two per class: both splits get one of each
    out = "s3://shards/submitted/wsi"
    ingest = _tessera(
        "submit", "--", "tessera", "ingest", "wsi", str(slides), "--out", out, "--labels", str(labels),
        "--tile-size", "128", "--store-size", "32", "--split", "train=0.5,val=0.5",
    )  # fmt: skip
    assert ingest.returncode == 0, (ingest.stdout + ingest.stderr)[-3000:]
    assert "SUCCEEDED" in ingest.stdout and f"shards: {out}" in ingest.stdout  # the job's own output, followed
    secret = stack.s3_keys()[1]
    assert "AWS_SECRET_ACCESS_KEY=<hidden>" in ingest.stdout and secret not in ingest.stdout + ingest.stderr

    train = _tessera(
        "submit", "--", "tessera", "train", "demo_tiles", f"data.dataset={out}", "epochs=1", "workers=1",
        "batch_size=4", "data.image_size=32",
    )  # fmt: skip
    assert train.returncode == 0, (train.stdout + train.stderr)[-3000:]
    # Tessera's line per epoch, followed from the job; not Ray Train's own per report, whole metric dicts in it
    assert "epoch 1/1: train_loss" in train.stdout and "samples/s)" in train.stdout
    assert "TrainingReport(" not in train.stdout + train.stderr, (train.stdout + train.stderr)[-3000:]
    client = MlflowClient(stack.mlflow_url)
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, f"tags.dataset = '{out}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert "val_loss" in runs[0].data.metrics

    jobs = _tessera("jobs", timeout=120)
    assert jobs.returncode == 0
    listed = [line for line in jobs.stdout.splitlines() if "SUCCEEDED" in line]
    assert any("tessera ingest wsi" in line for line in listed) and any("tessera train" in line for line in listed)
    failing = _tessera("submit", "--", "tessera", "train", "no_such_recipe", timeout=300)
    assert failing.returncode == 1 and "FAILED" in failing.stdout


def test_submit_ships_working_dir(stack, tmp_path):
    """``--working-dir`` uploads a folder (local state and caches excluded) and runs the command inside it."""
    job = tmp_path / "job"
    (job / "lib").mkdir(parents=True)
    (job / "lib" / "helper.py").write_text("ANSWER = 42\n")
    (job / "probe.py").write_text(
        "import pathlib, sys\nsys.path.insert(0, 'lib')\nfrom helper import ANSWER\n"
        "print('probe:', ANSWER, sorted(p.name for p in pathlib.Path('.').iterdir()))\n"
    )
    (job / ".tessera").mkdir()
    (job / ".tessera" / "s3.secret").write_text("not for the cluster")
    out = _tessera("submit", "--working-dir", str(job), "--", "python", "probe.py", timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "probe: 42 ['lib', 'probe.py']" in out.stdout
