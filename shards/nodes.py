"""What the connected Ray cluster's nodes hold, and whether it may grow: read by ingest (actors that hold GPUs)
and training (worker groups) alike, which do not import each other."""

from __future__ import annotations

import os
from typing import Any

# "1": the cluster has the nodes it will ever have (the CLI sets it for the local stack: cluster.cli._connect).
FIXED_ENV = "TESSERA_CLUSTER_FIXED"


def cluster_fixed() -> bool:
    """Whether the cluster cannot grow (:data:`FIXED_ENV`): a request it cannot hold now never will be."""
    return os.environ.get(FIXED_ENV) == "1"


def alive_resources(nodes: list[dict[str, Any]] | None = None) -> list[dict[str, float]]:
    """Each alive node's total resources, from ``nodes`` (``ray.nodes()``: the connected cluster's by default)."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    return [n.get("Resources", {}) for n in nodes if n.get("Alive")]


def workers_that_fit(nodes: list[dict[str, float]], cpus: float, gpus: float, placement: str) -> int:
    """How many workers of ``cpus`` CPUs (and ``gpus`` GPUs) the nodes' total resources hold side by side;
    under ``strict_spread`` one per node at most."""
    fit = 0
    for resources in nodes:
        n = int(resources.get("CPU", 0) // cpus)
        if gpus:
            n = min(n, int(resources.get("GPU", 0) // gpus))
        fit += min(n, 1) if placement == "strict_spread" else n
    return fit
