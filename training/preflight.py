"""What the driver checks of a recipe against its dataset before any work: each would otherwise fail the run at
its first evaluation, after an epoch of training, and again on each of Ray Train's retries."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Sequence

import numpy as np

from shards import manifest as mf
from training.aggregate import mixed_groups
from training.config import RecipeError, TrainRecipe
from training.metrics import HEADLINE, level_prefix


def check_against(recipe: TrainRecipe, manifest: mf.ManifestBrief | mf.Manifest, trains: bool = True) -> None:
    """A dataset with labels (of slides, for heatmaps; not of DICOM series, for stain jitter; of two classes or
    more for a classifier it ``trains``), then :func:`check_patient_labels` and :func:`check_monitor` for
    ``recipe`` on ``manifest``."""
    from training.outputs import outputs_of

    outputs = outputs_of(recipe, manifest)
    if not outputs:
        raise RecipeError(
            f"data.dataset: {recipe.data.dataset} has no labels (ingested without a label table, or with one "
            f"without a label column): a model is neither trained nor evaluated on it; `tessera predict RUN "
            f"--dataset {recipe.data.dataset}` calls its inputs with a trained run's model"
        )
    if trains and recipe.task == "multiclass" and len(outputs) < 2:  # a loss of 0 from its first step
        raise RecipeError(
            f"data.dataset: {recipe.data.dataset} has one class ({outputs[0]}), and a classifier needs two or more "
            "(from class folders, each image's folder names its class: ingest the folder that holds those folders)"
        )
    if recipe.eval.heatmaps and manifest.kind != "wsi":
        raise RecipeError(
            f"eval.heatmaps: heatmaps are drawn over slides, and {recipe.data.dataset} holds {manifest.kind} "
            "inputs, not slides"
        )
    if recipe.data.augment.hed_p > 0 and manifest.kind == "dicom":  # an image folder may hold stained tissue
        raise RecipeError(
            f"data.augment.hed_p: stain jitter moves the amounts of haematoxylin, eosin and DAB (shards.stain), "
            f"and {recipe.data.dataset} holds DICOM series, whose windows no stain made"
        )
    if trains:  # of the classes it trains on (an external cohort may hold one of them: the model's are checked)
        check_positive(recipe, outputs, recipe.data.dataset)
    check_patient_labels(recipe, manifest)
    check_monitor(recipe, outputs, split_sites(manifest, recipe.data.val_split))


def check_positive(recipe: TrainRecipe, classes: list[str], of: str) -> None:
    """``eval.positive`` is one of the two ``classes`` of ``of`` (a dataset a classifier trains on, or the model
    that ``evaluate`` or ``predict`` is given it for): the operating point is a binary classifier's."""
    positive = recipe.eval.positive
    if positive and (len(classes) != 2 or positive not in classes):
        raise RecipeError(
            f"eval.positive: {positive!r} is not one of the two classes of {of} (it has {', '.join(classes)}): "
            "the operating point is a binary classifier's"
        )


def untrained_classes(recipe: TrainRecipe, manifest: mf.ManifestHead) -> str | None:
    """A warning naming the classes a classifier's training split holds no sample of (a class of few patients,
    all in other splits): the model is never shown them. None where it holds every class (or cannot say: a
    manifest whose shards do not record their samples' classes)."""
    split = recipe.data.train_split
    if recipe.task != "multiclass" or manifest.missing_splits(split):
        return None
    found = set(manifest.sample_classes(split) or range(len(manifest.classes)))
    if absent := [c for i, c in enumerate(manifest.classes) if i not in found]:
        return f"warning: the training split ({split}) holds no sample of {', '.join(absent)}: the model never sees it"
    return None


def check_patient_labels(recipe: TrainRecipe, manifest: mf.ManifestBrief | mf.Manifest) -> None:
    """A patient of the evaluated splits whose inputs are labelled differently has no truth when the recipe
    aggregates patients by mean or max (``any`` makes a patient positive when any input is)."""
    if recipe.task != "multiclass" or recipe.eval.how == "any" or "patient" not in recipe.eval.levels:
        return
    splits = {*mf.split_names(recipe.data.val_split), *mf.split_names(recipe.data.test_split or "")}
    ingested = [r for r in manifest.inputs if r.status == "ingested" and r.split in splits and r.label is not None]
    mixed = mixed_groups((r.patient, r.label) for r in ingested if r.patient)
    if mixed:
        patient, labels = next(iter(mixed.items()))
        raise RecipeError(
            f"eval.levels: patient {patient} of {recipe.data.dataset} has inputs labelled "
            f"{' and '.join(manifest.classes[i] for i in labels)} ({len(mixed)} such patient(s) in the "
            f"{'/'.join(sorted(splits))} split(s)); aggregating by {recipe.eval.how} needs one label per patient: "
            "leave 'patient' out of eval.levels, or for a negative/positive task set eval.how=any"
        )


def split_sites(manifest: mf.ManifestBrief | mf.Manifest, split: str | None) -> list[str]:
    """The sites of the ingested inputs of ``split`` (``a+b``: each), in :func:`shards.schema.site_order`."""
    from shards.schema import site_order

    names = mf.split_names(split) if split else []
    return site_order(r.site for r in manifest.inputs if r.status == "ingested" and r.split in names)


def validation_metrics(recipe: TrainRecipe, outputs: list[str], sites: Sequence[str] = ()) -> set[str]:
    """The names of the validation metrics a run of ``recipe`` reports each epoch: its metric functions on a
    made-up prediction in which every class (or label) occurs and every sample names every level, and of each
    of ``sites`` (the validation split's) where they are two or more."""
    from training.levels import evaluate

    if recipe.task == "detect":  # a box of each class, found
        box = np.array([[0.0, 0.0, 10.0, 10.0]], np.float32)
        true = [{"boxes": box, "labels": np.array([c])} for c in range(len(outputs))]
        found = [t | {"scores": np.array([0.9], np.float32)} for t in true]
        return set(evaluate({"found": found, "true": true, "metas": []}, recipe, outputs))
    n = 2 * len(outputs)
    if recipe.task == "multilabel":
        labels = np.array([[(i + j) % 2 for j in range(len(outputs))] for i in range(n)])
    else:
        labels = np.arange(n) % len(outputs)
    probs = np.full((n, len(outputs)), 1 / len(outputs))
    metas = [dict.fromkeys(recipe.eval.levels, str(i)) for i in range(n)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn's, on predictions that call nothing
        names = set(evaluate({"probs": probs, "labels": labels, "metas": metas, "loss": 0.0}, recipe, outputs))
    return names | site_names(names, recipe, sites, "val_", counts=False)


def site_names(
    names: set[str], recipe: TrainRecipe, sites: Sequence[str], prefix: str, counts: bool, held_out: bool = False
) -> set[str]:
    """The metrics of each of ``sites`` and of the worst (:func:`training.sites.site_metrics`) under ``prefix``, of
    those of the validation metrics ``names`` that are reported per site (``held_out``: with their intervals,
    where the recipe draws them); none for fewer than two sites."""
    from training.intervals import BOUNDS
    from training.sites import site_metrics

    if len(sites) < 2 or recipe.task == "detect":
        return set()
    ends = ("", *BOUNDS) if held_out and recipe.eval.bootstrap else ("",)
    levels = {lv: level_prefix(lv, "val_") for lv in ("sample", *recipe.eval.levels)}
    each = {
        lv: {"count": 0.0} | {k + e: 0.0 for k in HEADLINE if pre + k in names for e in ends}
        for lv, pre in levels.items()
    }
    return set(site_metrics(dict.fromkeys(sites, each), prefix, counts))


def check_monitor(recipe: TrainRecipe, outputs: list[str], sites: Sequence[str] = ()) -> None:
    """The monitored metric (early stopping, plateau schedule, best model) must be one the run reports (its
    validation split's ``sites``' too): a level left out of ``eval.levels`` takes its metrics with it. Also fails
    an aggregation the outputs cannot take."""
    try:
        names = validation_metrics(recipe, outputs, sites)
    except ValueError as exc:  # `any` over more than two classes
        raise RecipeError(f"eval.how: {exc}") from None
    monitor = recipe.eval.monitor
    if monitor.startswith("val_") and monitor not in names:
        close = difflib.get_close_matches(monitor, sorted(names), n=3, cutoff=0.7)
        raise RecipeError(
            f"eval.monitor: {monitor!r} is not a metric this recipe reports (eval.levels {recipe.eval.levels}, "
            f"{len(outputs)} outputs"
            + (f", validation sites {', '.join(sites)}" if len(sites) > 1 else "")
            + ")"
            + (f"; close: {', '.join(close)}" if close else "")
        )


def check_each_epoch(recipe: TrainRecipe, manifest: mf.ManifestBrief | mf.Manifest, metric: str, who: str) -> None:
    """``metric``, a validation metric (``val_*``) a sweep's search and scheduler read, is one every epoch of a run
    of ``recipe`` reports on ``manifest`` (of its validation split's sites too): Tune stops the sweep at the first
    report without it, after an epoch of every trial. SWA's ``val_swa_*`` come with the last epoch alone."""
    from training.outputs import outputs_of

    if not metric.startswith("val_"):
        return
    names = validation_metrics(recipe, outputs_of(recipe, manifest), split_sites(manifest, recipe.data.val_split))
    if metric not in names:
        close = difflib.get_close_matches(metric, sorted(names), n=3, cutoff=0.7)
        raise RecipeError(
            f"{who}: {metric!r} is not a metric {recipe.name} reports each epoch on {recipe.data.dataset}"
            + (f"; close: {', '.join(close)}" if close else f"; it reports {', '.join(sorted(names))}")
        )


def reported_metrics(recipe: TrainRecipe, manifest: mf.ManifestBrief | mf.Manifest) -> set[str]:
    """The evaluation metrics a run of ``recipe`` on ``manifest`` logs: each epoch's (:func:`validation_metrics`;
    with SWA, its averaged weights' ``val_swa_*`` too) and the held-out step's, under its split's prefix, with
    those of each site of the split's inputs where they are of two or more (:mod:`training.sites`)."""
    from training.evaluation import metric_prefix, no_held_out
    from training.outputs import outputs_of

    outputs = outputs_of(recipe, manifest)
    names = validation_metrics(recipe, outputs)
    held_out = recipe.data.test_split if recipe.data.test_split and not no_held_out(recipe, manifest) else None
    val_sites = split_sites(manifest, recipe.data.val_split)
    out = set(names)
    for prefix in ["val_"] + (["val_swa_"] if recipe.swa.enabled else []):
        out |= {prefix + n.removeprefix("val_") for n in names} | site_names(names, recipe, val_sites, prefix, False)
    if held_out:
        prefix = metric_prefix(held_out)
        held_sites = split_sites(manifest, held_out)
        out |= {prefix + n.removeprefix("val_") for n in names} | site_names(
            names, recipe, held_sites, prefix, True, True
        )
        out |= {prefix + n for n in held_out_reports(recipe, outputs, names)}
    return out


def held_out_reports(recipe: TrainRecipe, outputs: list[str], validation: set[str]) -> set[str]:
    """The held-out evaluation's names (unprefixed) besides the validation metrics' (``validation``, of
    :func:`validation_metrics`): each interval's bounds (:func:`training.levels.intervals`), the operating
    point's rates and their bounds (:func:`training.levels.operating_points`) and the calibration's temperature
    (:mod:`training.calibration`), at each level."""
    from training.calibration import temperature_metric
    from training.intervals import BOUNDS
    from training.levels import with_interval
    from training.metrics import metric_name

    if recipe.task == "detect":
        return set()
    names = {n.removeprefix("val_") for n in validation}
    bounds = BOUNDS if recipe.eval.bootstrap else ()
    out = set()
    for level in ("sample", *recipe.eval.levels):
        pre = level_prefix(level)
        # the level's own names (at sample level every name, of which with_interval keeps only the unprefixed)
        own = {n.removeprefix(pre) for n in names if n.startswith(pre)}
        out |= {f"{pre}{n}{b}" for n in own if with_interval(n) for b in bounds}
        if recipe.eval.calibration == "temperature":
            out.add(temperature_metric(level))
        if recipe.eval.operating_point:
            each = outputs if recipe.task == "multilabel" else [recipe.eval.positive or ""]
            for name in map(metric_name, each):
                out.add(f"{pre}op_threshold_{name}")
                rates = [f"{pre}op_{r}_{name}" for r in ("sensitivity", "specificity", "ppv", "npv")]
                out |= {f"{r}{b}" for r in rates for b in ("", *bounds)}
    return out


def check_compared(recipe: TrainRecipe, manifest: mf.ManifestBrief | mf.Manifest, metrics: list[str], who: str) -> None:
    """Each of ``metrics`` that names an evaluation metric (``val_*``, or the held-out split's ``test_*``) is one
    a run of ``recipe`` logs: a comparison of replicates finds out after hours of training otherwise. Other names
    (``train_loss``, ``lr``...) are left to the comparison itself."""
    from training.evaluation import metric_prefix

    names = reported_metrics(recipe, manifest)
    checked = ("val_", metric_prefix(recipe.data.test_split or "test"))
    for metric in metrics:
        if metric.startswith(checked) and metric not in names:
            close = difflib.get_close_matches(metric, sorted(names), n=3, cutoff=0.7)
            raise RecipeError(
                f"{who}: {metric!r} is not a metric {recipe.name} logs on {recipe.data.dataset}"
                + (f"; close: {', '.join(close)}" if close else f"; it logs {', '.join(sorted(names))}")
            )
