"""A training run whose MLflow server goes away, on the real stack: the server's outage is injected by a
:class:`tests.switched_proxy.SwitchedProxy` between the run (driver and workers) and the stack's MLflow, thrown
from the run's controller after an epoch's report. Brief, the run trains on and every epoch reaches MLflow; lasting
past the last epoch, the run fails, resumable, and ``--resume`` sends what waited."""

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.datasets import make_dataset
from tests.switched_proxy import SwitchedProxy
from training.config import load_recipe
from training.launch import fit, resume_training, start_run
from training.live_runs import DRIVER_TAG
from training.outbox import FOLDER


@pytest.fixture(scope="module")
def work(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("tracking-outage")
    make_dataset(str(work / "ds"), {"train": 8, "val": 4, "test": 4}, size=32, shard_samples=4)
    return work


@pytest.fixture
def proxy(stack, tmp_path):
    proxy = SwitchedProxy(stack.mlflow_port, tmp_path / "switch")
    yield proxy
    proxy.close()


def _recipe(work: Path, epochs: int, wait_s: float):
    overrides = [f"data.dataset={work / 'ds'}", "data.image_size=32", f"epochs={epochs}", "batch_size=4"]
    overrides += ["workers=1", "eval.levels=[patient]", f"tracking.outage_wait_s={wait_s}"]
    return load_recipe("demo_tiles", overrides)


def switch_after(switch: Path, reports: Path, states: dict[int, str]):
    """A Ray Train callback (run in the controller) that sets the proxy's switch to ``states[epoch]`` after that
    epoch's report, and notes each report's epoch and checkpoint folder in ``reports``; and the gate that holds
    rank 0 after each report until then (a sweep's, :func:`training.loop.await_go_ahead`): its next epoch's
    writes come after the switch, whose callback would otherwise lag behind epochs of a tenth of a second."""
    from ray.train.v2.api.callback import UserCallback
    from ray.util.queue import Queue

    class Switch(UserCallback):
        def __init__(self, gate) -> None:
            self.gate = gate

        def after_report(self, run_context, metrics, checkpoint) -> None:
            epoch = int(metrics[0]["epoch"])
            with reports.open("a") as out:
                out.write(json.dumps({"epoch": epoch, "path": checkpoint.path}) + "\n")
            if epoch in states:
                switch.write_text(states[epoch])
            self.gate.put(epoch)

    gate = Queue(actor_options={"num_cpus": 0})
    return Switch(gate), gate


def _reported(reports: Path) -> dict[int, Path]:
    return {r["epoch"]: Path(r["path"]) for r in map(json.loads, reports.read_text().splitlines())}


def _steps(stack, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(stack.mlflow_url).get_metric_history(run_id, key))


def test_a_run_trains_on_through_an_mlflow_outage(stack, work, proxy, tmp_path):
    """Away from after epoch 0's report to after epoch 1's: epoch 1's metrics waited in its checkpoint, and
    reached MLflow with epoch 2's; the run finished, registered its model and evaluated its test split."""
    recipe, reports = _recipe(work, epochs=3, wait_s=600), tmp_path / "reports"
    run_id = start_run(recipe, proxy.url)
    callback, gate = switch_after(proxy.switch, reports, {0: "off", 1: "on"})
    out = fit(recipe, run_id, proxy.url, str(tmp_path / "ckpt"), 0, held_out=True, callbacks=[callback], gate=gate)
    assert out.error is None and out.held_out_error is None, (out.error, out.held_out_error)
    run = MlflowClient(stack.mlflow_url).get_run(run_id)
    assert run.info.status == "FINISHED" and out.model_version is not None
    assert _steps(stack, run_id, "val_loss") == [0, 1, 2] and _steps(stack, run_id, "lr") == [0, 1, 2]
    assert {"test_accuracy", "test_patient_accuracy"} <= set(out.held_out.metrics)
    checkpoints = _reported(reports)
    waited = json.loads((checkpoints[1] / FOLDER / "writes.json").read_text())
    assert waited["run_id"] == run_id
    first = waited["writes"][0]
    assert (first["kind"], first["step"]) == ("metrics", 1) and "val_loss" in first["values"]
    assert not (checkpoints[0] / FOLDER).exists() and not (checkpoints[2] / FOLDER).exists()


def test_an_outage_past_the_last_epoch_fails_the_run_and_resume_sends_what_waited(stack, work, proxy, tmp_path):
    recipe, reports = _recipe(work, epochs=2, wait_s=2), tmp_path / "reports"
    storage = str(tmp_path / "ckpt")
    run_id = start_run(recipe, proxy.url)
    callback, gate = switch_after(proxy.switch, reports, {0: "off"})
    failed = fit(recipe, run_id, proxy.url, storage, 0, held_out=True, callbacks=[callback], gate=gate)
    assert "TrackingUnavailable" in failed.error and f"MLflow ({proxy.url}) took no writes" in failed.error
    assert failed.resume.startswith(f"MLflow ({proxy.url}) does not answer, so run {run_id} stays RUNNING")
    assert MlflowClient(stack.mlflow_url).get_run(run_id).info.status == "RUNNING"
    assert _steps(stack, run_id, "val_loss") == [0]
    assert (_reported(reports)[1] / FOLDER / "writes.json").is_file()

    proxy.switch.write_text("on")
    # `tessera train` has ended there; this test's process, its driver, lives on and would be refused as such
    MlflowClient(stack.mlflow_url).set_tag(run_id, DRIVER_TAG, "gone/0")
    out = resume_training(run_id, proxy.url, storage)
    assert out.error is None and out.model_version is not None
    assert MlflowClient(stack.mlflow_url).get_run(run_id).info.status == "FINISHED"
    assert _steps(stack, run_id, "val_loss") == [0, 1]  # epoch 1's, from the checkpoint; no epoch trained again
    assert {"test_accuracy", "test_patient_accuracy"} <= set(out.held_out.metrics)
