"""Whether a cluster can hold a run's worker group at all, and whether its workers take GPUs. Ray Train waits
for a group the cluster cannot hold without end (an autoscaling cluster may add nodes), printing a traceback a
minute, and Ctrl+C cannot stop it (its abort waits for the startup it would cut short): on a cluster that cannot
grow, that is an error before any work."""

from __future__ import annotations

from typing import Any

from shards.nodes import alive_resources, cluster_fixed, workers_that_fit
from training.config import RecipeError, TrainRecipe


def groups_that_fit(nodes: list[dict[str, float]], cpus: float, gpus: int, placement: str, workers: int) -> int:
    """How many worker groups of ``workers`` the nodes hold side by side (a sweep's concurrent trials). Under
    ``strict_spread`` each group needs that many distinct nodes, but groups may share nodes."""
    if placement != "strict_spread":
        return workers_that_fit(nodes, cpus, gpus, placement) // workers
    each = [workers_that_fit([node], cpus, gpus, "pack") for node in nodes]
    groups = 0  # g groups fit when the nodes give g x workers places, at most g of them on any one node
    while sum(min(n, groups + 1) for n in each) >= (groups + 1) * workers:
        groups += 1
    return groups


def capacity_problem(recipe: TrainRecipe, gpu: bool, nodes: list[dict[str, float]]) -> str | None:
    """What the recipe's worker group asks of ``nodes`` (each node's total resources) that they cannot hold
    together, or None."""
    fit = workers_that_fit(nodes, recipe.cpus_per_worker, int(gpu), recipe.placement)
    if fit >= recipe.workers:
        return None
    each = f"{recipe.cpus_per_worker:g} CPU" + (" and 1 GPU" if gpu else "")
    held = ", ".join(f"{r.get('CPU', 0):g} CPU" + (f" {r.get('GPU', 0):g} GPU" if gpu else "") for r in nodes)
    spread = " on separate nodes (placement strict_spread)" if recipe.placement == "strict_spread" else ""
    return (
        f"workers: the run asks for {recipe.workers} workers of {each} each{spread}, and the cluster's "
        f"{len(nodes)} node(s) ({held or 'none'}) hold {fit} at most"
    )


def check_capacity(recipe: TrainRecipe, gpu: bool, nodes: list[dict[str, Any]] | None = None) -> None:
    """Raise :class:`RecipeError` when the connected cluster (``nodes``: ``ray.nodes()``) cannot hold the run's
    worker group and cannot grow (:func:`shards.nodes.cluster_fixed`); where it may grow, say that the run will wait
    for nodes; where it holds them but other work holds their resources now (the connected cluster's, read when
    ``nodes`` is not given), say that the run will wait for those."""
    problem = capacity_problem(recipe, gpu, alive_resources(nodes))
    if problem is None:
        if nodes is None and (busy := busy_now(recipe, gpu)):
            print(busy, flush=True)
        return
    if cluster_fixed():
        advice = "set workers= (or cpus_per_worker=) to fit, or run it on a larger cluster"
        raise RecipeError(f"{problem}; Ray Train would wait for them without end: {advice}")
    print(f"{problem}: the run waits until nodes join (an autoscaling cluster adds them)", flush=True)


SETTLE_S = 2.0  # how long resources just given back (an ingest that ended a moment ago) take to show as free


def room_now_problem(recipe: TrainRecipe, gpu: bool, free: dict[str, float]) -> str | None:
    """What of the run's worker group the cluster's ``free`` resources (``ray.available_resources()``) lack now,
    where its nodes could hold it (another run or an ingest holds the rest), or None."""
    need = {"CPU": recipe.workers * recipe.cpus_per_worker, **({"GPU": float(recipe.workers)} if gpu else {})}
    short = [f"{free.get(k, 0):g} of the {v:g} {k}s they need" for k, v in need.items() if free.get(k, 0) < v]
    if not short:
        return None
    return (
        f"workers: the cluster holds the run's {recipe.workers} workers, but not now: it has {' and '.join(short)} "
        "free; other work holds the rest (`tessera status` shows what), and the run waits for it"
    )


def busy_now(recipe: TrainRecipe, gpu: bool) -> str | None:
    """:func:`room_now_problem` of the connected cluster, after resources given back a moment ago show as free."""
    import time

    import ray

    deadline = time.monotonic() + SETTLE_S
    while (problem := room_now_problem(recipe, gpu, ray.available_resources())) and time.monotonic() < deadline:
        time.sleep(0.25)
    return problem


def wants_gpu(recipe: TrainRecipe) -> bool:
    """Whether the run's workers take a GPU each (:func:`gpu_choice`)."""
    return gpu_choice(recipe)[0]


def gpu_choice(recipe: TrainRecipe) -> tuple[bool, str | None]:
    """Whether the run's workers take a GPU each: the recipe's ``use_gpu``, or with ``auto`` whether the connected
    cluster holds one per worker; and what the run says where ``auto`` found GPUs, but fewer than its workers
    (which then run on CPUs)."""
    if recipe.use_gpu != "auto":
        return bool(recipe.use_gpu), None
    gpus = gpus_held()
    if gpus >= recipe.workers:
        return True, None
    if not gpus:
        return False, None
    return False, (f"use_gpu auto: the cluster has {gpus:g} GPU(s) for {recipe.workers} workers, so they run on "
                   f"CPUs; with workers={int(gpus)} they would run on the GPUs")  # fmt: skip


def gpus_held() -> float:
    """The GPUs of the connected Ray cluster."""
    import ray

    return ray.cluster_resources().get("GPU", 0)
