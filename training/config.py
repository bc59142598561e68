"""The training recipe: one pydantic model, loaded from YAML, overridable with ``key=value``."""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from shards.storage import anchored, anchored_if_local
from training.operating import parse_rule

RECIPES = Path(__file__).parent / "recipes"
EFFICIENTDET = "tf_efficientdet_"  # effdet's ports of the EfficientDet authors' models (training.efficientdet)

Range = tuple[float, float]
# The groups a recipe's predictions aggregate to (``eval.levels``), each read from its sample metadata field.
Level = Literal["slide", "patient", "series"]
LEVELS: tuple[str, ...] = typing.get_args(Level)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AugmentConfig(Strict):
    """Training augmentations. Each ``*_p`` is the share of samples it is applied to (paper 000: 0.5 each).

    Magnitudes follow torchvision/albumentations: ``sharpness_factor`` 2 doubles detail (RandomAdjustSharpness),
    ``brightness``/``contrast``/``saturation`` 0.2 draw a factor in [0.8, 1.2], ``hue`` 0.5 shifts hue by up to
    half the colour circle, ``zoom`` (0.5, 2) scales about the centre (below 1 zooms out, padding with black).
    """

    hflip: float = Field(0.0, ge=0, le=1)
    vflip: float = Field(0.0, ge=0, le=1)
    rotate_p: float = Field(0.0, ge=0, le=1)
    rotate_degrees: Range = (-90.0, 90.0)
    sharpness_p: float = Field(0.0, ge=0, le=1)
    sharpness_factor: float = Field(2.0, ge=0)
    color_jitter_p: float = Field(0.0, ge=0, le=1)
    brightness: float = Field(0.0, ge=0, lt=1)
    contrast: float = Field(0.0, ge=0, lt=1)
    saturation: float = Field(0.0, ge=0, lt=1)
    hue: float = Field(0.0, ge=0, le=0.5)
    zoom_p: float = Field(0.0, ge=0, le=1)
    zoom: Range = (1.0, 1.0)
    # stain jitter in HED space (shards.stain; Tellez et al.): each stain's amount scaled by [1 - s, 1 + s] and
    # shifted by [-s, s], s = hed_sigma (0.05 "HED-light", 0.2 "HED-strong"); for H&E slides, not grey scans
    hed_p: float = Field(0.0, ge=0, le=1)
    hed_sigma: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        for name in ("rotate_degrees", "zoom"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name}: low {lo} is above high {hi}")
        if self.zoom[0] <= 0:
            raise ValueError("zoom: factors must be positive")
        return self


class DataConfig(Strict):
    """Where the shards are and how samples become tensors."""

    dataset: str
    train_split: str = "train"  # "f0+f1+f2" trains on several ingest splits (re-split replicates)
    val_split: str = "val"
    # Evaluated once after training with the run's selected model (``tessera evaluate``), where the manifest has
    # it; None: never.
    test_split: str | None = "test"
    image_size: int = Field(224, gt=0)
    # Slice-sequence samples (``000.png``...): frames per sample, for video models; 0 for single images.
    frames: int = Field(0, ge=0)
    # Samples per worker per epoch; default: the worker's share of the split (the manifest's count).
    epoch_samples: int | None = Field(None, gt=0)
    augment: AugmentConfig = AugmentConfig()
    # ``balanced``: loss weights n / (C * n_c) from the train split's per-sample counts; or explicit.
    class_weights: Literal["none", "balanced"] | list[float] = "none"
    # ``shuffle``: each worker streams its shards (a fresh shard order per epoch, shuffled in a buffer).
    # ``balanced``: paper 003's sampler: every class equally often, drawn with replacement by ``.cls``.
    sampler: Literal["shuffle", "balanced"] = "shuffle"
    # task detect: what a box's class is. ``lesion``: one class, where the lesion is (paper 004's detector locates
    # the tumour; its classifier says which); ``image``: the image's class (a glioma's box is a glioma).
    box_classes: Literal["lesion", "image"] = "lesion"
    # How samples are read. ``stream``: DALI's WebDataset reader streams each worker's shards. ``ranged``: one
    # ranged read per sample (a GET on S3), ``read_requests`` in flight, so a shuffle is one global permutation
    # per epoch; DALI's reader issues its S3 reads one at a time and is latency-bound there. ``auto``: ranged for
    # ``s3://`` datasets, stream otherwise. The balanced sampler always reads by ranges.
    reader: Literal["auto", "stream", "ranged"] = "auto"
    read_requests: int = Field(32, ge=1)
    # DALI's threads in each worker; None: the worker's CPUs (``cpus_per_worker``, at least one).
    loader_threads: int | None = Field(None, ge=1)
    # CPU mode: pipelines the loader threads are split into (shards.lanes); None: one per 4 threads, as measured
    # fastest on 16 cores. A GPU worker's pipeline stays one.
    loader_lanes: int | None = Field(None, ge=1)
    # A worker (re)started while the dataset's store does not answer (S3 restarting under a run: the worker that
    # failed on it is restarted from the checkpoint at once) waits up to this long for it, rather than fail again
    # and spend the run's retries in seconds. Held under Ray Train's 30 min collective time-out.
    outage_wait_s: float = Field(600, ge=0, le=1500)

    @property
    def ranged(self) -> bool:
        """Whether samples come by ranged reads rather than DALI's streaming reader (``reader``)."""
        return self.reader == "ranged" or (self.reader == "auto" and self.dataset.startswith("s3://"))

    @model_validator(mode="after")
    def _one_rebalancing(self) -> DataConfig:
        if self.sampler == "balanced" and self.class_weights != "none":
            raise ValueError("class_weights: must be none with sampler balanced (the classes are already evened)")
        return self

    @field_validator("dataset")
    @classmethod
    def _dataset_here(cls, v: str) -> str:
        return anchored(v)  # a local dataset: the same folder for the workers, whose working directory is not ours


class ModelConfig(Strict):
    """A model by name: a timm model, ``temporal:<timm name>`` (backbone + transformer over slices) or ``vivit``.

    ``weights`` is a local file or folder (or hub id) used when ``pretrained``. ``heads`` gives a multi-head
    model (paper 003: ``any`` plus five subtypes, one logit each). ``freeze: backbone`` trains the head(s) only
    (paper 002). ``options`` go to the builder (e.g. ViViT's ``num_hidden_layers``, timm's ``img_size``).
    """

    name: str
    pretrained: bool = False
    weights: str | None = None
    drop_rate: float = Field(0.0, ge=0, lt=1)
    heads: list[str] | None = None
    freeze: Literal["none", "backbone"] = "none"
    temporal_layers: int = Field(2, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("weights")
    @classmethod
    def _weights_here(cls, v: str | None) -> str | None:
        # a local file for every worker (Ray Train runs them in its own folder), or a hub id as it is
        return None if v is None else anchored_if_local(v)


class OptimConfig(Strict):
    name: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)


class ScheduleConfig(Strict):
    """Learning-rate schedule, stepped once per epoch (``plateau`` on the monitored validation metric)."""

    name: Literal["constant", "cosine", "step", "plateau"] = "constant"
    step_size: int = Field(10, ge=1)
    gamma: float = Field(0.1, gt=0, le=1)
    patience: int = Field(2, ge=0)
    factor: float = Field(0.1, gt=0, lt=1)
    min_lr: float = Field(0.0, ge=0)


class SWAConfig(Strict):
    """Stochastic weight averaging (paper 000): average weights from ``start`` (fraction of epochs) on."""

    enabled: bool = False
    start: float = Field(0.75, ge=0, lt=1)


class EarlyStoppingConfig(Strict):
    enabled: bool = False
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)


class DeepSpeedConfig(Strict):
    """``gradient_clipping``: the global gradient-norm limit, 0 for none. The papers do not clip; DeepSpeed
    would clip at 1.0 unless told, so the recipe says it. ``bf16``: compute in bf16 (torch autocast, fp32
    weights); ``auto`` does on a GPU and not on the CPU, ``true`` does on either."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    gradient_accumulation: int = Field(1, ge=1)
    gradient_clipping: float = Field(0.0, ge=0)
    bf16: Literal["auto", True, False] = "auto"


class EvalConfig(Strict):
    """What is monitored (early stopping, plateau, best model) and how samples aggregate to groups.

    ``how``: ``mean`` or ``max`` of class probabilities, or ``any`` (a group is positive when any member's
    positive probability reaches ``threshold``: paper 002's image model per series).
    ``heatmaps`` (slides only): after training, each validation and held-out slide's tile probabilities drawn over
    its preview into the run (``heatmaps/``, ``test_heatmaps/``), as ``tessera evaluate --heatmaps`` draws them.
    ``bootstrap``: resamples of the held-out split's patients giving each held-out metric its ``confidence``
    interval (:mod:`training.intervals`); 0: none. ``operating_point`` (``youden``, ``sensitivity:S``,
    ``specificity:S``): the threshold chosen on the validation split for the ``positive`` class of a binary
    classifier (each label of a multi-label one), whose sensitivity, specificity, PPV and NPV the held-out
    evaluation reports (:mod:`training.operating`). ``calibration: temperature``: the held-out evaluation and
    ``tessera predict`` scale the model's probabilities at each level by a temperature fitted on the validation
    split (:mod:`training.calibration`); ``none``: as the model gives them.
    """

    monitor: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    levels: list[Level] = Field(default_factory=lambda: ["slide", "patient"])
    how: Literal["mean", "max", "any"] = "mean"
    threshold: float = Field(0.5, gt=0, lt=1)
    heatmaps: bool = False
    bootstrap: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    operating_point: str | None = None
    positive: str | None = None
    calibration: Literal["none", "temperature"] = "none"

    @field_validator("operating_point")
    @classmethod
    def _rule(cls, rule: str | None) -> str | None:
        if rule is not None:
            parse_rule(rule)  # its message says which forms there are
        return rule


class TrackingConfig(Strict):
    """MLflow during training. While the server does not answer, rank 0's writes wait and training goes on
    (:mod:`training.outbox`); ``outage_wait_s``: how long rank 0 then waits for it after the last epoch before the
    run fails, resumable, its writes kept in the last checkpoint. The other ranks wait at a barrier meanwhile,
    which gives up after 30 min (Ray Train's ``TorchConfig.timeout_s``): the wait is held under that."""

    outage_wait_s: float = Field(600, ge=0, le=1500)


class TrainRecipe(Strict):
    """A whole training run: data, model, optimiser, schedule, DeepSpeed, evaluation."""

    name: str
    experiment: str | None = None
    # detect: boxes (paper 004's first stage), from the samples' metadata; a torchvision detector (training.detection)
    task: Literal["multiclass", "multilabel", "detect"] = "multiclass"
    data: DataConfig
    model: ModelConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    swa: SWAConfig = SWAConfig()
    early_stopping: EarlyStoppingConfig = EarlyStoppingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(1, gt=0)
    # pack: workers on as few nodes as fit; spread: on different nodes where possible (Ray placement strategies)
    placement: Literal["pack", "spread", "strict_spread"] = "pack"
    use_gpu: Literal["auto", True, False] = "auto"
    seed: int = 0

    @property
    def dali_threads(self) -> int:
        """DALI's threads in each worker: ``data.loader_threads``, or the worker's CPUs (at least one)."""
        return self.data.loader_threads or max(1, int(self.cpus_per_worker))

    @model_validator(mode="after")
    def _consistent(self) -> TrainRecipe:
        if self.swa.enabled and self.deepspeed.zero_stage == 3:
            raise ValueError("swa.enabled: needs deepspeed.zero_stage <= 2 (ZeRO-3 shards the weights it averages)")
        if self.task == "multilabel" and self.eval.how == "any":
            raise ValueError("eval.how: 'any' is for multiclass tasks with a positive class")
        if self.task == "detect":
            self._detection_consistent()
        if self.eval.positive and self.task != "multiclass":
            raise ValueError("eval.positive: a binary classifier's positive class; each label of a multi-label "
                             "task is its own positive")  # fmt: skip
        if self.eval.operating_point and (
            self.task == "detect" or (self.task == "multiclass" and not self.eval.positive)
        ):
            raise ValueError("eval.operating_point: needs eval.positive, the class whose sensitivity it sets "
                             "(a binary classifier's; not for task detect)")  # fmt: skip
        video = self.model.name == "vivit" or self.model.name.startswith("temporal:")
        if video != (self.data.frames > 0):
            raise ValueError("data.frames: video models (vivit, temporal:*) need frames > 0, image models 0")
        return self

    def _detection_consistent(self) -> None:
        """What a detector cannot take: weight averaging, a validation loss to monitor (a detector reports losses
        only while it trains), a classifier's sampling or heads. (Zoom, rotation and flips move its boxes too.)"""
        if self.swa.enabled:
            raise ValueError("swa.enabled: not for task detect")
        if self.eval.monitor in ("val_loss", "train_loss") or self.eval.monitor.startswith("val_accuracy"):
            raise ValueError(f"eval.monitor: {self.eval.monitor!r} is not a detector's; give val_map50, val_map, "
                             "val_f1 or val_recall (mode max)")  # fmt: skip
        if self.data.sampler == "balanced" or self.data.class_weights != "none" or self.model.heads:
            raise ValueError("task detect: no balanced sampler, class weights or heads (the detector's own losses)")
        if self.model.name.startswith(EFFICIENTDET) and self.data.image_size % 128:
            raise ValueError(f"data.image_size: an EfficientDet takes a multiple of 128 px (its coarsest level's "
                             f"stride), not {self.data.image_size}")  # fmt: skip


class RecipeError(ValueError):
    """A recipe could not be loaded; the message names the field and the reason."""


def set_value(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a recipe tree, creating sections; a non-section on the way is an error."""
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


def recipe_from_tree(tree: dict[str, Any], source: str = "recipe") -> TrainRecipe:
    """Validate a recipe tree; errors name each field and the reason."""
    try:
        return TrainRecipe.model_validate(tree)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '(recipe)'}: {field_problem(e)}" for e in exc.errors()]
        raise RecipeError(f"invalid recipe {source!r}:\n  " + "\n  ".join(lines)) from None


def field_problem(error: dict, root: type[BaseModel] | None = None) -> str:
    """Pydantic's message of a validation ``error`` of ``root`` (a recipe), and for a key no section has (a typo:
    ``epochz``, ``optimizer.lr``) the fields of its section closest to it, then all of them."""
    if error["type"] != "extra_forbidden":
        return error["msg"]
    model: Any = root or TrainRecipe
    for key in error["loc"][:-1]:
        field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        kinds = [field.annotation, *typing.get_args(field.annotation)] if field else []
        model = next((k for k in kinds if isinstance(k, type) and issubclass(k, BaseModel)), None)
    if model is None:
        return error["msg"]
    close = difflib.get_close_matches(str(error["loc"][-1]), list(model.model_fields), n=3, cutoff=0.5)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return f"no such field{hint}; its section has {', '.join(model.model_fields)}"


def apply_overrides(tree: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to ``tree`` in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not key=value")
        set_value(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def recipe_tree(name_or_path: str, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """A recipe's YAML tree with ``extends: OTHER`` resolved (this file's keys win, sections merge)."""
    path = recipe_path(name_or_path)
    if str(path) in _seen:
        raise RecipeError(f"extends: {name_or_path!r} extends itself through {' -> '.join(_seen)}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping")
    parent = tree.pop("extends", None)
    return _merge(recipe_tree(parent, (*_seen, str(path))), tree) if parent else tree


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> TrainRecipe:
    """Load a recipe (resolving ``extends``) and apply ``key.sub=value`` overrides."""
    return recipe_from_tree(apply_overrides(recipe_tree(name_or_path), overrides), name_or_path)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
