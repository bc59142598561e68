"""Held-out evaluation: a run's selected model on a split it neither trained nor was selected on.

The model is the run's exported ``model`` artifact: the best epoch's weights, or the SWA average, the one that is
registered. Workers of a Ray Train group each read their part of the split, as in training; metrics at sample
and aggregation levels (the recipe's) and the pictures go into the same MLflow run, under the split's prefix
(``test_accuracy``, ``test_patient_accuracy``, ``test_confusion_patient.png``), so runs compare side by side on
held-out data. Another dataset (external validation) takes a prefix of its own.
"""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards import manifest as mf
from training import tracking
from training.config import TrainRecipe

MODEL_ARTIFACT = "model"
HEADLINE = ("accuracy", "f1", "auc", "weighted_log_loss", "rsna_log_loss")


class MissingSplit(ValueError):
    """The dataset has no split of that name (for training's held-out step: nothing to evaluate)."""


@dataclass
class EvalOutcome:
    run_id: str
    prefix: str
    dataset: str
    split: str
    metrics: dict[str, float]
    levels: list[str]


def metric_prefix(split: str, name: str | None = None) -> str:
    """``test_`` for split ``test``; ``name`` instead of the split where given; characters MLflow keys and file
    names should not carry (``f0+f1``) become ``_``."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", name or split).strip("_") + "_"


def check_outputs(model_outputs: list[str], outputs: list[str], dataset: str) -> None:
    """Refuse a dataset whose classes (or label names) are not the model's, in the same order."""
    if list(model_outputs) != list(outputs):
        raise ValueError(f"{dataset}: its classes {outputs} are not the model's {model_outputs}")


def eval_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``recipe``, ``split``, ``prefix``, ``mlflow_uri``, ``run_id``."""
    import ray.train

    from shards import scratch
    from training.data import WorkerData
    from training.export import load_export
    from training.loop import evaluate, outputs_of, predict, worker_device
    from training.losses import Loss
    from training.reporting import log_evaluation

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    recipe = TrainRecipe.model_validate(config["recipe"])
    split, prefix = config["split"], config["prefix"]
    device = worker_device(recipe)
    log = tracking.RunLogger(config["mlflow_uri"], config["run_id"])
    with scratch.directory("model") as tmp:  # every worker: a node need not share another's disk
        folder = log.client.download_artifacts(config["run_id"], MODEL_ARTIFACT, tmp)
        model, _ = load_export(Path(folder))
    manifest = mf.load(recipe.data.dataset)
    outputs = outputs_of(recipe, manifest)
    data = WorkerData(recipe, manifest, rank, world, device.index, splits=(split,))
    try:
        loss = Loss(recipe.task == "multilabel", None, len(outputs))
        pred = predict(model.to(device), data.batches(split, 0, False), loss, device)
    finally:
        data.close()
    metrics = evaluate(pred, recipe, outputs, prefix)
    if rank == 0:
        log.metrics(metrics, step=0)
        log_evaluation(log, recipe, outputs, pred, f"{split} split", prefix)


def evaluate_run(
    run: str,
    tracking_uri: str,
    storage_path: str,
    split: str = "test",
    dataset: str | None = None,
    name: str | None = None,
    recipe: TrainRecipe | None = None,
) -> EvalOutcome:
    """Evaluate run ``run``'s exported model on ``split`` of its own dataset or of ``dataset``; metrics and
    pictures into the run. ``name`` prefixes them (default: the split's name, ``external_<split>`` for another
    dataset). ``recipe``: the run's own, where the caller has it."""
    from mlflow import MlflowClient
    from ray.train import RunConfig
    from ray.train.torch import TorchTrainer

    from training.export import MODEL_JSON
    from training.launch import load_manifest, run_recipe, storage_location, worker_group
    from training.loop import outputs_of

    client = MlflowClient(tracking_uri)
    run_id = tracking.resolve_run(client, run)
    recipe = recipe or run_recipe(client, run_id)
    if dataset:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"dataset": dataset})})
    url = recipe.data.dataset
    manifest, data = load_manifest(recipe)
    if manifest.missing_splits(split):
        raise MissingSplit(f"{url}: the manifest has no {split} split (has {sorted(manifest.splits)})")
    if not tracking.has_artifact(client, run_id, MODEL_ARTIFACT):
        raise ValueError(f"run {run_id} has no exported model (it finished no epoch)")
    with tempfile.TemporaryDirectory() as tmp:  # the classes the model was trained on, before any worker starts
        desc = json.loads(Path(client.download_artifacts(run_id, f"{MODEL_ARTIFACT}/{MODEL_JSON}", tmp)).read_text())
    check_outputs(desc.get("outputs") or desc["classes"], outputs_of(recipe, manifest), url)
    prefix = metric_prefix(split, name or (f"external_{split}" if dataset else None))
    path, fs = storage_location(storage_path)
    config = {"recipe": recipe.model_dump(), "split": split, "prefix": prefix}
    config |= {"mlflow_uri": tracking_uri, "run_id": run_id}
    group = f"{prefix}{run_id[:12]}-{uuid.uuid4().hex[:8]}"  # new each time: Ray Train resumes a run by its name
    result = TorchTrainer(
        eval_loop,
        train_loop_config=config,
        **worker_group(recipe),
        run_config=RunConfig(name=group, storage_path=path, storage_filesystem=fs),
    ).fit()
    if result.error is not None:
        raise RuntimeError(f"evaluation of run {run_id} on {url} ({split}) failed: {result.error}")
    client.set_tag(run_id, f"{prefix}dataset", url)
    client.set_tag(run_id, f"{prefix}manifest_sha256", tracking.file_sha256(data))
    # from the run: Ray Train keeps only the metrics reported with a checkpoint, and evaluation saves none
    logged = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith(prefix)}
    return EvalOutcome(run_id, prefix, url, split, logged, list(recipe.eval.levels))


def summary(outcome: EvalOutcome) -> str:
    """The headline metrics, a line per level, for the terminal (every metric is in the run)."""
    lines = [f"{outcome.split} split of {outcome.dataset}, metrics {outcome.prefix}* in the run:"]
    for level in ("sample", *outcome.levels):
        pre = outcome.prefix if level == "sample" else f"{outcome.prefix}{level}_"
        shown = [f"{k} {outcome.metrics[pre + k]:.4f}" for k in HEADLINE if pre + k in outcome.metrics]
        if shown:
            lines.append(f"  {level}: {', '.join(shown)}")
    return "\n".join(lines)
