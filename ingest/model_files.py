"""Where ``--background-model`` (or ``--detector``) may point, read once on the driver into :class:`ModelFiles`.

A local file or folder, an ``s3://`` object or prefix, a run of the tracking server (``runs:/RUN_ID[/PATH]``, or
the bare run id ``tessera train`` prints: its ``model`` folder) or a registered model (``models:/NAME/VERSION``,
``models:/NAME/latest``, ``models:/NAME@ALIAS``; MLflow at ``MLFLOW_TRACKING_URI``). The actors read the
driver's bytes from the run's staging (:func:`put_model`), not the place: a path on the driver's disk need not
exist on the cluster's other nodes, and a registered model's ``latest`` cannot move between two actors' start.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ingest.config import ImagesIngestConfig, IngestConfig, WsiIngestConfig
from shards import storage
from shards.nodes import workers_that_fit

MODEL_JSON, TORCHSCRIPT = "model.json", "model.ts"  # a Tessera export's files (training/export.py writes them)
MODEL_FOLDER = "model"  # where a training run logs its export
RUN_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class ModelFiles:
    """A model (a tile classifier, a detector) as read from where ``--background-model`` or ``--detector`` points.

    ``source`` says where it came from (a registered model's version and run); ``description`` is an export's
    ``model.json`` (None for a bare TorchScript file)."""

    source: str
    torchscript: bytes
    description: dict | None = None

    @property
    def tile_um(self) -> float | None:
        """The width of specimen its training tiles showed (an export's ``tile_um``); None where it is not recorded
        (a bare TorchScript file, an export older than the record)."""
        return (self.description or {}).get("tile_um")

    @property
    def sha256(self) -> str:
        """The TorchScript file's sha256 (as ``sha256sum model.ts`` prints it): what the dataset records."""
        return hashlib.sha256(self.torchscript).hexdigest()


def recording(cfg: IngestConfig, model: ModelFiles | None) -> tuple[IngestConfig, str | None]:
    """``cfg`` with the sha256 of the model its run read (what the dataset records and a re-run must match, whatever
    reference names it) and the reference with what it resolved to (a registered version's number and run), and
    the line that says which model that is; ``(cfg, None)`` without one."""
    if model is None:
        return cfg, None
    if isinstance(cfg, ImagesIngestConfig):  # the detector of paper 004's first stage
        line = f"detector: {model.source}, sha256 {model.sha256[:16]}"
        return cfg.model_copy(update={"detector": model.source, "detector_sha256": model.sha256}), line
    line = f"background model: {model.source}, sha256 {model.sha256[:16]}"
    if model.tile_um:  # slides whose tiles differ are warned of, each
        line += f", trained on tiles {model.tile_um:.0f} µm across"
    else:  # a bare TorchScript file, or an export of a training on slides without MPP
        line += ", with no record of its training tiles' scale: slides at another scale are not warned of"
    return cfg.model_copy(update={"background_model": model.source, "background_model_sha256": model.sha256}), line


def read_models(cfg: IngestConfig) -> ModelFiles | None:
    """What the models a run names hold, read on the driver before any work: the background model's or the
    detector's files (None without one); a SAM checkpoint's configuration, so that a wrong name fails the run here
    and not every image. torch and transformers are imported only where a model is named."""
    if isinstance(cfg, ImagesIngestConfig) and cfg.segment == "sam":
        from ingest.sam import check_sam

        check_sam(cfg.sam_model)
    if isinstance(cfg, ImagesIngestConfig) and cfg.detector:
        from ingest.detector import read_checked as read_detector

        return read_detector(cfg.detector)
    if not (isinstance(cfg, WsiIngestConfig) and cfg.background_model):
        return None
    from ingest.background import read_checked

    return read_checked(cfg.background_model, cfg.background_threshold)


def model_url(cfg: IngestConfig) -> str:
    """Where a run's actors read its model (background model or detector): in its staging, removed with it."""
    from ingest.staging import STAGING  # staging imports the units, which import this module

    return storage.join(cfg.out, STAGING, "model")


def model_device(cfg: IngestConfig) -> str:
    """Where an actor runs the models of a run: ``cuda`` where it holds a GPU (``gpus_per_worker``; Ray shows it
    only those it holds), else the CPU."""
    if not cfg.gpus_per_worker:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_actors(n: int, nodes: list[dict[str, float]], per_actor: float, fixed: bool) -> int:
    """How many of ``n`` actors of 1 CPU and ``per_actor`` GPUs the ``nodes`` (each one's total resources) hold
    side by side. None: an error where the cluster cannot grow (Ray would wait for them without end), else ``n``,
    saying that the run waits for nodes with GPUs."""
    fit = workers_that_fit(nodes, 1, per_actor, "pack")
    if fit:
        if fit < n:
            print(f"ingest actors: {fit}, as many as the cluster's GPUs hold at {per_actor:g} each")
        return min(n, fit)
    held = ", ".join(f"{r.get('GPU', 0):g}" for r in nodes) or "none"
    problem = (
        f"gpus_per_worker {per_actor:g}: the cluster's {len(nodes)} node(s) hold no actor of {per_actor:g} GPU(s) "
        f"(GPUs per node: {held})"
    )
    if fixed:
        raise ValueError(
            f"{problem}; Ray would wait for one without end: give 0 (the models on the CPUs) or run it on a GPU cluster"
        )
    print(f"{problem}: the run waits until nodes with GPUs join (an autoscaling cluster adds them)", flush=True)
    return n


def is_mlflow(ref: str) -> bool:
    """Whether ``ref`` names a run or a registered model rather than a file."""
    return ref.startswith(("runs:/", "models:/")) or (RUN_ID.fullmatch(ref) is not None and not os.path.exists(ref))


def fetch_model(ref: str, what: str = "background model") -> ModelFiles:
    """The model ``ref`` points to (see the module's doc); a clear error naming ``what`` and ``ref`` when it
    cannot."""
    return _from_mlflow(ref, what) if is_mlflow(ref) else _from_storage(ref, what)


def _from_storage(ref: str, what: str) -> ModelFiles:
    """A TorchScript file, or an export folder (``model.json`` + ``model.ts``), local or on S3."""
    desc_url = storage.join(ref, MODEL_JSON)
    if storage.exists(desc_url):
        desc = _description(ref, storage.get_bytes(desc_url), what)
        script = desc.get("torchscript", TORCHSCRIPT)  # a detector's export names its own
        ts_url = storage.join(ref, script)
        if not storage.exists(ts_url):
            raise FileNotFoundError(f"{what} {ref}: an export folder without its {script}")
        return ModelFiles(ref, storage.get_bytes(ts_url), desc)
    if storage.exists(ref):
        return ModelFiles(ref, storage.get_bytes(ref))
    if storage.parse(ref).scheme == "file" and Path(ref).is_dir():
        raise FileNotFoundError(f"{what} {ref}: a folder without {MODEL_JSON}, so not a Tessera export")
    raise FileNotFoundError(f"{what} {ref}: no such file or folder")


def _description(ref: str, data: bytes, what: str) -> dict:
    try:
        desc = json.loads(data)
        if isinstance(desc, dict) and isinstance(desc.get("classes"), list) and "image_size" in desc:
            return desc
        why = "it names no classes and image size"
    except ValueError as exc:
        why = f"not JSON ({exc})"
    raise ValueError(f"{what} {ref}: its {MODEL_JSON} is not a Tessera export's: {why}")


def _from_mlflow(ref: str, what: str) -> ModelFiles:
    """A run's export folder (or one TorchScript file it logged), or a registered model version's."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = mlflow.get_tracking_uri()
    _check_answers(uri, ref, what)
    client = MlflowClient(uri)
    try:
        if ref.startswith("models:/"):
            version = _version(client, ref, what)
            base, source = version.source.rstrip("/"), f"{ref} (version {version.version} of run {version.run_id})"
        else:
            run_id, _, path = ref.removeprefix("runs:/").partition("/")
            client.get_run(run_id)  # a run that is not there says so, rather than its artifact's absence
            base, source = f"runs:/{run_id}/{path.strip('/') or MODEL_FOLDER}", f"{ref} (run {run_id})"
        with tempfile.TemporaryDirectory(prefix="tessera-bgmodel-") as tmp:
            if Path(base).suffix:  # one file: a bare TorchScript module logged as an artifact
                return ModelFiles(source, _download(base, tmp).read_bytes())
            desc = _description(ref, _download(f"{base}/{MODEL_JSON}", tmp).read_bytes(), what)
            script = desc.get("torchscript", TORCHSCRIPT)  # a detector's export names its own
            return ModelFiles(source, _download(f"{base}/{script}", tmp).read_bytes(), desc)
    except MlflowException as exc:
        raise FileNotFoundError(f"{what} {ref}: {exc.message} (MLflow at {uri})") from exc


def _check_answers(uri: str, ref: str, what: str) -> None:
    """Fail in seconds where MLflow is down: its client retries each call for minutes first."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        reply = requests.get(f"{uri.rstrip('/')}/health", timeout=5)
        why = None if reply.ok else f"HTTP {reply.status_code}"
    except requests.RequestException as exc:
        why = type(exc).__name__
    if why:
        raise ConnectionError(f"{what} {ref}: MLflow at {uri} does not answer ({why})")


def _version(client, ref: str, what: str):
    """The registered model version ``ref`` names (``latest``: the highest version number)."""
    name, sep, which = ref.removeprefix("models:/").partition("/")
    if not sep:
        name, sep, alias = name.rpartition("@")
        if sep and name and alias:
            return client.get_model_version_by_alias(name, alias)
    elif which.isdigit():
        return client.get_model_version(name, which)
    elif which.lower() == "latest":
        versions = client.search_model_versions(f"name='{name}'")
        if not versions:
            raise FileNotFoundError(f"{what} {ref}: no registered model {name!r} has a version")
        return max(versions, key=lambda v: int(v.version))
    raise ValueError(f"{what} {ref}: give models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")


def put_model(model: ModelFiles, url: str) -> None:
    """Write ``model``'s files under ``url``: a run's actors read it there, from the store every node of the
    cluster writes to (a Ray object as an actor's argument would do too, but Ray warns against those for actors
    it restarts)."""
    storage.put_bytes(storage.join(url, TORCHSCRIPT), model.torchscript)
    if model.description is not None:
        storage.put_bytes(storage.join(url, MODEL_JSON), json.dumps(model.description).encode())


def get_model(url: str, source: str, sha256: str, what: str = "background model") -> ModelFiles:
    """The model :func:`put_model` wrote under ``url``, checked to be the one whose TorchScript has ``sha256``."""
    desc_url = storage.join(url, MODEL_JSON)
    desc = json.loads(storage.get_bytes(desc_url)) if storage.exists(desc_url) else None
    model = ModelFiles(source, storage.get_bytes(storage.join(url, TORCHSCRIPT)), desc)
    if model.sha256 != sha256:
        raise ValueError(f"{what} {source}: {url} holds another model (sha256 {model.sha256})")
    return model


def _download(uri: str, tmp: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
    except (MlflowException, OSError) as exc:  # a run without the file: no export (it failed before its first)
        raise MlflowException(f"it holds no {uri}") from exc
