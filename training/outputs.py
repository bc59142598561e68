"""The names of a recipe's model outputs, from its dataset's manifest: what the driver checks a recipe and its data
against before any worker starts, and what every metric and table is named by. No torch here: the driver of
``tessera train`` imports it, and each of its imports is a second of every command's start."""

from __future__ import annotations

from shards import manifest as mf
from training.config import TrainRecipe

LESION = "lesion"  # the one class of a detector of ``data.box_classes: lesion``


def outputs_of(recipe: TrainRecipe, manifest: mf.ManifestHead) -> list[str]:
    """Names of the model's logits: the manifest's classes, or its multi-label names; a detector's box classes."""
    if recipe.task == "detect" and recipe.data.box_classes == "lesion":
        return [LESION]
    if recipe.task == "multilabel":
        if not manifest.multilabel:
            raise ValueError(f"{recipe.data.dataset}: task multilabel but the manifest has no multi-label names")
        return list(manifest.multilabel)
    return list(manifest.classes)
