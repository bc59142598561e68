"""The training recipe: one pydantic model, loaded from YAML, overridable with ``key=value``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

RECIPES = Path(__file__).parent / "recipes"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    """Where the shards are and how samples become tensors."""

    dataset: str
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = Field(224, gt=0)
    hflip: float = Field(0.5, ge=0, le=1)
    vflip: float = Field(0.5, ge=0, le=1)


class ModelConfig(Strict):
    """A timm model by name; ``weights`` is a local file (or ``hf-hub:...``) used when ``pretrained``."""

    name: str
    pretrained: bool = False
    weights: str | None = None
    drop_rate: float = Field(0.0, ge=0, lt=1)


class OptimConfig(Strict):
    name: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class DeepSpeedConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    gradient_accumulation: int = Field(1, ge=1)
    bf16: Literal["auto", True, False] = "auto"


class TrainRecipe(Strict):
    """A whole training run: data, model, optimiser, DeepSpeed, schedule and how results are aggregated."""

    name: str
    experiment: str | None = None
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    use_gpu: Literal["auto", True, False] = "auto"
    seed: int = 0
    aggregate: list[Literal["slide", "patient", "series"]] = Field(default_factory=lambda: ["slide", "patient"])


class RecipeError(ValueError):
    """A recipe could not be loaded; the message names the field and the reason."""


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise RecipeError(f"{dotted}: {k!r} is not a section")
    node[keys[-1]] = value


def recipe_path(name_or_path: str) -> Path:
    """A recipe file: a path, or a name under ``training/recipes/``."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    bundled = RECIPES / f"{name_or_path}.yaml"
    if bundled.exists():
        return bundled
    known = ", ".join(sorted(q.stem for q in RECIPES.glob("*.yaml")))
    raise RecipeError(f"recipe {name_or_path!r} not found (a YAML path or one of: {known})")


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainRecipe:
    """Load a recipe and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    tree = yaml.safe_load(recipe_path(name_or_path).read_text()) or {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not key=value")
        _set(tree, key.strip(), yaml.safe_load(raw))
    try:
        return TrainRecipe.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise RecipeError(f"invalid recipe {name_or_path!r}:\n  " + "\n  ".join(lines)) from None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
