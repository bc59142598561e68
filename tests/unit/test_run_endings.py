"""How a training run that does not finish ends: interrupted (Ctrl+C, SIGTERM) or failed, each said in one line
with what the run has done and the command that continues it; the MLflow run KILLED or FAILED."""

import json
from pathlib import Path

import pytest

from training.config import load_recipe
from training.endings import SNAPSHOT
from training.local_group import free_port


def _ray_checkpoints(storage: Path, run_id: str, epoch: int | None, done: bool = False) -> None:
    """The record Ray Train keeps of a run's checkpoints (in its folder, named as Tessera names the run), with its
    latest at ``epoch`` (None: no checkpoint yet), as Ray 2.60 writes it."""
    folder = storage / f"demo_tiles-{run_id[:12]}"
    folder.mkdir(parents=True)
    metrics = {"epoch": epoch, "done": done}
    latest = None if epoch is None else {"checkpoint_dir_name": "checkpoint_x", "metrics": metrics}
    (folder / SNAPSHOT).write_text(json.dumps({"ray_version": "2.60.0", "latest_checkpoint_result": latest}))


class _Interrupted:
    """A TorchTrainer stand-in that is interrupted as a real one is: a signal arrives during ``fit()``; for SIGINT,
    Ray Train's handler (installed by ``fit``) aborts the run and exits the process with ``SystemExit(0)``."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def fit(self):
        import signal

        def ray_trains(signum, frame):
            raise SystemExit(0)

        signal.signal(signal.SIGINT, ray_trains)
        signal.raise_signal(self.signum)
        raise AssertionError("not interrupted")


@pytest.mark.parametrize(("signum", "said"), [("SIGINT", "interrupted"), ("SIGTERM", "stopped by SIGTERM")])
def test_an_interrupted_run_is_killed_in_mlflow_and_says_how_to_resume(mlflow_uri, signum, said, tmp_path, monkeypatch):
    """Ctrl+C ended `tessera train` with status 1 and not a word, its MLflow run FAILED; SIGTERM (`tessera jobs
    stop`) ended it at once, the run left RUNNING. Either is now an interrupt naming the run and `--resume`."""
    import signal

    from mlflow import MlflowClient

    import training.launch
    from cluster.cli import _stop_on_sigterm
    from training.endings import RunInterrupted
    from training.launch import fit

    uri = mlflow_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", str(tmp_path / "artifacts"))).info.run_id
    for epoch in range(2):  # two epochs logged, the first in the checkpoint Ray Train registered
        client.log_metric(run_id, "train_loss", 0.5, step=epoch)
    _ray_checkpoints(tmp_path / "ckpt", run_id, 0)
    monkeypatch.setattr(training.launch, "trainer_for", lambda *a, **k: _Interrupted(getattr(signal, signum)))
    before = signal.getsignal(signal.SIGINT), signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        with pytest.raises(RunInterrupted) as raised:
            fit(load_recipe("demo_tiles", ["epochs=3"]), run_id, uri, str(tmp_path / "ckpt"))
        assert signal.getsignal(signal.SIGINT) is before[0]  # Ray Train's handler does not outlive the run
    finally:
        signal.signal(signal.SIGINT, before[0])
        signal.signal(signal.SIGTERM, before[1])
    assert str(raised.value) == (
        f"{said}: run {run_id} has 1 of 3 epochs in its last checkpoint (2 logged); "
        f"`tessera train --resume {run_id}` continues it from epoch 2"
    )
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_run_interrupted_before_its_first_epoch_ended_is_said_to_start_again(mlflow_uri, tmp_path):
    from mlflow import MlflowClient

    from training.endings import resume_hint

    uri = mlflow_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", str(tmp_path / "artifacts"))).info.run_id
    assert resume_hint(uri, run_id, 3) == (
        f"run {run_id} stopped before its first epoch ended; `tessera train --resume {run_id}` starts it"
    )


def test_a_stopped_run_is_said_to_continue_from_the_checkpoint_ray_train_restores(mlflow_uri, tmp_path):
    """From Ray Train's record of the run's checkpoints: MLflow's epochs can be one or two ahead of it (rank 0
    logs an epoch before its checkpoint is registered), or behind it (MLflow was away)."""
    from mlflow import MlflowClient

    from training.endings import resume_hint

    uri = mlflow_uri
    client = MlflowClient(uri)
    exp = client.create_experiment("x", str(tmp_path / "artifacts"))
    runs = [client.create_run(exp).info.run_id for _ in range(5)]
    for run_id in runs:
        for epoch in range(3):
            client.log_metric(run_id, "train_loss", 0.5, step=epoch)
    storage = tmp_path / "ckpt"
    hint = {}
    for run_id, epoch, done in ((runs[0], 2, False), (runs[1], None, False), (runs[2], 1, True), (runs[3], 7, False)):
        _ray_checkpoints(storage, run_id, epoch, done)
        hint[run_id] = resume_hint(uri, run_id, 8, f"{storage}/demo_tiles-{run_id[:12]}")
    assert hint[runs[0]] == (
        f"run {runs[0]} has 3 of 8 epochs in its last checkpoint; `tessera train --resume {runs[0]}` continues it "
        "from epoch 4"
    )
    assert hint[runs[1]] == (
        f"run {runs[1]} stopped before its first checkpoint (3 logged); `tessera train --resume {runs[1]}` starts "
        "it from epoch 1"
    )
    for finished in (runs[2], runs[3]):  # stopped early; all epochs trained (it failed in the held-out step)
        assert hint[finished].startswith(f"run {finished} has trained its epochs")
        assert hint[finished].endswith(f"`tessera train --resume {finished}` finishes it, training no more")
    no_folder = resume_hint(uri, runs[4], 8, f"{storage}/nothing-here")
    assert no_folder.startswith(f"run {runs[4]} stopped before its first checkpoint (3 logged)")
    (storage / "garbled").mkdir()
    (storage / "garbled" / SNAPSHOT).write_text("{not json")  # unreadable: as far as MLflow's epochs say
    assert resume_hint(uri, runs[4], 8, str(storage / "garbled")).startswith(f"run {runs[4]} has 3 of 8 epochs logged")


def _worker_group_error(failures: dict):
    """Ray Train's error for a run whose workers failed, as its controller builds it (the message embeds rank 0's
    traceback, cut in the middle)."""
    from ray.train import WorkerGroupError

    return WorkerGroupError("[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n  File ...", failures)


def test_a_failed_runs_reason_is_one_line_per_cause_naming_the_ranks():
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from shards.storage import StorageError
    from training.endings import REASON_CHARS, failure_reason

    down = 's3://shards/ds/train/shard-000000.tar: EndpointConnectionError: Could not connect to "http://s3:9900/"'
    assert failure_reason(_worker_group_error({1: StorageError(down), 0: StorageError(down)})) == (
        f"ranks 0, 1: StorageError: {down}"
    )
    died = RuntimeError(  # Ray's actor error: tab-indented fields between its sentences
        "The actor died unexpectedly before finishing this task.\n\tclass_name: RayTrainWorker\n\tpid: 7\n"
        "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR"
    )
    lost = WorkerHealthCheckFailedError("A worker health check failed.", died)
    assert failure_reason(_worker_group_error({0: StorageError(down), 1: lost})) == (
        f"rank 0: StorageError: {down}; rank 1: WorkerHealthCheckFailedError: A worker health check failed. "
        "The actor died unexpectedly before finishing this task. The actor is dead because its worker process has "
        "died. Worker exit type: SYSTEM_ERROR"
    )
    assert failure_reason(ControllerError(ValueError("no nodes\n  detail"))) == "ValueError: no nodes"
    long = failure_reason(_worker_group_error({0: OSError("x" * 1000)}))
    assert len(long) == len("rank 0: ") + REASON_CHARS and long.endswith("x…")


class _Failing:
    """A TorchTrainer stand-in whose workers fail for good: ``fit()`` raises what Ray Train raises then."""

    def fit(self):
        from shards.storage import StorageError

        raise _worker_group_error({0: StorageError("s3://shards/ds/manifest.json: EndpointConnectionError: down")})


def test_a_failed_run_says_why_in_one_line_and_how_to_resume(mlflow_uri, tmp_path, monkeypatch, capsys):
    """Ray Train raises once a run's retries are spent; `tessera train` ended with its message: rank 0's traceback
    cut in the middle, no word of the epochs done or of `--resume`, and no learning curves. Now the run is FAILED
    with its curves, and the CLI prints the cause and the command that continues it (status 1)."""
    from mlflow import MlflowClient

    import cluster.cli
    import cluster.health
    import training.launch
    from training.launch import fit

    uri = mlflow_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", str(tmp_path / "artifacts"))).info.run_id
    for epoch, loss in enumerate([0.9, 0.7]):  # two epochs done
        client.log_metric(run_id, "train_loss", loss, step=epoch)
    _ray_checkpoints(tmp_path / "ckpt", run_id, 1)
    monkeypatch.setattr(training.launch, "trainer_for", lambda *a, **k: _Failing())
    out = fit(load_recipe("demo_tiles", ["epochs=5"]), run_id, uri, str(tmp_path / "ckpt"))
    reason = "rank 0: StorageError: s3://shards/ds/manifest.json: EndpointConnectionError: down"
    hint = (
        f"run {run_id} has 2 of 5 epochs in its last checkpoint; `tessera train --resume {run_id}` continues it "
        "from epoch 3"
    )
    assert (out.error, out.resume, out.checkpoint, out.model_version) == (reason, hint, None, None)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [a.path for a in client.list_artifacts(run_id)] == ["curve_loss.png"]

    monkeypatch.setattr(cluster.cli, "_connect", lambda s: None)
    monkeypatch.setattr(cluster.health, "require", lambda s, name: None)
    monkeypatch.setattr(training.launch, "run_training", lambda *a, **k: out)
    capsys.readouterr()
    assert cluster.cli.main(["train", "demo_tiles"]) == 1
    said = capsys.readouterr()
    assert said.out == f"MLflow run: {out.run_url}\n"  # no "checkpoint: None"
    assert said.err == f"training failed: {reason}\n{hint}\n"


def test_a_run_failed_while_mlflow_is_down_says_so_at_once(mlflow_uri, tmp_path, monkeypatch):
    """MLflow stopped mid-run: the workers fail once its retries are spent, and then each of the driver's calls
    (curves, epoch count, the FAILED status) retried for about two minutes before the last one raised, so the
    command ended minutes later on MLflow's error instead of the run's. Now it asks whether MLflow answers first."""
    from mlflow import MlflowClient

    import training.launch
    from training import tracking
    from training.launch import fit

    uri = mlflow_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x", str(tmp_path / "artifacts"))).info.run_id
    monkeypatch.setattr(training.launch, "trainer_for", lambda *a, **k: _Failing())
    monkeypatch.setattr(tracking, "answers", lambda uri: False)

    def finish_run(*args):
        raise AssertionError("an MLflow call on a server that does not answer")

    monkeypatch.setattr(tracking, "finish_run", finish_run)
    out = fit(load_recipe("demo_tiles", ["epochs=5"]), run_id, uri, str(tmp_path / "ckpt"))
    assert out.error == "rank 0: StorageError: s3://shards/ds/manifest.json: EndpointConnectionError: down"
    assert out.resume == (
        f"MLflow ({uri}) does not answer, so run {run_id} stays RUNNING there; once it is back, "
        f"`tessera train --resume {run_id}` continues it from its last checkpoint"
    )


def test_whether_mlflow_answers():
    import http.server
    import threading

    from training.tracking import answers

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert answers(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    closed = free_port()
    assert not answers(f"http://127.0.0.1:{closed}", timeout=1)
    assert answers("sqlite:///nowhere.db")  # a local store: no server to be down


def test_a_failed_runs_curves_are_written_without_mlflows_retries(monkeypatch):
    """Its artifact store may be what failed: MLflow retried each upload for four minutes (248 s measured, S3
    down behind a live MLflow) before the command could say why the run failed."""
    import os

    from mlflow.exceptions import MlflowException

    from training.tracking import RunLogger, without_retries

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    closed = free_port()
    with without_retries(timeout_s=5):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
        with pytest.raises(MlflowException):  # at once; with MLflow's retries, minutes later
            RunLogger(f"http://127.0.0.1:{closed}", "run").metrics({"loss": 1.0}, 0)
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120" and "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_a_finished_run_names_its_registered_version_as_models_uri(monkeypatch, capsys):
    """The version is printed as the URI `tessera ingest wsi --background-model` and MLflow take, with its page."""
    import cluster.cli
    import cluster.health
    import training.launch
    from training.launch import TrainOutcome

    url = "http://127.0.0.1:5500/#/experiments/3/runs/" + "a" * 32
    out = TrainOutcome("a" * 32, url, {}, "/ckpt/x", "3", "strip_ai_background")
    monkeypatch.setattr(cluster.cli, "_connect", lambda s: None)
    monkeypatch.setattr(cluster.health, "require", lambda s, name: None)
    monkeypatch.setattr(training.launch, "run_training", lambda *a, **k: out)
    assert cluster.cli.main(["train", "strip_ai_background"]) == 0
    page = "http://127.0.0.1:5500/#/models/strip_ai_background/versions/3"
    assert f"registered model: models:/strip_ai_background/3 ({page})\n" in capsys.readouterr().out


def test_a_run_in_a_store_that_no_server_serves_is_named_not_linked(monkeypatch, capsys):
    """``mlflow_uri`` set to a database or folder: no UI page to link; the run and its model are named."""
    import cluster.cli
    import cluster.health
    import training.launch
    from training.launch import TrainOutcome
    from training.tracking import run_url

    monkeypatch.setenv("TESSERA_MLFLOW_URI", "sqlite:////data/mlflow.db")
    url = run_url("sqlite:////data/mlflow.db", "3", "a" * 32)
    assert url == f"run {'a' * 32} of experiment 3 in sqlite:////data/mlflow.db"
    assert run_url("http://127.0.0.1:5500/", "3", "b") == "http://127.0.0.1:5500/#/experiments/3/runs/b"
    out = TrainOutcome("a" * 32, url, {}, "/ckpt/x", "3", "strip_ai_background")
    monkeypatch.setattr(cluster.cli, "_connect", lambda s: None)
    monkeypatch.setattr(cluster.health, "require", lambda s, name: None)
    monkeypatch.setattr(training.launch, "run_training", lambda *a, **k: out)
    assert cluster.cli.main(["train", "strip_ai_background"]) == 0
    said = capsys.readouterr().out
    assert f"MLflow run: {url}\n" in said and "registered model: models:/strip_ai_background/3\n" in said
