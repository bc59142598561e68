"""Rank 0's MLflow writing during training: per-epoch metrics, the exported model, final pictures."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from shards import scratch
from training.outbox import Outbox
from training.tracking import RunLogger, answers


class Reporter:
    """Writes into the driver's MLflow run; created on rank 0 only, so a run has one writer. What the server
    does not take while it is away waits in an :class:`training.outbox.Outbox`; training goes on."""

    def __init__(self, trainer, config: dict[str, Any]) -> None:
        self.t = trainer
        uri = config["mlflow_uri"]
        self.log = Outbox(RunLogger(uri, config["run_id"]), lambda: answers(uri), uri, trainer.unsent)
        # the stage the engine runs, which on one worker may be below the recipe's (training.engine.zero_stage)
        self.log.tag("deepspeed.zero_stage_used", str(trainer.engine.zero_optimization_stage()))
        self.log.tag("workers_used", str(trainer.world))  # the recipe's `workers`, or what a resume moved it to
        self.log.tag("precision_used", "bf16" if trainer.engine.torch_autocast_enabled() else "fp32")  # `auto`'s pick

    def epoch(self, metrics: dict[str, float], epoch: int) -> None:
        self.log.metrics({k: v for k, v in metrics.items() if k != "epoch"}, step=epoch)

    def export(self, module, folder: str, metas: list[dict]) -> None:
        """Export ``module``'s weights (under ZeRO-3, called while they are gathered) in a freshly built model:
        a copy of the engine's module would carry DeepSpeed's ZeRO-3 hooks into tracing, which fail on it.
        ``metas``: the validation samples', whose scale the export records."""
        from training.detection import save_detector
        from training.export import save_export, tile_width_um
        from training.models import recipe_model

        r = self.t.recipe
        built = r.model_copy(update={"model": r.model.model_copy(update={"pretrained": False, "freeze": "none"})})
        with torch.random.fork_rng(devices=[]):  # its initial weights, replaced below, take no draws from training
            plain = recipe_model(built, len(self.t.outputs))
        plain.load_state_dict({k: v.detach().cpu() for k, v in module.state_dict().items()})
        with scratch.directory("export") as tmp:  # the weights: what a killed worker leaves is swept
            if r.task == "detect":
                out = save_detector(plain, Path(tmp) / folder, r.model, self.t.outputs, r.data.image_size)
            else:
                out = save_export(
                    plain,
                    Path(tmp) / folder,
                    r.model,
                    self.t.manifest.classes,
                    r.data.image_size,
                    r.data.frames,
                    self.t.outputs if r.task == "multilabel" else None,
                    tile_width_um(metas, self.t.manifest.config),
                )
            self.log.artifacts(out, folder)

    def keep_with(self, checkpoint_dir: str) -> None:
        """What waits for the server goes into the checkpoint being saved: a worker restarted from it sends it."""
        self.log.keep_with(checkpoint_dir)

    def drain(self) -> None:
        """After the last epoch: what waits reaches the server (waiting for it), or the run fails, resumable."""
        self.log.drain(self.t.recipe.tracking.outage_wait_s)
        self.log.close()

    def final(self, pred: dict[str, Any]) -> None:
        """Confusion matrices, ROC curves and predictions of the validation split by the selected model (logged
        with its export: they replace an earlier epoch's); a detector's boxes per image. Each site's table from
        the sites' results the epoch's evaluation kept in ``pred["sites"]``, not computed again."""
        log_evaluation(self.log, self.t.recipe, self.t.outputs, pred, "validation", sites=pred.get("sites"))


def prediction_levels(pred: dict[str, Any], recipe):
    """``(level, id columns, probs, labels, threshold)`` at sample level and at each aggregation level the
    samples name (a group's columns: its site where the samples name theirs, and its id); labels None where
    ``pred["labels"]`` is (samples without labels)."""
    from training.levels import by_level, level_threshold
    from training.predictions import sample_columns
    from training.sites import group_sites

    def threshold(level: str) -> float | None:
        return level_threshold(recipe, level) if recipe.task == "multiclass" else recipe.eval.threshold

    yield "sample", sample_columns(pred["metas"]), pred["probs"], pred["labels"], threshold("sample")
    for level, ids, p, y in by_level(pred, recipe):
        yield level, group_sites(pred["metas"], level, ids) | {level: ids}, p, y, threshold(level)


def prediction_tables(pred: dict[str, Any], recipe, outputs: list[str], chosen=None) -> dict[str, str]:
    """The prediction table (CSV) of each level of :func:`prediction_levels` that has samples, with the calls at
    the thresholds ``chosen`` on validation (:func:`training.levels.thresholds`) where given."""
    from training.predictions import prediction_table

    multilabel = recipe.task == "multilabel"
    return {
        level: prediction_table(columns, p, y, outputs, multilabel, cut, _cuts(chosen, level))
        for level, columns, p, y, cut in prediction_levels(pred, recipe)
        if len(p)
    }


def _cuts(chosen, level: str) -> dict[int, float]:
    """Each output's threshold at ``level`` of :func:`training.levels.thresholds`' choice (None: none)."""
    return {k: cut for k, (cut, _) in (chosen or {}).get(level, {}).items()}


def log_evaluation(
    log: RunLogger,
    recipe,
    outputs: list[str],
    pred: dict[str, Any],
    split: str,
    prefix: str = "",
    sites=None,
    chosen=None,
):
    """Confusion matrices (PNG and JSON, multi-class), ROC curves, reliability diagrams and the predictions (CSV;
    with the calls at the thresholds ``chosen`` on validation, where given) of ``pred`` at sample level and each
    aggregation level, and the metrics of each site (``sites``: of :func:`training.sites.by_site`, computed where
    None) as a table; files named ``<prefix>confusion_<level>.png``, ``<prefix>by_site.csv``..., titles naming
    ``split``."""
    from training.metrics import confusion
    from training.plots import calibration_png, confusion_png, roc_png
    from training.predictions import prediction_table
    from training.sites import by_site, site_table

    if recipe.task == "detect":
        from training.detection import detections_table

        with tempfile.TemporaryDirectory() as tmp:
            table = Path(tmp) / f"{prefix}detections.csv"
            table.write_text(detections_table(pred, outputs, recipe.eval.threshold, recipe.data.image_size))
            log.artifact(table)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for level, columns, p, y, threshold in prediction_levels(pred, recipe):
            if len(y) == 0:
                continue
            title = f"{split}, {level} level"
            if recipe.task == "multiclass":
                cm = confusion(y, p, threshold)
                log.artifact(confusion_png(cm, outputs, Path(tmp) / f"{prefix}confusion_{level}.png", title))
                data = Path(tmp) / f"{prefix}confusion_{level}.json"  # for averaging over replicates
                data.write_text(json.dumps({"classes": outputs, "matrix": cm.tolist()}))
                log.artifact(data)
            log.artifact(roc_png(y, p, outputs, recipe.task, Path(tmp) / f"{prefix}roc_{level}.png", title))
            where = Path(tmp) / f"{prefix}calibration_{level}.png"
            log.artifact(calibration_png(y, p, outputs, recipe.task, where, title))
            table = Path(tmp) / f"{prefix}predictions_{level}.csv"
            multilabel, cuts = recipe.task == "multilabel", _cuts(chosen, level)
            table.write_text(prediction_table(columns, p, y, outputs, multilabel, threshold, cuts))
            log.artifact(table)
        sites = by_site(pred, recipe, outputs) if sites is None else sites
        if sites:
            table = Path(tmp) / f"{prefix}by_site.csv"
            table.write_text(site_table(sites))
            log.artifact(table)
