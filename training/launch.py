"""Driver side of a training run: MLflow run, Ray Train TorchTrainer, resume, learning curves, registry."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shards import manifest as mf
from shards import provenance, storage
from training import tracking
from training.capacity import check_capacity, gpu_choice, wants_gpu
from training.config import RecipeError, TrainRecipe, apply_overrides, flatten, recipe_from_tree
from training.endings import failure_reason, interrupted_as, resume_hint
from training.live_runs import DRIVER_TAG, driver_tag, live_driver
from training.preflight import check_against, untrained_classes

RECIPE_ARTIFACT = "recipe.yaml"
# Ray Train settings a run's controller and workers take from the driver's environment, unless set there:
# - the controller reads a report when it next polls the workers (every 2 s by default): each run waited up to
#   that long for its end, and a sweep's scheduler as long for each epoch's verdict;
# - a worker's print would be logged and also written to stdout, and reach the console twice.
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
# Test hook: "EPOCH,STEP,RANK" kills that worker once with SIGKILL (fault-tolerance tests).
FAULT_ENV = "TESSERA_FAULT_KILL"


@dataclass
class TrainOutcome:
    run_id: str
    run_url: str
    metrics: dict[str, Any]
    checkpoint: str | None
    model_version: str | None = None
    model_name: str | None = None  # what the version is registered under (the recipe's name)
    error: str | None = None
    held_out: Any = None  # the test split's EvalOutcome (training.evaluation)
    held_out_error: str | None = None
    heatmaps: list[str] = field(default_factory=list)  # what eval.heatmaps drew after training (lines to print)
    resume: str | None = None  # a failed run: what it has done and the command that continues it


def storage_location(storage_path: str):
    """Ray Train storage: a local path, or ``s3://`` through the same endpoint and keys as the shards."""
    fs = storage_filesystem(storage_path)
    return (storage_path[len("s3://") :] if fs else storage_path), fs


def storage_filesystem(storage_path: str):
    """The pyarrow filesystem of a storage path: None (local) or S3 with the settings' endpoint and keys."""
    if not storage_path.startswith("s3://"):
        return None
    from shards.arrow_fs import s3_filesystem

    return s3_filesystem()


def checkpoint_files(path: str, fs=None) -> list:
    """Every file under the checkpoint folder ``path`` (pyarrow ``FileInfo``s, on ``fs``, local by default;
    none if it does not exist)."""
    import pyarrow.fs as pafs

    fs = fs or pafs.LocalFileSystem()
    return fs.get_file_info(pafs.FileSelector(str(path).rstrip("/"), recursive=True, allow_not_found=True))


def has_model_states(path: str, fs=None) -> bool:
    """Whether the checkpoint folder ``path`` (on pyarrow ``fs``, local by default) holds DeepSpeed model states:
    a complete Tessera checkpoint, not one deleted or cut short."""
    return any(f.path.endswith("_model_states.pt") for f in checkpoint_files(path, fs))


def check_checkpoint(path: str, fs, role: str = "to start from") -> None:
    """Refuse a checkpoint that holds no model states, naming it (DeepSpeed would only fail an assertion on an
    empty list); ``role`` says which checkpoint it is."""
    if not has_model_states(path, fs):
        raise FileNotFoundError(f"checkpoint {path} {role} holds no model states (deleted or incomplete)")


def run_checkpoints(folder: str, fs) -> list:
    """The ``checkpoint_*`` folders of one Ray Train run folder (pyarrow ``FileInfo``s), oldest first."""
    import pyarrow.fs as pafs

    found = fs.get_file_info(pafs.FileSelector(folder.rstrip("/"), allow_not_found=True))
    checkpoints = [f for f in found if f.type == pafs.FileType.Directory and f.base_name.startswith("checkpoint_")]
    return sorted(checkpoints, key=lambda f: f.base_name)  # checkpoint_<date>_<time>


def checkpoint_url(path: str, storage_path: str) -> str:
    """A checkpoint's address for people and for :func:`training.engine.checkpoint_weights`: Ray gives object-store
    paths without their scheme, so ``s3://`` is put back when the run's storage is S3."""
    return f"s3://{path}" if storage_path.startswith("s3://") and not path.startswith("s3://") else path


def _fault() -> dict[str, int] | None:
    raw = os.environ.get(FAULT_ENV)
    if not raw:
        return None
    epoch, step, rank = (int(v) for v in raw.split(","))
    return {"epoch": epoch, "step": step, "rank": rank}


def load_manifest(recipe: TrainRecipe, trains: bool = True) -> tuple[mf.ManifestBrief, bytes]:
    """The recipe's dataset manifest (splits patient-disjoint, and what the recipe evaluates defined on it: see
    :func:`~training.preflight.check_against`; ``trains``: and trains on), a brief of each record (what these
    checks read), and its bytes (for its sha256)."""
    manifest, data = mf.load_brief(recipe.data.dataset)
    mf.check_patient_disjoint(manifest)
    check_against(recipe, manifest, trains)
    return manifest, data


MANIFEST_TAG = "manifest_sha256"  # the run's tag: the version of the dataset it trains on


def origin_tags(recipe: TrainRecipe, manifest: mf.ManifestBrief, data: bytes) -> dict[str, str]:
    """Where a run (or a sweep's parent run) comes from: the recipe, its dataset and that dataset's version
    (``data``: the manifest's bytes), the code that made the dataset and the code that trains on it."""
    tags = {
        "dataset": recipe.data.dataset,
        MANIFEST_TAG: mf.sha256_of(data),
        "git_commit": provenance.commit(),
        "tessera_version": provenance.version(),
        "recipe": recipe.name,
    }
    if manifest.made_by:  # which code rendered the samples: models of one dataset made twice differ by it
        tags["dataset_made_by"] = manifest.made_by
    if rendered := manifest.renderings():  # and with what: Tessera's rendering and the libraries' versions
        tags["dataset_rendered_with"] = provenance.describe_rendering(provenance.combined(rendered))
    if sites := manifest.config.get("hold_out_sites"):  # its test_* metrics are of these centres alone
        tags["dataset_held_out_sites"] = ",".join(sites)
    return tags


def start_run(
    recipe: TrainRecipe,
    tracking_uri: str,
    extra_tags: dict[str, str] | None = None,
    run_name: str | None = None,
    loaded: tuple[mf.ManifestBrief, bytes] | None = None,
) -> str:
    """Create the MLflow run (params, tags, the resolved recipe); returns its id. ``loaded``: the recipe's
    manifest and bytes as :func:`load_manifest` gave them already (a sweep trial's, checked)."""
    manifest, manifest_bytes = loaded or load_manifest(recipe)
    tags = origin_tags(recipe, manifest, manifest_bytes) | (extra_tags or {})
    params = flatten(recipe.model_dump()) | {"data.classes": ",".join(manifest.classes)}
    for role, split in (("train", recipe.data.train_split), ("val", recipe.data.val_split)):
        if not manifest.missing_splits(split):  # by role: a split may be "f0+f1", which MLflow keys cannot hold
            params[f"data.{role}_samples"] = manifest.num_samples(split)
    experiment = recipe.experiment or recipe.name
    _, run_id = tracking.start_run(tracking_uri, experiment, run_name or recipe.name, params, tags)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / RECIPE_ARTIFACT
        resolved.write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False))
        tracking.RunLogger(tracking_uri, run_id).artifact(resolved)
    return run_id


def run_training(recipe: TrainRecipe, tracking_uri: str, storage_path: str, max_failures: int = 2) -> TrainOutcome:
    """Train ``recipe`` on the connected Ray cluster; metrics and artifacts go to MLflow at ``tracking_uri``.

    A worker that dies is replaced and the group resumes from the last checkpoint, up to ``max_failures``
    times; after that the run is FAILED in MLflow and ``tessera train --resume RUN`` continues it.
    """
    from training.models import check_model

    check_model(recipe.model, recipe.task)  # before an MLflow run or a worker exists
    check_capacity(recipe, wants_gpu(recipe))
    loaded = load_manifest(recipe)
    if warning := untrained_classes(recipe, loaded[0]):
        print(warning, flush=True)
    run_id = start_run(recipe, tracking_uri, loaded=loaded)
    return fit(recipe, run_id, tracking_uri, storage_path, max_failures, held_out=True)


# Where a run runs: what ``tessera evaluate`` may change, with ``use_gpu`` (a GPU cluster's run, on a CPU box).
WHERE_KEYS = ("workers", "cpus_per_worker", "placement")
EVALUATE_KEYS = (*WHERE_KEYS, "use_gpu")
# What ``--resume`` may change: where a run continues, and how long it waits for its tracking server after its last
# epoch (a run that failed on that wait, resumed while MLflow is still unsteady), not what it trains.
RESUME_KEYS = (*WHERE_KEYS, "tracking.outage_wait_s", "data.outage_wait_s")


def check_where_overrides(
    overrides: list[str] | tuple[str, ...], keys: tuple[str, ...] = RESUME_KEYS, command: str = "--resume"
) -> None:
    """Refuse an override of anything but where a run runs (``keys``) for ``command`` (resume, evaluate): what
    it trains and is evaluated with stays its own recipe's. Called before anything connects."""
    bad = [o for o in overrides if "=" not in o or o.partition("=")[0].strip() not in keys]
    if bad:
        raise RecipeError(f"{command} changes only {', '.join(keys)} (the run's own recipe is used), not {bad}")


def run_recipe(client, run_id: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainRecipe:
    """The resolved recipe a run trained with (its ``recipe.yaml`` artifact), with ``overrides`` applied."""
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(client.download_artifacts(run_id, RECIPE_ARTIFACT, tmp)).read_text()
    return recipe_from_tree(apply_overrides(yaml.safe_load(text), overrides), f"run {run_id}")


def resume_training(
    run_id: str, tracking_uri: str, storage_path: str, overrides: list[str] | tuple[str, ...] = ()
) -> TrainOutcome:
    """Continue a stopped run from its latest checkpoint, into the same MLflow run, with its own recipe;
    ``overrides`` may move it to another number of workers (:data:`RESUME_KEYS`): a ZeRO checkpoint written by
    K ranks is read by N through DeepSpeed's universal form (:func:`training.engine.to_universal`)."""
    from mlflow import MlflowClient

    check_where_overrides(overrides)
    client = MlflowClient(tracking_uri)
    run_id = tracking.resolve_run(client, run_id)
    run = client.get_run(run_id)
    check_resumable(run, run_id)
    recipe = run_recipe(client, run_id, overrides)
    check_capacity(recipe, wants_gpu(recipe))
    manifest, data = load_manifest(recipe)
    mf.check_same_data(run.data.tags.get(MANIFEST_TAG), recipe.data.dataset, manifest, data, f"run {run_id}")
    if overrides:
        client.set_tag(run_id, "resume_overrides", " ".join(overrides))  # params are immutable; say what changed
    client.update_run(run_id, status="RUNNING")
    print(f"resuming MLflow run {run_id} from its latest checkpoint", flush=True)
    return fit(recipe, run_id, tracking_uri, storage_path, held_out=True)


def check_resumable(run, run_id: str) -> None:
    """Refuse to resume a run that finished (nothing is left to train; it trained nothing more, then evaluated its
    test split again) or that a live driver trains now (two trainings would write one run's checkpoints)."""
    if run.info.status == "FINISHED":
        raise ValueError(
            f"run {run_id} finished: nothing is left to continue; `tessera evaluate {run_id}` evaluates its model "
            "again, and a new `tessera train` trains another"
        )
    job = live_driver(run.data.tags.get(DRIVER_TAG)) if run.info.status == "RUNNING" else None
    if job:
        raise ValueError(
            f"run {run_id} is being trained now (Ray job {job} on this cluster); resuming it would train it twice at "
            "once: wait for it, or stop it first (Ctrl+C where it runs; `tessera jobs stop` for a submitted one)"
        )


def trainer_for(
    recipe: TrainRecipe,
    run_id: str,
    tracking_uri: str,
    storage_path: str,
    max_failures: int = 2,
    callbacks: list | None = None,
    start_from: dict[str, Any] | None = None,
    name: str | None = None,
    keep_checkpoints: int | None = 2,
    held_out: dict[str, str] | None = None,
    gate: Any = None,
):
    """The TorchTrainer of a run. Its name is fixed by the run id, so that a trainer built again for the same
    run restores from that run's latest checkpoint (Ray Train v2 resumes by name and storage path).

    ``start_from`` (``path``, ``storage``, ``weights_only``) starts a new run from another run's checkpoint;
    ``name`` overrides the run name (a sweep trial takes a new one each time it starts from a checkpoint);
    ``keep_checkpoints`` is how many of the newest checkpoints stay (None: all); ``held_out``: the split the
    workers evaluate after training (:func:`training.evaluation.held_out_plan`); ``gate``: a sweep trial's queue of
    epochs its scheduler let it go on after (:func:`training.loop.await_go_ahead`)."""
    from mlflow import MlflowClient
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    from training.console import epoch_lines, train_log_level
    from training.trainer import torch_trainer

    path, fs = storage_location(storage_path)
    config = {"recipe": recipe.model_dump(), "mlflow_uri": tracking_uri, "run_id": run_id, "fault": _fault()}
    config |= {"start_from": start_from, "held_out": held_out, "gate": gate}
    # each worker (a restarted one too) checks that it reads the dataset version the run recorded
    config["manifest_sha256"] = MlflowClient(tracking_uri).get_run(run_id).data.tags.get(MANIFEST_TAG)
    return torch_trainer(
        _loop(),
        **worker_group(recipe, config),
        run_config=RunConfig(
            name=name or run_name(recipe, run_id),
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
            callbacks=[epoch_lines(recipe.epochs, recipe.eval.monitor, recipe.eval.levels), *(callbacks or [])],
            logging_config=LoggingConfig(train_log_level()),
        ),
    )


def run_name(recipe: TrainRecipe, run_id: str) -> str:
    """The Ray Train run's name, and its folder in the storage: one per MLflow run, so that a trainer built again
    for it restores from its latest checkpoint."""
    return f"{recipe.name}-{run_id[:12]}"


def worker_group(recipe: TrainRecipe, config: dict[str, Any]) -> dict[str, Any]:
    """The ``scaling_config``, ``torch_config`` and ``train_loop_config`` of a TorchTrainer for ``recipe``: its
    workers, their CPUs and placement, GPUs (NCCL) where the recipe asks for them or there is one per worker, gloo
    otherwise. ``config`` (its ``recipe`` the recipe's dump) goes to the workers with ``use_gpu`` as decided here:
    a worker of a CPU group on a GPU machine must not take the GPU that Ray did not give it (rank 1 of two asked
    for CUDA device 1 on a one-GPU machine). Sets :data:`RAY_TRAIN_ENV` where the environment does not."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    use_gpu, shortfall = gpu_choice(recipe)
    if shortfall:
        print(shortfall, flush=True)
    scaling = ScalingConfig(
        num_workers=recipe.workers,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": recipe.cpus_per_worker},
        placement_strategy=recipe.placement.upper(),
    )
    config = config | {"recipe": config["recipe"] | {"use_gpu": use_gpu}}
    return {
        "scaling_config": scaling,
        "torch_config": TorchConfig(backend="nccl" if use_gpu else "gloo"),
        "train_loop_config": config,
    }


def fit(
    recipe: TrainRecipe,
    run_id: str,
    tracking_uri: str,
    storage_path: str,
    max_failures: int = 2,
    register: bool = True,
    held_out: bool = False,
    **trainer_options: Any,
) -> TrainOutcome:
    """Run (or resume) the trainer of ``run_id``; curves and (``register``) model registration after it ends.
    With ``held_out``, the workers then evaluate the selected model on the recipe's test split, where the
    dataset has one; a failure of that step is the outcome's ``held_out_error``, not the training's. Then the
    heatmaps, where the recipe asks for them (``eval.heatmaps``; not in a sweep's exploring trials).

    ``trainer_options`` go to :func:`trainer_for` (callbacks, start_from, name, keep_checkpoints, gate)."""
    from ray.train import TrainingFailedError

    from training.evaluation import HELD_OUT_ERROR, held_out_outcome, held_out_plan
    from training.inference import training_heatmaps
    from training.plots import log_curves

    logger = tracking.RunLogger(tracking_uri, run_id)
    url = tracking.run_url_of(tracking_uri, run_id)
    print(f"MLflow run: {url}", flush=True)
    status: str | None = "FAILED"
    try:
        plan = held_out_plan(recipe) if held_out else None
        if plan:
            logger.untag(HELD_OUT_ERROR)  # from an earlier training of this run (`--resume`)
        options = trainer_options | {"held_out": plan}
        trainer = trainer_for(recipe, run_id, tracking_uri, storage_path, max_failures, **options)
        if driver := driver_tag():  # who trains it now: a `--resume` meanwhile is refused (training.live_runs)
            logger.tag(DRIVER_TAG, driver)
        try:
            folder = storage.join(storage_path, trainer_options.get("name") or run_name(recipe, run_id))
            with interrupted_as(lambda: resume_hint(tracking_uri, run_id, recipe.epochs, folder)):
                result = trainer.fit()
        except TrainingFailedError as exc:  # Ray Train raises it once the run's FailureConfig retries are spent
            if tracking.answers(tracking_uri):
                # the curves so far; the artifact store behind MLflow may be what failed (S3 down: the upload
                # retried for four minutes before it gave up, and the command said why the run failed that late)
                with contextlib.suppress(Exception), tracking.without_retries():
                    log_curves(logger, tracking.epoch_history(tracking_uri, run_id))
                hint = resume_hint(tracking_uri, run_id, recipe.epochs, folder)
            else:  # what failed, maybe: each call, the status's too, would retry for minutes, then fail
                status = None
                hint = (
                    f"MLflow ({tracking_uri}) does not answer, so run {run_id} stays RUNNING there; once it is back, "
                    f"`tessera train --resume {run_id}` continues it from its last checkpoint"
                )
            return TrainOutcome(run_id, url, {}, None, error=failure_reason(exc), resume=hint)
        status = "FINISHED"
        log_curves(logger, tracking.epoch_history(tracking_uri, run_id))
        version = tracking.register_model(tracking_uri, run_id, recipe.name) if register else None
        ckpt = checkpoint_url(result.checkpoint.path, storage_path) if result.checkpoint else None
        outcome = TrainOutcome(run_id, url, dict(result.metrics or {}), ckpt, version, recipe.name if version else None)
        if plan:
            outcome.held_out, outcome.held_out_error = held_out_outcome(tracking_uri, run_id, recipe, plan)
        if held_out and recipe.eval.heatmaps:
            outcome.heatmaps = training_heatmaps(tracking_uri, run_id, recipe, outcome.held_out)
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"  # Ctrl+C, or SIGTERM from `tessera jobs stop` (see cluster.cli)
        raise
    finally:
        if status:
            tracking.finish_run(tracking_uri, run_id, status)


def _loop():
    from training.loop import train_loop

    return train_loop
