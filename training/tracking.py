"""MLflow: one run per training, created by the driver; rank 0 writes metrics and artifacts into it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MODEL_ARTIFACT = "model"  # the run's exported model folder, the one registered


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str]):
    """Create the run (status RUNNING); returns ``(experiment_id, run_id)``."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    items = [(k, str(v)[:6000]) for k, v in sorted(params.items())]
    from mlflow.entities import Param

    for i in range(0, len(items), 100):
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + 100]])
    return exp_id, run.info.run_id


def served(tracking_uri: str) -> bool:
    """Whether a server (with its UI) holds the runs, not a file or database that ``mlflow_uri`` names."""
    return tracking_uri.startswith(("http://", "https://"))


def run_url(tracking_uri: str, exp_id: str, run_id: str) -> str:
    """The run's page in the tracking server's UI; for a store that is no server, which run of which experiment
    in it, as no page can be linked."""
    if not served(tracking_uri):
        return f"run {run_id} of experiment {exp_id} in {tracking_uri}"
    return f"{tracking_uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def model_url(tracking_uri: str, name: str, version: str) -> str | None:
    """The registered model version's page in the tracking server's UI; None for a store that is no server."""
    return f"{tracking_uri.rstrip('/')}/#/models/{name}/versions/{version}" if served(tracking_uri) else None


def run_url_of(tracking_uri: str, run_id: str) -> str:
    """The run's page in the MLflow UI."""
    from mlflow import MlflowClient

    exp_id = MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return run_url(tracking_uri, exp_id, run_id)


def resolve_run(client, ref: str) -> str:
    """A run id from an id or a unique run name (``strip_ai_resnet50-3f2a...`` as printed, or the MLflow name)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(ref).info.run_id
    except MlflowException:
        pass
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, filter_string=f"attributes.run_name = '{ref}'", max_results=2)
    if len(runs) != 1:
        raise ValueError(f"no single MLflow run has id or name {ref!r} (found {len(runs)})")
    return runs[0].info.run_id


def epoch_history(tracking_uri: str, run_id: str) -> list[dict[str, float]]:
    """Per-epoch rows ``{"epoch": e, metric: value...}`` from the run's metric histories (step = epoch)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    rows: dict[int, dict[str, float]] = {}
    for key in client.get_run(run_id).data.metrics:
        for m in client.get_metric_history(run_id, key):
            rows.setdefault(m.step, {"epoch": m.step})[key] = m.value
    return [rows[e] for e in sorted(rows)]


def has_artifact(client, run_id: str, path: str) -> bool:
    """Whether the run's artifact root holds ``path`` (a file or a folder)."""
    return any(a.path == path for a in client.list_artifacts(run_id))


def register_model(tracking_uri: str, run_id: str, name: str) -> str | None:
    """Register the run's ``model`` artifact folder under ``name``; returns its version (or ``None``: nothing
    exported). A run has one version: resumed, the run re-exports into the same folder the version points to."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    if not has_artifact(client, run_id, MODEL_ARTIFACT):
        return None
    registered = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if registered:
        return str(max(int(v.version) for v in registered))
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="Tessera exports: model.ts, model.safetensors, model.json")
    source = f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"
    version = client.create_model_version(name, source, run_id=run_id, tags={"format": "tessera-model-v2"})
    return str(version.version)  # MLflow gives an int or a string, depending on the call


def server_health(tracking_uri: str, timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the tracking server's ``/health`` answers OK now, and what it said (``tessera status`` shows it)."""
    import requests

    try:
        reply = requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=timeout)
        return reply.status_code == 200, f"HTTP {reply.status_code}"
    except requests.RequestException as exc:
        return False, type(exc).__name__


def answers(tracking_uri: str, timeout: float = 3.0) -> bool:
    """Whether the tracking server answers now (a local store always does). Asked after a run failed: on a server
    that is down each MLflow call retries for about two minutes before it raises."""
    return not tracking_uri.startswith(("http://", "https://")) or server_health(tracking_uri, timeout)[0]


@contextlib.contextmanager
def without_retries(timeout_s: int | None = 10) -> Iterator[None]:
    """MLflow calls in the block that try once, for ``timeout_s`` at most (None: MLflow's timeout, 120 s unless
    set, which an upload of a model's files needs), instead of retrying for minutes: writes that may be lost or
    are kept to be sent again (a failed run's curves; rank 0's outbox). MLflow reads these settings at each call;
    the block is the process's, so no other thread should write meanwhile."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    if timeout_s is not None:
        settings["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def finish_run(tracking_uri: str, run_id: str, status: str) -> None:
    """End the run with its MLflow status: FINISHED, FAILED or KILLED."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri).set_terminated(run_id, status)


class RunLogger:
    """Metric and artifact logging into an existing run (used on rank 0 only)."""

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def metrics(self, values: dict[str, float], step: int, ms: int | None = None) -> None:
        """Log ``values`` at ``step``, stamped ``ms`` (milliseconds since the epoch; now by default)."""
        import math
        import time

        from mlflow.entities import Metric

        now = ms if ms is not None else int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if not math.isnan(float(v))]
        self.client.log_batch(self.run_id, metrics=batch)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def untag(self, key: str) -> None:
        """Remove tag ``key`` where the run has it (MLflow refuses to delete a tag that is not there)."""
        if key in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, key)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def artifacts(self, local_dir: Path, folder: str) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), folder)
