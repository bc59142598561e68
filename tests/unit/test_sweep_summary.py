"""A sweep's summary on its MLflow parent run: the best trial is one that did not fail (finished, or stopped by the
scheduler), and a resumed sweep whose failed trials then did better moves the best (its parameters are tags:
params cannot change)."""

from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow import MlflowClient

from training.tracking import start_run
from tune.config import SweepConfig
from tune.runs import BEST, summarise

SWEEP = SweepConfig(
    name="lr", recipe="demo_tiles", space={"optim.lr": {"loguniform": [1e-4, 1e-2]}}, metric="val_loss", mode="min"
)


@pytest.fixture
def store(mlflow_uri, tmp_path):
    uri = mlflow_uri
    MlflowClient(uri).create_experiment("sweeps", str(tmp_path / "artifacts"))
    _, parent = start_run(uri, "sweeps", "lr-sweep", {}, {})
    return uri, parent


def _trial(uri: str, name: str, lr: float, losses: list[float], status: str, error: bool):
    """A trial's MLflow run ending ``status`` and Tune's result for it (its reports, its error if any)."""
    client = MlflowClient(uri)
    _, run_id = start_run(uri, "sweeps", name, {"optim.lr": lr}, {})
    for step, loss in enumerate(losses):
        client.log_metric(run_id, "val_loss", loss, step=step)
    client.set_terminated(run_id, status)
    frame = pd.DataFrame({"val_loss": losses, "training_iteration": range(1, len(losses) + 1)})
    metrics = {"trial_id": name, "mlflow_run_id": run_id, "training_iteration": len(losses), "val_loss": losses[-1]}
    result = SimpleNamespace(
        metrics=metrics, config={"optim.lr": lr}, error=RuntimeError("S3 down") if error else None,
        metrics_dataframe=frame,
    )  # fmt: skip
    return run_id, result


def test_the_best_is_a_trial_that_finished_and_a_resumed_sweep_may_move_it(store, capsys):
    uri, parent = store
    client = MlflowClient(uri)
    finished, a = _trial(uri, "t0", 1e-3, [0.6, 0.4, 0.5], "FINISHED", error=False)
    failed, b = _trial(uri, "t1", 3e-3, [0.7, 0.1], "FAILED", error=True)  # cut short by an outage
    stopped, c = _trial(uri, "t2", 5e-3, [0.9], "RUNNING", error=False)  # ASHA stopped it after its first epoch

    outcome = summarise([a, b, c], SWEEP, uri, parent, "lr-sweep", "val_loss", "min")
    assert (outcome.best_run_id, outcome.best_metric, outcome.errors) == (finished, 0.4, 1)  # not the failed 0.1
    assert client.get_run(parent).data.tags["best.optim.lr"] == "0.001"
    assert client.get_run(stopped).info.status == "FINISHED"
    assert client.get_run(stopped).data.tags["tessera.stopped_early"] == "scheduler, after epoch 1"
    assert "3 trials (1 failed" in capsys.readouterr().out

    # `tessera tune --resume`: the failed trial trains again from its checkpoint, finishes, and is now the best.
    client.log_metric(failed, "val_loss", 0.2, step=2)
    client.set_terminated(failed, "FINISHED")
    b.error, b.metrics_dataframe = None, pd.DataFrame({"val_loss": [0.7, 0.1, 0.2], "training_iteration": [1, 2, 3]})
    outcome = summarise([a, b, c], SWEEP, uri, parent, "lr-sweep", "val_loss", "min")
    assert (outcome.best_run_id, outcome.best_metric, outcome.errors) == (failed, 0.1, 0)
    tags = client.get_run(parent).data.tags
    assert (tags["best.optim.lr"], tags["best_run_id"]) == ("0.003", failed)
    assert [r for r in (finished, failed, stopped) if client.get_run(r).data.tags.get(BEST) == "true"] == [failed]
