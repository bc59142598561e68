"""Predictions of a run's selected model on a dataset, labelled or not: applying a trained model to new inputs.

Paper 000's STRIP AI test slides come without labels, and so do the slides or series a lab wants a model's calls
on. ``tessera predict`` runs the run's exported model (as ``tessera evaluate`` does: the recipe's workers, each
reading its part of the split) and writes one table per level: each sample, and each slide, patient or series of
the recipe's aggregation, with the call and a probability per class. The tables (pseudonyms only) go into the
run under ``predictions/<name>/``; the driver hands them to the caller, who may reveal the pseudonyms from the
private map (:func:`training.predictions.reveal`) where the map is.
"""

from __future__ import annotations

import json
import re
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shards import manifest as mf
from shards import storage
from training import tracking
from training.config import TrainRecipe
from training.tracking import MODEL_ARTIFACT

PREDICTIONS = "predictions"  # the run's artifact folder: predictions/<name>/predictions_<level>.csv
INDEX = "index.json"  # beside them: the call that wrote them, its levels and its number of samples
HEATMAPS = "heatmaps"  # beside them too: heatmaps/<slide>.png (tessera predict --heatmaps)


@dataclass
class PredictOutcome:
    run_id: str
    name: str
    dataset: str
    split: str
    tables: dict[str, str]  # level (sample, slide, patient, series) -> CSV text
    labelled: bool  # whether the tables carry the samples' labels
    samples: int
    warning: str | None = None  # of the samples' scale, as evaluation's (:data:`~training.evaluation.SCALE_WARNING`)
    made_as: str | None = None  # the dataset's URL as its ingest was given it (``--out``), which names its private map
    checked: Any = None  # what the caller's ``check`` returned


def prediction_name(split: str, own: bool, name: str | None = None) -> str:
    """The folder of a prediction's tables: ``name``, or the split's (``external_<split>`` of another dataset),
    with characters a path should not carry as ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or (split if own else f"external_{split}")).strip("_.") or "_"


def default_split(manifest: mf.ManifestHead) -> str:
    """The split to predict when none is given: the dataset's only one, or ``test``."""
    return next(iter(manifest.splits)) if len(manifest.splits) == 1 else "test"


def labels_for(model_outputs: list[str], manifest: mf.ManifestHead, task: str) -> tuple[bool, str | None]:
    """Whether the samples' labels can go beside the model's calls (the dataset's classes, or multi-label
    names, are the model's; or a classifier's dataset holds some of its classes), and a note where the dataset
    has labels the model does not know."""
    theirs = list(manifest.multilabel or []) if task == "multilabel" else list(manifest.classes)
    if not theirs:
        return False, None
    if theirs == list(model_outputs) or (task == "multiclass" and set(theirs) <= set(model_outputs)):
        return True, None  # some of a classifier's classes: labels in its order (export.class_map)
    return False, f"its labels ({', '.join(theirs)}) are not the model's classes; the tables leave them out"


def predict_split(recipe: TrainRecipe, manifest: mf.ManifestHead, config: dict[str, Any], rank: int, world: int):
    """Every rank of a worker group: the run's exported model on this rank's part of ``config["split"]``; rank 0
    logs the tables. A failure on any rank raises on every rank."""
    from training.calibration import calibrate
    from training.evaluation import exported_predictions, validation_tables
    from training.export import export_outputs, samples_scale_warning
    from training.levels import thresholds
    from training.reporting import prediction_tables

    log = tracking.RunLogger(config["mlflow_uri"], config["run_id"])
    pred, desc = exported_predictions(recipe, manifest, config["split"], log, rank, world, config["labelled"])
    if rank == 0:
        validation = validation_tables(log, recipe)
        pred, temps = calibrate(pred, recipe, export_outputs(desc), validation)
        chosen, notes = thresholds(recipe, export_outputs(desc), validation, temps)
        for note in notes:
            print(f"operating point ({recipe.eval.operating_point}) at {note}", flush=True)
        tables = prediction_tables(pred, recipe, export_outputs(desc), chosen)
        with tempfile.TemporaryDirectory() as tmp:
            for level, text in tables.items():
                (Path(tmp) / f"predictions_{level}.csv").write_text(text)
            # which tables are this call's: a folder written before under the same name may hold other levels
            index = {"group": config["group"], "levels": list(tables), "samples": len(pred["probs"])}
            index["temperatures"] = temps  # each level's, where the probabilities are calibrated
            so = "its calls may be wrong at this scale"
            index["warning"] = samples_scale_warning(desc, pred["metas"], manifest.config, so=so)
            (Path(tmp) / INDEX).write_text(json.dumps(index))
            log.artifacts(Path(tmp), f"{PREDICTIONS}/{config['name']}")


def predict_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point of ``tessera predict``: ``recipe``, ``split``, ``name``, ``labelled``,
    ``mlflow_uri``, ``run_id``."""
    import ray.train

    from training.console import quiet_worker

    quiet_worker()
    ctx = ray.train.get_context()
    recipe = TrainRecipe.model_validate(config["recipe"])
    manifest, _ = mf.load_head(recipe.data.dataset)
    predict_split(recipe, manifest, config, ctx.get_world_rank(), ctx.get_world_size())


def predict_run(
    run: str,
    tracking_uri: str,
    storage_path: str,
    dataset: str | None = None,
    split: str | None = None,
    name: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    check: Callable[[TrainRecipe, list[str], mf.ManifestHead], object] | None = None,
) -> PredictOutcome:
    """Run ``run``'s exported model on ``split`` of ``dataset`` (default: the run's own; its only split, or
    ``test``); the tables go into the run under ``predictions/<name>/`` and come back in the outcome. The run's
    recipe, with ``overrides`` of where it runs (``launch.EVALUATE_KEYS``). ``check(recipe, outputs, manifest)``
    (``outputs``: the model's classes or labels; ``manifest``: the dataset's) raises before any worker starts
    where the caller cannot use the run's tables; what it returns comes back in the outcome."""
    from mlflow import MlflowClient

    from training.endings import RunFailed
    from training.evaluation import export_description, run_group, run_on
    from training.export import export_outputs
    from training.preflight import check_positive

    client = MlflowClient(tracking_uri)
    run_id, recipe = run_on(client, run, overrides, dataset)
    if recipe.task == "detect":
        raise ValueError(
            f"run {run_id} trained a detector: it finds boxes where images are ingested, `tessera ingest images SRC "
            f"--detector {run_id} --crop ...` (`tessera evaluate {run_id}` measures it on a split with boxes)"
        )
    if not tracking.has_artifact(client, run_id, MODEL_ARTIFACT):
        raise ValueError(f"run {run_id} has no exported model (it finished no epoch)")
    outputs = export_outputs(export_description(client, run_id))
    check_positive(recipe, outputs, "the model")  # given to predict, not trained with
    url = recipe.data.dataset
    # its head: what the checks and the split need, whatever the count of inputs (a million: seconds and GBs whole)
    manifest, _ = mf.load_head(url)
    checked = check(recipe, outputs, manifest) if check is not None else None
    split = split or default_split(manifest)
    if manifest.missing_splits(split):
        raise ValueError(f"{url}: the manifest has no {split} split (has {sorted(manifest.splits)})")
    labelled, note = labels_for(outputs, manifest, recipe.task)
    if note:
        print(f"note: {url}: {note}", flush=True)
    name = prediction_name(split, not dataset, name)
    group = f"predict-{run_id[:12]}-{uuid.uuid4().hex[:8]}"  # new each time: Ray Train resumes a run by its name
    config = {"recipe": recipe.model_dump(), "split": split, "name": name, "labelled": labelled, "group": group}
    config |= {"mlflow_uri": tracking_uri, "run_id": run_id}
    run_group(predict_loop, config, recipe, storage_path, group, f"predictions of run {run_id} on {url} ({split})")
    client.set_tag(run_id, f"{PREDICTIONS}.{name}.dataset", url)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, f"{PREDICTIONS}/{name}", tmp))
        index = json.loads((local / INDEX).read_text())
        if index["group"] != group:
            raise RunFailed(f"predictions of run {run_id} on {url} ({split}): its tables were not written")
        tables = {level: (local / f"predictions_{level}.csv").read_text() for level in index["levels"]}
    found = (tables, labelled, index["samples"], index["warning"])
    return PredictOutcome(run_id, name, url, split, *found, made_as=manifest.dataset, checked=checked)


def draw_heatmaps(sample_table: str, dataset: str, write: Callable[[str, Callable[[str], bytes]], None]):
    """Each slide of ``sample_table`` in turn: ``write(pseudonym, draw)``, where ``draw(name)`` gives the slide's
    heatmap (PNG) on its preview in ``dataset``, titled ``slide <name>`` and its label where the table has one. One
    slide's preview and heatmaps are held at a time, however many slides there are. Returns how many slides were
    handed over and a note of those that could not be drawn."""
    from training.heatmaps import heatmap_png, labels_by_slide, tiles_by_slide

    tiles, classes, exclusive = tiles_by_slide(sample_table)
    if not tiles:
        return 0, "no heatmaps: they are drawn on slides, and these samples are not tiles of slides"
    scales = {r.item: r.preview_scale for r in mf.load(dataset).inputs if r.item}
    labels = labels_by_slide(sample_table)
    drawn, unplaced, gone = 0, 0, 0
    for slide, (boxes, probs) in tiles.items():
        if not scales.get(slide):
            unplaced += 1
            continue
        try:
            preview = storage.get_bytes(mf.preview_url(dataset, slide))
        except storage.Missing:
            gone += 1
            continue
        label = f", label {labels[slide]}" if slide in labels else ""

        def draw(name: str, preview=preview, boxes=boxes, probs=probs, slide=slide, label=label) -> bytes:
            return heatmap_png(preview, boxes, probs, classes, scales[slide], f"slide {name}{label}", exclusive)

        write(slide, draw)
        drawn += 1
    notes = [f"{gone} slide(s) have no preview in the dataset"] if gone else []
    if unplaced:
        notes.append(
            f"the manifest does not say where {unplaced} slide(s)' tiles lie on their previews (it was written "
            "before Tessera recorded it; ingesting them again records it)"
        )
    return drawn, f"no heatmap of some slides: {'; '.join(notes)}" if notes else None


def log_heatmaps(
    tracking_uri: str,
    run_id: str,
    folder: str,
    sample_table: str,
    dataset: str,
    also: Callable[[str, bytes, Callable[[str], bytes]], None] | None = None,
) -> tuple[int, str | None]:
    """:func:`draw_heatmaps` into the run's ``folder``, each slide's PNG named and titled by its pseudonym;
    ``also(slide, png, draw)`` is handed each one too (the caller's own copy). How many, and the note."""
    with tempfile.TemporaryDirectory() as tmp:

        def write(slide: str, draw: Callable[[str], bytes]) -> None:
            png = draw(slide)
            (Path(tmp) / f"{slide}.png").write_bytes(png)
            if also is not None:
                also(slide, png, draw)

        drawn, note = draw_heatmaps(sample_table, dataset, write)
        tracking.RunLogger(tracking_uri, run_id).artifacts(Path(tmp), folder)
    return drawn, note


def evaluation_heatmaps(tracking_uri: str, run_id: str, prefix: str, dataset: str) -> tuple[str, int, str | None]:
    """The heatmaps of an evaluation (``tessera evaluate --heatmaps``), drawn from its sample table in the run
    and titled with each slide's label, into the run's ``<prefix>heatmaps/``: that folder, how many, and a note."""
    from mlflow import MlflowClient

    folder = f"{prefix}{HEATMAPS}"
    with tempfile.TemporaryDirectory() as tmp:
        path = MlflowClient(tracking_uri).download_artifacts(run_id, f"{prefix}predictions_sample.csv", tmp)
        table = Path(path).read_text()
    drawn, note = log_heatmaps(tracking_uri, run_id, folder, table, dataset)
    return folder, drawn, note


def training_heatmaps(tracking_uri: str, run_id: str, recipe, held_out) -> list[str]:
    """After a training whose recipe asks for them (``eval.heatmaps``), the heatmaps of its validation slides and,
    where the held-out step ran (``held_out``, its EvalOutcome), of its test slides, both from the selected model
    (the best epoch's, or the SWA average): a line saying what each step drew.
    A failure is said, not raised: the model trained and stays registered."""
    steps = [("validation", "", recipe.data.val_split)]
    if held_out is not None:
        steps.append(("held-out", held_out.prefix, held_out.split))
    lines = []
    for what, prefix, split in steps:
        try:
            folder, drawn, note = evaluation_heatmaps(tracking_uri, run_id, prefix, recipe.data.dataset)
        except Exception as exc:  # storage or MLflow: the training itself succeeded
            retry = f"`tessera evaluate {run_id} --split {split} --heatmaps` draws them"
            lines.append(f"{what} heatmaps failed ({retry}): {type(exc).__name__}: {exc}")
            continue
        lines.append(f"{what} slides' heatmaps: {drawn} in the run's {folder}/" + (f" ({note})" if note else ""))
    return lines
