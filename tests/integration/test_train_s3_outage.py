"""The stack's S3 server stopped under a training that reads its dataset from it: the worker whose read fails is
restarted by Ray Train from the last checkpoint, waits for the store (``data.outage_wait_s``) instead of failing
again within seconds, and the run finishes. The outage is real: the stack's ``rclone serve s3`` is stopped from the
run's controller after epoch 0's report (rank 0 held until then) and started again 30 s later, once the restarted
worker has said it waits (boto3's own retries outlast an outage of 10 s: the run never saw that one)."""

import threading
import time
from pathlib import Path

from mlflow import MlflowClient

from cluster.stack import LocalStack
from shards import storage
from tests.datasets import make_dataset
from training.config import load_recipe
from training.launch import fit, start_run

DATASET = "s3://shards/train-outage/ds"


def stop_s3_after(settings, epoch: int):
    """A Ray Train callback (run in the controller) that stops the stack's S3 after ``epoch``'s report, and the
    gate that holds rank 0 after each report until the callback has run."""
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    class StopS3(UserCallback):
        def __init__(self, gate) -> None:
            self.gate = gate

        def after_report(self, run_context, metrics, checkpoint) -> None:
            done = int(metrics[0]["epoch"])
            if done == epoch:
                LocalStack(settings)._stop("s3")
            self.gate.put(done)

    gate = Queue(actor_options={"num_cpus": 0})
    return StopS3(gate), gate


def _waiting_said(settings, since: float) -> bool:
    """Whether a worker of the stack's Ray session has printed, since ``since`` (wall time), that it waits for the
    store (each worker's output goes to its own ``worker-*.out`` there)."""
    logs = Path(settings.ray_temp_dir) / "session_latest" / "logs"
    return any(
        "(data.outage_wait_s)" in p.read_text(errors="ignore")
        for p in logs.glob("worker-*.out")
        if p.stat().st_mtime >= since
    )


def _restart_s3_once_down(settings, seconds: float, said: dict) -> threading.Thread:
    """S3 started again ``seconds`` after it went down and once the restarted worker has said it waits for it: on
    a loaded machine Ray Train took longer than 30 s to restart the worker, which then found the store up again
    and had nothing to wait for (at most 240 s: the assertions then say what did not happen)."""

    def run() -> None:
        deadline = time.monotonic() + 300
        while storage.unreachable(DATASET) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        said["down_at"], down_wall = time.monotonic(), time.time()
        time.sleep(seconds)
        while not _waiting_said(settings, down_wall) and time.monotonic() < said["down_at"] + 240:
            time.sleep(0.5)
        LocalStack(settings).up()
        said["up_at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_run_waits_out_an_s3_outage_and_finishes(stack, tmp_path, capfd):
    make_dataset(DATASET, {"train": 8, "val": 4, "test": 4}, size=32, shard_samples=4)
    overrides = [f"data.dataset={DATASET}", "data.image_size=32", "epochs=2", "batch_size=4", "workers=1"]
    recipe = load_recipe("demo_tiles", [*overrides, "eval.levels=[patient]", "data.outage_wait_s=300"])
    run_id = start_run(recipe, stack.mlflow_url)
    callback, gate = stop_s3_after(stack, epoch=0)
    said: dict = {}
    restarter = _restart_s3_once_down(stack, 30, said)
    try:
        ckpt = str(tmp_path / "ckpt")
        out = fit(recipe, run_id, stack.mlflow_url, ckpt, 2, callbacks=[callback], gate=gate)
    finally:
        restarter.join(timeout=330)
        if storage.unreachable(DATASET):
            LocalStack(stack).up()
    assert "up_at" in said, "S3 was never stopped"
    assert out.error is None, out.error
    client = MlflowClient(stack.mlflow_url)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_loss")) == [0, 1]
    err = capfd.readouterr()
    printed = err.out + err.err
    assert f"the store of {DATASET} does not answer" in printed and "(data.outage_wait_s)" in printed, printed
    assert f"the store of {DATASET} answers again; going on" in printed
