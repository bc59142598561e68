"""Sweep files (``tune/sweeps/*.yaml``): a base recipe, a search space over its fields, the search algorithm
and the scheduler. One pydantic model; every field of the space is checked against the recipe up front."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from training.config import RecipeError, TrainRecipe, load_recipe, recipe_from_tree, recipe_tree, set_value

SWEEPS = Path(__file__).parent / "sweeps"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Param(Strict):
    """One searched field: exactly one of the distributions."""

    choice: list[Any] | None = None
    grid: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None  # [low, high) as in Ray Tune

    @model_validator(mode="after")
    def _one(self) -> Param:
        given = [k for k, v in self.model_dump().items() if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, grid, uniform, loguniform, randint (got {given or 'none'})")
        for name in ("uniform", "loguniform", "randint"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: low {bounds[0]} must be below high {bounds[1]}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: bounds must be positive")
        if (self.choice is not None and not self.choice) or (self.grid is not None and not self.grid):
            raise ValueError("choice/grid: give at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k, v in self.model_dump().items() if v is not None)

    def examples(self) -> list[Any]:
        """Values to check the recipe accepts: every listed value, or both bounds."""
        value = getattr(self, self.kind)
        if self.kind == "randint":
            return [value[0], value[1] - 1]
        return list(value)


class SearchConfig(Strict):
    algorithm: Literal["optuna", "random", "grid"] = "optuna"  # optuna: TPE through Ray Tune's OptunaSearch
    num_samples: int = Field(10, ge=1)  # trials (grid: repeats of the whole grid)
    seed: int = 0


class SchedulerConfig(Strict):
    name: Literal["none", "asha", "pbt"] = "asha"
    grace_period: int = Field(1, ge=1)  # ASHA: epochs every trial gets
    reduction_factor: float = Field(3, gt=1)
    perturbation_interval: int = Field(2, ge=1)  # PBT: epochs between exploit/explore
    quantile_fraction: float = Field(0.25, gt=0, le=0.5)
    # PBT: perturb all trials together at each interval, each paused there until the last arrives (Ray's
    # synchronous PBT): slower, since every trial restarts from its checkpoint at each interval, but the exploits do
    # not depend on which trials happen to run side by side, nor on when their reports land
    synch: bool = False


class ReplicateConfig(Strict):
    """N runs of one recipe with seeds ``seed + i``; ``resplit`` draws each replicate's validation folds afresh
    from ``folds`` (ingest splits by patient, e.g. ``--split f0=0.1,...,f9=0.1``), as paper 002 re-splits."""

    n: int = Field(10, ge=2)
    resplit: bool = False
    folds: list[str] = Field(default_factory=list)
    val_folds: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _folds(self) -> ReplicateConfig:
        if self.resplit and len(self.folds) <= self.val_folds:
            raise ValueError(f"resplit needs more folds than val_folds ({self.val_folds}), got {self.folds}")
        return self

    def params(self, i: int, base_seed: int) -> dict[str, Any]:
        """Replicate ``i``'s recipe fields: its seed and, re-splitting, its train/validation folds."""
        import numpy as np

        out: dict[str, Any] = {"seed": base_seed + i}
        if self.resplit:
            rng = np.random.default_rng(base_seed + i)
            val = sorted(str(f) for f in rng.choice(self.folds, self.val_folds, replace=False))
            out["data.train_split"] = "+".join(f for f in self.folds if f not in val)
            out["data.val_split"] = "+".join(val)
        return out


class SweepConfig(Strict):
    """A sweep: ``recipe`` plus ``overrides``, searched over ``space`` (dotted recipe fields)."""

    name: str
    recipe: str
    overrides: list[str] = Field(default_factory=list)
    space: dict[str, Param] = Field(default_factory=dict)
    metric: str | None = None  # default: the recipe's eval.monitor, reported every epoch
    mode: Literal["min", "max"] | None = None
    search: SearchConfig = Field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_concurrent: int | None = Field(None, ge=1)  # default: what the cluster's CPUs/GPUs hold
    max_failures: int = Field(1, ge=0)  # worker failures a trial's training survives
    replicates: ReplicateConfig | None = None  # instead of a space: N seeded runs of the recipe

    @model_validator(mode="after")
    def _consistent(self) -> SweepConfig:
        kinds = {k: p.kind for k, p in self.space.items()}
        if self.replicates and (self.space or self.scheduler.name != "none"):
            raise ValueError("replicates run the recipe as it is: no space, and scheduler none")
        if not self.replicates and not self.space:
            raise ValueError("give a search space (or replicates)")
        if self.search.algorithm == "grid" and any(k not in ("grid", "choice") for k in kinds.values()):
            raise ValueError("search.algorithm grid takes only grid or choice parameters")
        if self.search.algorithm == "optuna" and "grid" in kinds.values():
            raise ValueError("search.algorithm optuna cannot take grid parameters (use choice, or algorithm grid)")
        if self.scheduler.name == "pbt" and self.search.algorithm != "random":
            raise ValueError("scheduler pbt explores by mutating parameters itself; use search.algorithm random")
        if self.scheduler.name == "pbt" and any(k in ("choice", "grid") for k in kinds.values()):
            raise ValueError("scheduler pbt mutates numbers: give uniform, loguniform or randint parameters")
        return self

    def base(self) -> TrainRecipe:
        return load_recipe(self.recipe, self.overrides)

    def objective(self) -> tuple[str, str]:
        base = self.base()
        return self.metric or base.eval.monitor, self.mode or base.eval.mode

    def check_space(self) -> None:
        """The base recipe's model exists, and every searched field accepts each of its example values with a model
        that exists (a typo fails here, naming the field, not in every trial's workers)."""
        from training.models import check_model

        check_model(self.base().model, self.base().task)
        tree = recipe_tree(self.recipe)
        for key, param in self.space.items():
            for value in param.examples():
                source = f"sweep {self.name}: space.{key}={value!r}"
                recipe = recipe_with(tree, self.overrides, {key: value}, source)
                if key.split(".")[0] != "model":
                    continue  # the base's model, checked above
                try:
                    check_model(recipe.model, recipe.task)
                except RecipeError as exc:
                    raise RecipeError(f"{source}: {exc}") from None


def recipe_with(tree: dict[str, Any], overrides: list[str], params: dict[str, Any], source: str) -> TrainRecipe:
    """The base recipe ``tree`` with ``overrides`` and then ``params`` (dotted field -> value) applied."""
    from copy import deepcopy

    from training.config import apply_overrides

    out = apply_overrides(deepcopy(tree), overrides)
    for key, value in params.items():
        set_value(out, key, value)
    return recipe_from_tree(out, source)


def sweep_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise RecipeError(f"{name_or_path}: no such sweep file")
        return path
    found = SWEEPS / f"{name_or_path}.yaml"
    if not found.exists():
        known = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
        raise RecipeError(f"unknown sweep {name_or_path!r}; bundled: {known}")
    return found


class GroupConfig(Strict):
    recipe: str
    overrides: list[str] = Field(default_factory=list)


class CompareConfig(Strict):
    metrics: list[str] = Field(min_length=1)
    alpha: float = Field(0.05, gt=0, lt=1)


class StudyConfig(Strict):
    """Replicated groups compared statistically (paper 002: ViViT vs ConvNeXt, 10 replicates each; paper 004's
    Table 3: three detectors), each group with each other."""

    name: str
    groups: dict[str, GroupConfig] = Field(min_length=2)
    replicates: ReplicateConfig
    compare: CompareConfig

    def check_compared(self) -> None:
        """Each compared metric is one every group's runs log, on their datasets (read here), before any replicate
        trains: a misspelt one otherwise fails the comparison after every replicate has run."""
        from training.launch import load_manifest
        from training.preflight import check_compared

        folds: dict[str, dict[str, set[str]]] = {}
        for label, sweep in self.sweeps().items():
            recipe = sweep.base()
            manifest = load_manifest(recipe)[0]
            check_compared(recipe, manifest, self.compare.metrics, f"compare.metrics (group {label})")
            if self.replicates.resplit:  # each group's patients by fold, only where replicates re-split by fold
                held = [r for r in manifest.inputs if r.status == "ingested" and r.patient]
                folds[label] = {f: {r.patient for r in held if r.split == f} for f in self.replicates.folds}
        if note := fold_note(folds):
            print(f"warning: {note}", flush=True)

    def sweeps(self) -> dict[str, SweepConfig]:
        return {
            label: SweepConfig(
                name=f"{self.name}-{label}",
                recipe=g.recipe,
                overrides=g.overrides,
                replicates=self.replicates,
                search=SearchConfig(algorithm="grid", num_samples=1),
                scheduler=SchedulerConfig(name="none"),
            )
            for label, g in self.groups.items()
        }


def fold_note(folds: dict[str, dict[str, set[str]]]) -> str | None:
    """Where groups' datasets hold other patients in a fold (``folds``: each group's fold -> patient pseudonyms,
    keyed alike across datasets): replicates that re-split by fold then validate the groups on other patients,
    and the comparison mixes the models' difference with their validation patients'. None: the same."""
    if len(folds) < 2:
        return None
    (first, ref), *rest = folds.items()
    for label, theirs in rest:
        if differ := [f for f in ref if ref[f] != theirs.get(f, set())]:
            return (
                f"groups {first} and {label} hold other patients in {len(differ)} of their {len(ref)} folds "
                f"({', '.join(differ)}): each replicate validates them on other patients. Ingest their datasets "
                "from the same patients with the same --split, --seed and --split-balance"
            )
    return None


def pairwise(groups: list[str], alpha: float) -> tuple[list[tuple[str, str]], float]:
    """Each of ``groups`` with each later one (A the earlier), and each pair's significance level: ``alpha`` over
    the number of pairs (Bonferroni), so that the chance of a difference found where there is none, in any of the
    pairs, stays under ``alpha``. Two groups: one pair at ``alpha``."""
    pairs = list(itertools.combinations(groups, 2))
    if not pairs:
        raise ValueError(f"compare needs at least two groups, got {len(groups)}: {', '.join(groups)}")
    return pairs, alpha / len(pairs)


def load_plan(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> SweepConfig | StudyConfig:
    """A sweep file, or a study file (one with ``groups``)."""
    from training.config import apply_overrides, field_problem

    path = sweep_path(name_or_path)
    tree = apply_overrides(yaml.safe_load(path.read_text()) or {}, list(overrides))
    model = StudyConfig if "groups" in tree else SweepConfig
    try:
        plan = model.model_validate(tree)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(map(str, e['loc']))}: {field_problem(e, model)}" for e in exc.errors())
        raise RecipeError(f"{path}: {errors}") from None
    for sweep in plan.sweeps().values() if isinstance(plan, StudyConfig) else [plan]:
        sweep.check_space()
    return plan


def replicate_sweep(recipe: str, overrides: list[str], n: int, resplit_folds: list[str] | None = None) -> SweepConfig:
    """``tessera tune --replicates N RECIPE``: the recipe N times, optionally re-split over folds."""
    reps = ReplicateConfig(n=n, resplit=bool(resplit_folds), folds=resplit_folds or [])
    name = Path(recipe).stem
    sweep = SweepConfig(
        name=f"{name}-x{n}",
        recipe=recipe,
        overrides=overrides,
        replicates=reps,
        search=SearchConfig(algorithm="grid", num_samples=1),
        scheduler=SchedulerConfig(name="none"),
    )
    sweep.check_space()
    return sweep
