"""A classifier's metrics at sample level and after aggregation to each of the recipe's levels (slide, patient,
series), or a detector's: what training's validation and the held-out evaluation report."""

from __future__ import annotations

from typing import Any

from training.aggregate import aggregate, aggregate_probs
from training.config import TrainRecipe
from training.metas import values
from training.metrics import classification_metrics, multilabel_metrics


def by_level(pred: dict[str, Any], recipe: TrainRecipe):
    """``(level, group ids, probs[G, C], labels[G])`` for each recipe level that every sample's metadata names
    (labels None where ``pred["labels"]`` is: samples without labels)."""
    how = recipe.eval.how if recipe.task == "multiclass" else "max"
    for level in recipe.eval.levels:
        groups = values(pred["metas"], level)
        if groups and all(g is not None for g in groups):
            if pred["labels"] is None:
                yield level, *aggregate_probs(pred["probs"], groups, how, recipe.task == "multilabel"), None
            else:
                yield level, *aggregate(pred["probs"], pred["labels"], groups, how)


def level_threshold(recipe: TrainRecipe, level: str) -> float | None:
    """The positive-call threshold of a multi-class ``level``: only groups aggregated by ``any`` use one
    (samples and other aggregations take the argmax)."""
    return recipe.eval.threshold if recipe.eval.how == "any" and level != "sample" else None


def evaluate(pred: dict[str, Any], recipe: TrainRecipe, outputs: list[str], prefix: str = "val_") -> dict[str, float]:
    """Sample-level metrics plus the same metrics after aggregation to each of the recipe's levels; a detector's
    boxes by :func:`training.detection.metrics`."""
    if recipe.task == "detect":
        from training.detection import metrics as box_metrics

        return box_metrics(pred, outputs, recipe.eval.threshold, prefix)

    def metrics(y, p, level):
        pre = prefix if level == "sample" else f"{prefix}{level}_"
        if recipe.task == "multilabel":
            return multilabel_metrics(y, p, outputs, pre, recipe.eval.threshold)
        return classification_metrics(y, p, pre, outputs, level_threshold(recipe, level))

    out = {f"{prefix}loss": pred["loss"]} | metrics(pred["labels"], pred["probs"], "sample")
    for level, _, gp, gy in by_level(pred, recipe):
        out |= metrics(gy, gp, level)
    return out
