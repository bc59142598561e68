"""Temperature scaling (Guo et al., 2017): a model's probabilities made to read as risks by one number per level,
fitted on the validation split.

A network trained to its best validation accuracy is often over-confident: its 0.95 is right far less than 95 % of
the time, and a log loss (STRIP AI's and RSNA's competitions score one) punishes the confident mistakes most. Each
class's log-probability (a label's logit) is divided by a temperature T chosen to minimise the recipe's loss on the
validation split's predictions of the selected model; T > 1 softens, T < 1 sharpens. The order of a sample's
classes is unchanged, and so are the argmax calls and the accuracy; so is the order of the samples by a label's
score, or by a class's of two, and with it their AUC (of three classes or more, a class's ranking may move a
little). A call at a threshold other than 0.5 (``eval.how: any``'s) moves with the probabilities. The log losses,
the Brier score, the held-out loss and the reliability diagrams read the scaled probabilities. Each
aggregation level (slide, patient) has its own T, fitted on that level's validation table, applied to the groups'
probabilities as aggregated from the samples' unscaled ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from training.config import TrainRecipe
from training.metrics import EPS
from training.predictions import LabelledTable

BOUNDS_T = (0.05, 20.0)  # the temperatures searched (log-uniformly)


def temperature_metric(level: str, prefix: str = "") -> str:
    """The metric a level's temperature is logged as: ``<prefix>temperature``, ``<prefix>patient_temperature``."""
    from training.metrics import level_prefix

    return f"{level_prefix(level, prefix)}temperature"


def scaled(probs: np.ndarray, temperature: float, multilabel: bool) -> np.ndarray:
    """``probs`` at ``temperature``: softmax of ``log p / T`` per row (a class's), or sigmoid of ``logit(p) / T``
    per label; T = 1 returns them unchanged."""
    if temperature == 1.0 or not len(probs):
        return np.asarray(probs)
    p = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS)
    if multilabel:
        return 1.0 / (1.0 + np.exp(-np.log(p / (1 - p)) / temperature))
    z = np.log(p) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def loss_of(multilabel: bool) -> Callable[[np.ndarray, np.ndarray], float]:
    """The loss a temperature is fitted to: the recipe's headline log loss (RSNA's, or STRIP AI's weighted one)."""
    from training.metrics import rsna_log_loss, weighted_log_loss

    return rsna_log_loss if multilabel else weighted_log_loss


def fit_temperature(probs: np.ndarray, labels: np.ndarray, multilabel: bool) -> float:
    """The temperature minimising :func:`loss_of` on ``probs`` and their ``labels`` (class indices, or 0/1 per
    label), searched over :data:`BOUNDS_T`; ValueError where the labels hold one class only (any T > 1 or < 1 then
    only moves toward it)."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(labels)
    if (multilabel and not ((y == 0).any() and (y == 1).any())) or (not multilabel and len(set(y.tolist())) < 2):
        raise ValueError("one class only")
    loss = loss_of(multilabel)
    low, high = (math.log(b) for b in BOUNDS_T)
    found = minimize_scalar(
        lambda t: loss(y, scaled(probs, math.exp(t), multilabel)), bounds=(low, high), method="bounded"
    )
    return float(math.exp(found.x))


def temperatures(
    recipe: TrainRecipe, outputs: list[str], validation: dict[str, LabelledTable]
) -> tuple[dict[str, float], list[str]]:
    """``{level: T}`` fitted on the validation split's predictions at each level (``validation``: the run's
    ``predictions_<level>.csv``) where the recipe asks for ``eval.calibration: temperature``, and a note for each
    level without one, saying why."""
    from training.levels import validation_levels
    from training.metrics import metric_name

    if recipe.eval.calibration != "temperature" or recipe.task == "detect":
        return {}, []
    multilabel = recipe.task == "multilabel"
    out, notes = {}, []
    for level, table in validation_levels(recipe, validation, notes):
        order = [table.outputs.index(metric_name(o)) for o in outputs]
        probs = table.probs[:, order]
        try:
            if multilabel:
                labels = np.array([[label[j] for j in order] for label in table.labels])
            else:  # a class the model does not know (another dataset's) has no loss to fit
                labels = np.array([outputs.index(label) for label in table.labels])
            out[level] = fit_temperature(probs, labels, multilabel)
        except ValueError as exc:
            notes.append(f"{level}: none ({exc} in the validation split)")
    return out, notes


def held_out_loss(labels: np.ndarray, probs: np.ndarray, multilabel: bool) -> float:
    """The loss a held-out split reports (``test_loss``: :class:`training.losses.Loss` without class weights) of
    ``probs``: the mean of ``-log p`` of each sample's class, or each label's binary log loss weighted as the loss
    weighs them (RSNA's weights for its six labels), the probabilities clipped to [1e-15, 1 - 1e-15]."""
    from training.metrics import label_weights

    p, y = np.clip(np.asarray(probs, np.float64), EPS, 1 - EPS), np.asarray(labels)
    if not multilabel:
        return float(-np.log(p[np.arange(len(y)), y]).mean())
    w = np.array(label_weights(p.shape[1]))
    per = -(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float((per * w).sum(axis=1).mean() / w.sum())


def calibrated(pred: dict[str, Any], temps: dict[str, float], multilabel: bool) -> dict[str, Any]:
    """``pred`` with its samples' probabilities at the sample level's temperature, its loss theirs, and what
    :func:`training.levels.by_level` needs to scale each level's groups: their unscaled probabilities and the
    temperatures. ``pred`` itself where there are none."""
    if not temps:
        return pred
    raw = pred.get("uncalibrated", pred["probs"])
    probs = scaled(raw, temps.get("sample", 1.0), multilabel)
    out = pred | {"probs": probs, "uncalibrated": raw, "temperatures": dict(temps)}
    if "sample" in temps and pred.get("labels") is not None and len(probs):
        out["loss"] = held_out_loss(pred["labels"], probs, multilabel)  # what the scaled probabilities lose
    return out


def calibrate(
    pred: dict[str, Any], recipe: TrainRecipe, outputs: list[str], validation: dict[str, LabelledTable]
) -> tuple[dict[str, Any], dict[str, float]]:
    """``pred`` at the temperatures ``eval.calibration`` fits on the ``validation`` tables, and those temperatures
    (``{level: T}``); each level it fits none at is printed, saying why."""
    if recipe.task == "detect" or "probs" not in pred:
        return pred, {}
    temps, notes = temperatures(recipe, outputs, validation)
    for note in notes:
        print(f"calibration ({recipe.eval.calibration}) at {note}", flush=True)
    return calibrated(pred, temps, recipe.task == "multilabel"), temps
