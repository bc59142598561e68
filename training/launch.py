"""Driver side of a training run: MLflow run, Ray Train TorchTrainer, checkpoints, learning curves."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shards import manifest as mf
from shards import storage
from training import tracking
from training.config import TrainRecipe, flatten


@dataclass
class TrainOutcome:
    run_id: str
    run_url: str
    metrics: dict[str, Any]
    checkpoint: str | None


def _storage(storage_path: str):
    """Ray Train storage: a local path, or ``s3://`` through the same endpoint and keys as the shards."""
    if not storage_path.startswith("s3://"):
        return storage_path, None
    import pyarrow.fs as pafs

    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    fs = pafs.S3FileSystem(
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        endpoint_override=endpoint.split("://", 1)[-1] or None,
        scheme=endpoint.split("://", 1)[0] if endpoint else "https",
        region=os.environ.get("AWS_REGION", "us-east-1"),
    )
    return storage_path[len("s3://") :], fs


def _use_gpu(recipe: TrainRecipe) -> bool:
    if recipe.use_gpu != "auto":
        return bool(recipe.use_gpu)
    import ray

    return ray.cluster_resources().get("GPU", 0) >= recipe.workers


def run_training(recipe: TrainRecipe, tracking_uri: str, storage_path: str) -> TrainOutcome:
    """Train ``recipe`` on the connected Ray cluster; metrics and artifacts go to MLflow at ``tracking_uri``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    manifest_bytes = storage.get_bytes(storage.join(recipe.data.dataset, mf.MANIFEST_NAME))
    manifest = mf.Manifest.model_validate_json(manifest_bytes)
    mf.check_patient_disjoint(manifest)
    tags = {
        "dataset": recipe.data.dataset,
        "manifest_sha256": tracking.file_sha256(manifest_bytes),
        "git_commit": tracking.git_commit(),
        "recipe": recipe.name,
    }
    params = flatten(recipe.model_dump()) | {"data.classes": ",".join(manifest.classes)}
    for split in (recipe.data.train_split, recipe.data.val_split):
        if split in manifest.splits:
            params[f"data.{split}_samples"] = manifest.splits[split].num_samples
    exp_id, run_id = tracking.start_run(tracking_uri, recipe.experiment or recipe.name, recipe.name, params, tags)
    url = tracking.run_url(tracking_uri, exp_id, run_id)
    print(f"MLflow run: {url}", flush=True)
    logger = tracking.RunLogger(tracking_uri, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "recipe.yaml"
        resolved.write_text(yaml.safe_dump(recipe.model_dump(), sort_keys=False))
        logger.artifact(resolved)
    use_gpu = _use_gpu(recipe)
    path, fs = _storage(storage_path)
    trainer = TorchTrainer(
        _loop(),
        train_loop_config={"recipe": recipe.model_dump(), "mlflow_uri": tracking_uri, "run_id": run_id},
        scaling_config=ScalingConfig(
            num_workers=recipe.workers, use_gpu=use_gpu, resources_per_worker={"CPU": recipe.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(
            name=f"{recipe.name}-{run_id[:8]}",
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=2),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    ok = False
    try:
        result = trainer.fit()
        ok = result.error is None
        history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []
        _log_curves(logger, history)
        ckpt = result.checkpoint.path if result.checkpoint else None
        return TrainOutcome(run_id, url, dict(result.metrics or {}), ckpt)
    finally:
        tracking.finish_run(tracking_uri, run_id, ok)


def _loop():
    from training.loop import train_loop

    return train_loop


def _log_curves(logger: tracking.RunLogger, history: list[dict[str, Any]]) -> None:
    from training.plots import curves_png

    if not history:
        return
    with tempfile.TemporaryDirectory() as tmp:
        logger.artifact(curves_png(history, ["train_loss"], Path(tmp) / "curve_loss.png", "training loss"))
        keys = [k for k in ("train_accuracy", "val_accuracy", "val_patient_accuracy") if k in history[0]]
        logger.artifact(curves_png(history, keys, Path(tmp) / "curve_accuracy.png", "accuracy"))
