"""Held-out evaluation: a run's selected model on a split it neither trained nor was selected on.

The model is the run's exported ``model`` artifact: the best epoch's weights, or the SWA average, the one that is
registered. After training, the training's own workers evaluate it (:func:`held_out_step`); ``tessera evaluate``
starts a worker group for it (:func:`evaluate_run`). Each worker reads its part of the split, as in training;
metrics at sample and aggregation levels (the recipe's) and the pictures go into the same MLflow run, under the
split's prefix (``test_accuracy``, ``test_patient_accuracy``, ``test_confusion_patient.png``), so runs compare
side by side on held-out data. Another dataset (external validation) takes a prefix of its own.
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
from training.config import LEVELS, TrainRecipe
from training.intervals import BOUNDS
from training.predictions import LabelledTable
from training.tracking import MODEL_ARTIFACT

HELD_OUT_ERROR = "held_out_error"  # the run's tag when training's held-out step failed
TRAINING_PREFIXES = ("train_", "val_")  # the per-epoch metrics of training (besides lr and epoch)
SCALE_WARNING = "scale_warning"  # <prefix>scale_warning: the evaluated samples' scale is not the training's


@dataclass
class EvalOutcome:
    run_id: str
    prefix: str
    dataset: str
    split: str
    metrics: dict[str, float]
    levels: list[str]
    warning: str | None = None  # of the samples' scale (:data:`SCALE_WARNING`)
    intervals: str | None = None  # how the metrics' confidence intervals were drawn, where they were
    operating_point: str | None = None  # the rule that chose the thresholds on validation, where it did


def metric_prefix(split: str, name: str | None = None) -> str:
    """``test_`` for split ``test``; ``name`` instead of the split where given; characters MLflow keys and file
    names should not carry (``f0+f1``) become ``_``. A split whose prefix is training's own (``val_``, ``train_``)
    gets ``eval_`` before it, so its metrics do not land in the per-epoch curves; such a ``name`` is refused."""
    prefix = re.sub(r"[^A-Za-z0-9_]+", "_", name or split).strip("_") + "_"
    if prefix.startswith(TRAINING_PREFIXES):
        if name:
            raise ValueError(
                f"evaluation name {name!r}: its metrics ({prefix}*) would mix with the training's own per-epoch "
                f"{', '.join(p + '*' for p in TRAINING_PREFIXES)}; choose another name"
            )
        prefix = f"eval_{prefix}"
    return prefix


def check_prefix_free(tags: dict[str, str], prefix: str, run_id: str) -> None:
    """Refuse ``prefix`` where it and an evaluation already in the run (its ``<prefix>dataset`` tag) would share
    metric names: ``test_`` and ``test_patient_`` would both log ``test_patient_accuracy``."""
    others = {k.removesuffix("dataset") for k in tags if k.endswith("_dataset")} - {prefix}
    clash = sorted(p for p in others if p.startswith(prefix) or prefix.startswith(p))
    if clash:
        raise ValueError(
            f"run {run_id}: metrics {prefix}* would mix with those of its evaluation {clash[0]}*; choose another name"
        )


def exported_predictions(
    recipe: TrainRecipe, manifest: mf.ManifestHead, split: str, log, rank: int, world: int, labelled: bool = True
) -> tuple[dict[str, Any], dict]:
    """Every rank of a worker group: the run's exported model on this rank's part of ``split``, gathered on
    every rank (:func:`training.loop.predict`), and the export's description. A failure on any rank raises on
    every rank. Not ``labelled``: samples without labels (no ``.cls``), whose ``labels`` are None."""
    import numpy as np

    from shards import scratch
    from training.collective import raise_together
    from training.data import WorkerData
    from training.detection import load_detector, predict_export
    from training.export import class_map, export_outputs, load_export
    from training.loop import predict, worker_device
    from training.losses import Loss

    device, data, error = worker_device(recipe), None, None
    try:
        try:
            with scratch.directory("model") as tmp:  # every worker: a node need not share another's disk
                folder = Path(log.client.download_artifacts(log.run_id, MODEL_ARTIFACT, tmp))
                model, desc = load_detector(folder) if recipe.task == "detect" else load_export(folder)
            data = WorkerData(recipe, manifest, rank, world, device.index, splits=(split,), labelled=labelled)
        except Exception as exc:
            error = exc
        raise_together(error)
        batches = data.batches(split, 0, False)
        if labelled and recipe.task == "multiclass" and (to := class_map(export_outputs(desc), manifest.classes, "")):
            index = np.asarray(to)
            batches = ((x, index[np.asarray(y, np.int64)], m) for x, y, m in batches)  # the model's indices
        if recipe.task == "detect":
            return predict_export(model.to(device), batches, recipe, device), desc
        loss = Loss(recipe.task == "multilabel", None, len(export_outputs(desc)))
        pred = predict(model.to(device), batches, loss, device, share_errors=True, labelled=labelled)
    finally:
        if data is not None:
            data.close()
    pred["labels"] = pred["labels"] if labelled else None
    return pred, desc


def evaluate_split(recipe: TrainRecipe, manifest: mf.ManifestHead, split: str, prefix: str, log, rank: int, world: int):
    """Every rank of a worker group: the run's exported model on this rank's part of ``split``; rank 0 logs the
    metrics and pictures under ``prefix``. A failure on any rank raises on every rank."""
    from training.calibration import calibrate, temperature_metric
    from training.export import export_outputs, samples_scale_warning
    from training.levels import evaluate, intervals, operating_points, thresholds, units
    from training.outputs import outputs_of
    from training.reporting import log_evaluation
    from training.sites import by_site, site_metrics

    pred, desc = exported_predictions(recipe, manifest, split, log, rank, world)
    # a classifier's labels are in its own classes' order (class_map), which its outputs name
    outputs = export_outputs(desc) if recipe.task == "multiclass" else outputs_of(recipe, manifest)
    # a detector's metrics gather every rank's boxes (torchmetrics' all-gather): every rank computes them
    metrics = evaluate(pred, recipe, outputs, prefix) if recipe.task == "detect" else {}
    if rank == 0:
        validation = validation_tables(log, recipe)
        pred, temps = calibrate(pred, recipe, outputs, validation)  # a classifier's (training.calibration)
        at = None if recipe.task == "detect" or pred["labels"] is None else units(pred, recipe)  # aggregated once
        if recipe.task != "detect":
            metrics = evaluate(pred, recipe, outputs, prefix, at)
        sites = by_site(pred, recipe, outputs, bounds=True)
        bounds, table = intervals(pred, recipe, outputs, prefix, at)
        chosen, notes = thresholds(recipe, outputs, validation, temps)
        op, op_table = operating_points(pred, recipe, outputs, prefix, chosen, at)
        scales = {temperature_metric(lv, prefix): t for lv, t in temps.items()}
        log.metrics(metrics | bounds | op | site_metrics(sites, prefix) | scales, step=0)
        log_evaluation(log, recipe, outputs, pred, f"{split} split", prefix, sites, chosen)
        with tempfile.TemporaryDirectory() as tmp:
            for name, text in (("intervals", table), ("operating_point", op_table)):
                if text:
                    (path := Path(tmp) / f"{prefix}{name}.csv").write_text(text)
                    log.artifact(path)
        for note in notes:
            print(f"operating point ({recipe.eval.operating_point}) at {note}", flush=True)
        warning = samples_scale_warning(desc, pred["metas"], manifest.config)
        if warning:
            log.tag(f"{prefix}{SCALE_WARNING}", warning)
        else:  # an earlier evaluation's under this prefix, of other samples
            log.untag(f"{prefix}{SCALE_WARNING}")


def validation_tables(log, recipe: TrainRecipe) -> dict[str, LabelledTable]:
    """The run's validation predictions at each level (``predictions_<level>.csv``, of its selected model), read,
    from which the operating point is chosen and the calibration fitted; none unless the recipe asks for either."""
    from training.levels import read_validation

    if not recipe.eval.operating_point and recipe.eval.calibration == "none":
        return {}
    out, logged = {}, {a.path for a in log.client.list_artifacts(log.run_id)}
    with tempfile.TemporaryDirectory() as tmp:
        for level in ("sample", *recipe.eval.levels):
            if (name := f"predictions_{level}.csv") in logged:
                out[level] = Path(log.client.download_artifacts(log.run_id, name, tmp)).read_text()
    return read_validation(out)


def eval_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of ``tessera evaluate``: ``recipe``, ``split``, ``prefix``, ``mlflow_uri``, ``run_id``."""
    import ray.train

    from training.console import quiet_worker

    quiet_worker()
    ctx = ray.train.get_context()
    recipe = TrainRecipe.model_validate(config["recipe"])
    log = tracking.RunLogger(config["mlflow_uri"], config["run_id"])
    manifest, _ = mf.load_head(recipe.data.dataset)
    evaluate_split(recipe, manifest, config["split"], config["prefix"], log, ctx.get_world_rank(), ctx.get_world_size())


def held_out_step(trainer) -> None:
    """After training, on its own workers (no second group to schedule): the selected model, as exported, on
    the split the driver's :func:`held_out_plan` named (``config["held_out"]``). A failure is tagged on the run
    (``held_out_error``) by rank 0 and not raised: the training succeeded and its model stays registered."""
    from training.collective import raise_together, said

    plan = trainer.config.get("held_out")
    if not plan:
        return
    log = tracking.RunLogger(trainer.config["mlflow_uri"], trainer.config["run_id"])
    try:
        raise_together(None)  # rank 0 has uploaded the selected model before any rank downloads it
        split, prefix = plan["split"], plan["prefix"]
        evaluate_split(trainer.recipe, trainer.manifest, split, prefix, log, trainer.rank, trainer.world)
    except Exception as exc:
        if trainer.rank == 0:
            print(f"held-out evaluation failed: {said(exc)}", flush=True)
            log.tag(HELD_OUT_ERROR, said(exc)[:5000])
        return
    if trainer.rank == 0:
        log.untag(HELD_OUT_ERROR)  # an earlier attempt's (a worker lost in this step)


def no_held_out(recipe: TrainRecipe, manifest: mf.ManifestHead) -> str | None:
    """Why training evaluates no held-out split after it (None: it evaluates ``data.test_split``)."""
    split = recipe.data.test_split
    if split is None:
        return "data.test_split: null"
    if manifest.missing_splits(split):
        return f"the dataset has no {split} split; it has {', '.join(sorted(manifest.splits))}"
    return None


def held_out_plan(recipe: TrainRecipe) -> dict[str, str] | None:
    """What training's held-out step evaluates (``split``, ``prefix``, the manifest's ``sha256``), or None
    (:func:`no_held_out` says why, on the terminal)."""
    from training.launch import load_manifest

    split = recipe.data.test_split
    if split is None:
        return None
    manifest, data = load_manifest(recipe)
    why = no_held_out(recipe, manifest)
    if why:
        print(f"held-out evaluation: none ({why})", flush=True)
        return None
    return {"split": split, "prefix": metric_prefix(split), "sha256": mf.sha256_of(data)}


def held_out_outcome(tracking_uri: str, run_id: str, recipe: TrainRecipe, plan: dict[str, str]):
    """``(EvalOutcome, None)`` of a held-out step that succeeded, ``(None, error)`` of one that failed."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    error = client.get_run(run_id).data.tags.get(HELD_OUT_ERROR)
    if error:
        return None, error
    return _outcome(client, run_id, recipe, plan["split"], plan["prefix"], plan["sha256"]), None


def _outcome(client, run_id: str, recipe: TrainRecipe, split: str, prefix: str, sha256: str) -> EvalOutcome:
    """Tag what was evaluated; the outcome from the run's metrics (Ray Train keeps only the metrics reported
    with a checkpoint, and an evaluation reports none)."""
    url = recipe.data.dataset
    client.set_tag(run_id, f"{prefix}dataset", url)
    client.set_tag(run_id, f"{prefix}manifest_sha256", sha256)
    run = client.get_run(run_id)
    logged = {k: v for k, v in run.data.metrics.items() if k.startswith(prefix)}
    # an earlier evaluation's under this prefix stay in the run: not this one's where it drew none
    if not recipe.eval.bootstrap:
        logged = {k: v for k, v in logged.items() if not k.endswith(BOUNDS)}
    # a level's (or the samples') operating point and temperature
    drawn = (("op_", recipe.eval.operating_point), ("temperature$", recipe.eval.calibration != "none"))
    none = [name for name, made in drawn if not made]
    if none:
        stale = re.compile(rf"^{re.escape(prefix)}(?:(?:{'|'.join(LEVELS)})_)?(?:{'|'.join(none)})")
        logged = {k: v for k, v in logged.items() if not stale.match(k)}
    warning = run.data.tags.get(f"{prefix}{SCALE_WARNING}")
    how = None
    if any(k.endswith("_ci_low") for k in logged):
        how = f"{recipe.eval.confidence:.0%} intervals of {recipe.eval.bootstrap} bootstrap resamples of patients"
        how += " (of a proportion of patients, Clopper-Pearson's)"
    op = recipe.eval.operating_point if any("op_threshold_" in k for k in logged) else None
    return EvalOutcome(run_id, prefix, url, split, logged, list(recipe.eval.levels), warning, how, op)


def check_own_dataset(recorded: str | None, manifest, data: bytes, url: str, split: str, run_id: str) -> None:
    """Evaluating a run on its own dataset's ``split`` needs the patients the run trained on to be out of it:
    so it is when the dataset is the version the run recorded, or grew from it (inputs added or retried keep their
    patient's split), but a dataset made again may have split its patients otherwise."""
    change = mf.change_since(recorded, manifest, data)
    if change == "replaced":
        raise ValueError(
            f"{url} was made again since run {run_id} trained on it ({mf.versions(recorded, data)}): its {split} "
            f"split may hold patients the model trained on. To evaluate on it anyway, as another dataset, give "
            f"--dataset {url} (metrics external_{split}_*)"
        )
    if change == "grown":
        since = [a.previous_sha256 for a in manifest.amended].index(recorded)
        amendments = manifest.amended[since:]
        added = sum(a.added + a.retried for a in amendments)
        replaced = sum(a.replaced for a in amendments)
        merged = sum(a.merged for a in amendments)
        what = [f"grew by {added} input(s)"] if added or not (replaced or merged) else []
        what += [f"had {replaced} input(s) replaced"] if replaced else []
        what += [f"had {merged} small shard(s) merged"] if merged else []
        print(
            f"note: {url} {' and '.join(what)} since run {run_id} trained on it; the patients it held keep their "
            f"splits, so its {split} split holds no patient the model trained on",
            flush=True,
        )


def evaluate_run(
    run: str,
    tracking_uri: str,
    storage_path: str,
    split: str = "test",
    dataset: str | None = None,
    name: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> EvalOutcome:
    """Evaluate run ``run``'s exported model on ``split`` of its own dataset or of ``dataset``; metrics and
    pictures into the run. ``name`` prefixes them (default: the split's name, ``external_<split>`` for another
    dataset). The run's recipe, with ``overrides`` of where it runs (``launch.EVALUATE_KEYS``: the metrics do not
    depend on the number of workers)."""
    from mlflow import MlflowClient

    from training.export import class_map, export_outputs
    from training.launch import MANIFEST_TAG, load_manifest
    from training.outputs import outputs_of
    from training.preflight import check_positive

    client = MlflowClient(tracking_uri)
    run_id, recipe = run_on(client, run, overrides, dataset)
    url = recipe.data.dataset
    manifest, data = load_manifest(recipe, trains=False)  # an external cohort may hold one of its classes
    if manifest.missing_splits(split):
        raise ValueError(f"{url}: the manifest has no {split} split (has {sorted(manifest.splits)})")
    if not tracking.has_artifact(client, run_id, MODEL_ARTIFACT):
        raise ValueError(f"run {run_id} has no exported model (it finished no epoch)")
    tags = client.get_run(run_id).data.tags
    if not dataset:
        check_own_dataset(tags.get(MANIFEST_TAG), manifest, data, url, split, run_id)
    model_outputs = export_outputs(export_description(client, run_id))
    check_positive(recipe, model_outputs, "the model")  # given to evaluate, not trained with
    if class_map(model_outputs, outputs_of(recipe, manifest), url, recipe.task) and (
        absent := [c for c in model_outputs if c not in manifest.classes]
    ):
        print(
            f"note: {url} holds {len(manifest.classes)} of the model's {len(model_outputs)} classes; without "
            f"{', '.join(absent)}: their precision, recall and F1 count 0 in the macro means, and AUC is not defined",
            flush=True,
        )
    prefix = metric_prefix(split, name or (f"external_{split}" if dataset else None))
    check_prefix_free(tags, prefix, run_id)
    config = {"recipe": recipe.model_dump(), "split": split, "prefix": prefix}
    config |= {"mlflow_uri": tracking_uri, "run_id": run_id}
    group = f"{prefix}{run_id[:12]}-{uuid.uuid4().hex[:8]}"  # new each time: Ray Train resumes a run by its name
    run_group(eval_loop, config, recipe, storage_path, group, f"evaluation of run {run_id} on {url} ({split})")
    if not dataset and split == recipe.data.test_split and prefix == metric_prefix(split):  # the step, retried
        tracking.RunLogger(tracking_uri, run_id).untag(HELD_OUT_ERROR)
    return _outcome(client, run_id, recipe, split, prefix, mf.sha256_of(data))


def run_on(client, run: str, overrides: list[str] | tuple[str, ...], dataset: str | None) -> tuple[str, TrainRecipe]:
    """Run ``run``'s id and its recipe, with the ``overrides`` of where it runs (which the cluster must hold) and
    ``dataset`` in place of its own where given."""
    from training.capacity import check_capacity, wants_gpu
    from training.launch import run_recipe

    run_id = tracking.resolve_run(client, run)
    recipe = run_recipe(client, run_id, overrides)
    check_capacity(recipe, wants_gpu(recipe))
    if dataset:  # validated, as a recipe's own dataset is (a local path made absolute for the workers)
        data = type(recipe.data).model_validate(recipe.data.model_dump() | {"dataset": dataset})
        recipe = recipe.model_copy(update={"data": data})
    return run_id, recipe


def export_description(client, run_id: str) -> dict:
    """The run's exported model's description (``model.json``: its outputs, input size, scale), read on the
    driver before any worker starts."""
    from training.export import MODEL_JSON

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, f"{MODEL_ARTIFACT}/{MODEL_JSON}", tmp)).read_text())


def run_group(loop, config: dict[str, Any], recipe: TrainRecipe, storage_path: str, group: str, what: str) -> None:
    """Run ``loop`` on a Ray Train worker group of ``recipe`` (its workers, or the overrides of where it runs)
    named ``group``; ``what`` it does names it in an interruption's or a failure's message."""
    from ray.train import LoggingConfig, RunConfig, TrainingFailedError

    from training.console import train_log_level
    from training.endings import RunFailed, failure_reason, interrupted_as
    from training.launch import storage_location, worker_group
    from training.trainer import torch_trainer

    path, fs = storage_location(storage_path)
    trainer = torch_trainer(
        loop,
        **worker_group(recipe, config),
        run_config=RunConfig(
            name=group, storage_path=path, storage_filesystem=fs, logging_config=LoggingConfig(train_log_level())
        ),
    )
    try:
        with interrupted_as(lambda: f"the {what} did not finish"):
            trainer.fit()
    except TrainingFailedError as exc:  # its message holds rank 0's traceback
        raise RunFailed(f"{what} failed: {failure_reason(exc)}") from exc
