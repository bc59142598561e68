"""Rank 0's MLflow writes while the tracking server is away: kept in order and sent when it answers again, kept
with a checkpoint and sent by the worker resumed from it, waited for after the last epoch. The outage is a fault
injected into ``reachable``; the writes land in a real MLflow store."""

import json
import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from training.outbox import FOLDER, Outbox, TrackingUnavailable, adopt
from training.tracking import RunLogger, start_run


class Switch:
    """Whether the server answers (the injected fault), and how often it was asked."""

    def __init__(self) -> None:
        self.up, self.asked = True, 0

    def __call__(self) -> bool:
        self.asked += 1
        return self.up


class Recorder:
    """A logger that records each write it is given; ``fail`` makes the next write raise."""

    run_id = "run-a"

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.fail: Exception | None = None

    def _call(self, *call) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append(call)

    def metrics(self, values, step, ms=None):
        self._call("metrics", values, step, ms)

    def tag(self, key, value):
        self._call("tag", key, value)

    def untag(self, key):
        self._call("untag", key)

    def artifact(self, path, folder=None):
        self._call("artifact", Path(path).name, folder, Path(path).read_text())

    def artifacts(self, local_dir, folder):
        files = sorted((p.name, p.read_text()) for p in Path(local_dir).iterdir())
        self._call("artifacts", folder, files)


@pytest.fixture
def store(mlflow_uri, tmp_path):
    uri = mlflow_uri
    MlflowClient(uri).create_experiment("outbox", str(tmp_path / "artifacts"))  # not ./mlruns
    _, run_id = start_run(uri, "outbox", "run", {}, {})
    return uri, run_id


def test_writes_made_while_the_server_is_away_reach_it_in_order_with_their_steps_and_times(store, tmp_path):
    uri, run_id = store
    switch = Switch()
    box = Outbox(RunLogger(uri, run_id), switch, "http://mlflow")
    box.metrics({"val_loss": 0.9}, step=0)
    switch.up = False
    picture = tmp_path / "curve.png"
    picture.write_bytes(b"png of epoch 1")
    box.metrics({"val_loss": 0.7, "lr": float("nan")}, step=1)
    box.tag("workers_used", "2")
    box.artifact(picture)
    picture.unlink()  # the caller's temporary folder is gone before the server is back
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0]
    assert box.waiting == 3
    kept_at = json.loads((box.folder / "writes.json").read_text())["writes"][0]["ms"]
    switch.up = True
    box.metrics({"val_loss": 0.5}, step=2)
    assert box.waiting == 0
    history = client.get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.7), (2, 0.5)]
    assert history[1].timestamp == kept_at  # when it was measured, not when it was sent
    assert "lr" not in client.get_run(run_id).data.metrics
    assert client.get_run(run_id).data.tags["workers_used"] == "2"
    local = client.download_artifacts(run_id, "curve.png", str(tmp_path / "down"))
    assert Path(local).read_bytes() == b"png of epoch 1"


def test_nothing_is_sent_and_the_server_is_asked_once_per_write_while_it_is_away(capsys):
    switch, log = Switch(), Recorder()
    box = Outbox(log, switch, "http://mlflow")
    switch.up = False
    for epoch in range(3):
        box.metrics({"loss": 1.0}, epoch)
    assert log.calls == [] and switch.asked == 3  # no MLflow call, whose retries take minutes
    said = capsys.readouterr().out
    assert said.count("MLflow (http://mlflow) takes no writes now (it does not answer); training goes on") == 1
    switch.up = True
    box.tag("a", "b")
    assert [c[0] for c in log.calls] == ["metrics", "metrics", "metrics", "tag"]
    assert "takes writes again; sent the 3 that waited" in capsys.readouterr().out


def test_a_later_upload_to_the_same_place_replaces_a_waiting_one(tmp_path):
    switch, log = Switch(), Recorder()
    box = Outbox(log, switch, "http://mlflow")
    switch.up = False
    for version in ("best at epoch 1", "best at epoch 3"):
        export = tmp_path / version.replace(" ", "-")
        export.mkdir()
        (export / "model.json").write_text(version)
        box.artifacts(export, "model")
    box.artifacts(export, "other")
    switch.up = True
    assert box.flush()
    assert log.calls == [
        ("artifacts", "model", [("model.json", "best at epoch 3")]),
        ("artifacts", "other", [("model.json", "best at epoch 3")]),
    ]
    assert sorted(p.name for p in box.folder.iterdir()) == ["writes.json"]  # the copies are gone once sent


def test_a_write_the_server_fails_waits_and_one_it_refuses_is_raised(capsys):
    """Sent once each: MLflow's own retries of a failed write took four minutes. A server that answers but fails
    writes (HTTP 5xx: its artifact store is down) is away too; a write refused as such (HTTP 4xx) is a fault."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    log = Recorder()
    box = Outbox(log, Switch(), "http://mlflow")
    for failure in (ConnectionResetError("reset by peer"), MlflowException("S3 is down", INTERNAL_ERROR)):
        log.fail = failure
        box.metrics({"loss": 1.0}, 0)
    assert box.waiting == 2 and log.calls == []
    assert "takes no writes now (ConnectionResetError: reset by peer)" in capsys.readouterr().out
    log.fail = MlflowException("metric name has a space", INVALID_PARAMETER_VALUE)
    with pytest.raises(MlflowException, match="space"):
        box.tag("a", "b")
    log.fail = ValueError("a bug")
    with pytest.raises(ValueError, match="bug"):
        box.flush()
    log.fail = None
    box.tag("a", "b")
    assert [c[0] for c in log.calls] == ["metrics", "metrics", "tag"]


def test_writes_are_sent_without_mlflows_retries_in_its_own_time(monkeypatch):
    """Once each, within MLflow's timeout as set (an upload of a model's files needs it, not a metric's 10 s)."""
    seen = []
    log = Recorder()
    log.metrics = lambda *a: seen.append(
        (os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"), os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"))
    )
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "300")
    Outbox(log, Switch(), "http://mlflow").metrics({"loss": 1.0}, 0)
    assert seen == [("0", "300")] and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_what_waits_goes_with_the_checkpoint_to_the_worker_that_resumes_from_it(tmp_path):
    switch, log = Switch(), Recorder()
    box = Outbox(log, switch, "http://mlflow")
    switch.up = False
    picture = tmp_path / "roc.png"
    picture.write_text("roc")
    box.metrics({"loss": 1.0}, 4)
    box.artifact(picture, "plots")
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    box.keep_with(str(checkpoint))
    assert adopt(str(checkpoint), "run-of-another-trial") is None  # a sweep trial started from it
    assert adopt(str(tmp_path / "no-checkpoint"), "run-a") is None and adopt(None, "run-a") is None
    later = Recorder()
    resumed = Outbox(later, Switch(), "http://mlflow", adopt(str(checkpoint), "run-a"))
    assert resumed.waiting == 2
    resumed.metrics({"loss": 0.5}, 5)
    stamped = json.loads((checkpoint / FOLDER / "writes.json").read_text())["writes"][0]["ms"]
    assert later.calls == [
        ("metrics", {"loss": 1.0}, 4, stamped),
        ("artifact", "roc.png", "plots", "roc"),
        ("metrics", {"loss": 0.5}, 5, later.calls[2][3]),
    ]
    empty = tmp_path / "checkpoint-2"
    empty.mkdir()
    resumed.keep_with(str(empty))
    assert list(empty.iterdir()) == []  # nothing waits: a checkpoint as before


def test_after_the_last_epoch_rank_0_waits_for_the_server_then_gives_up_naming_it():
    switch, log = Switch(), Recorder()
    box = Outbox(log, switch, "http://mlflow:5000")
    box.drain(0)  # nothing waits: no wait, whatever the server
    switch.up = False
    box.metrics({"loss": 1.0}, 0)
    gave_up = r"MLflow \(http://mlflow:5000\) took no writes in the 0 s .*\(it does not answer\); 1 writes"
    with pytest.raises(TrackingUnavailable, match=gave_up):
        box.drain(0, poll_s=0)
    answers = iter([False, False, True])
    box.reachable = lambda: next(answers)
    box.drain(60, poll_s=0)
    assert log.calls == [("metrics", {"loss": 1.0}, 0, log.calls[0][3])]


def test_a_drained_outbox_leaves_no_folder_behind_and_one_with_writes_waiting_keeps_it(tmp_path):
    switch, log = Switch(), Recorder()
    box = Outbox(log, switch, "http://mlflow:5000")
    switch.up = False
    box.metrics({"loss": 1.0}, 0)
    box.close()  # a write waits: kept, with the folder that holds it
    assert box.folder.is_dir() and box.waiting == 1
    box.keep_with(str(tmp_path / "ckpt"))
    switch.up = True
    box.drain(0)
    box.close()
    assert not box.folder.exists()
    # the worker resumed from the checkpoint sends what waited there from its own copy, then removes that too
    again = Outbox(log, switch, "http://mlflow:5000", adopt(str(tmp_path / "ckpt"), Recorder.run_id))
    assert again.waiting == 1 and again.folder.is_dir()
    again.drain(0)
    again.close()
    assert not again.folder.exists() and (tmp_path / "ckpt" / FOLDER).is_dir()
