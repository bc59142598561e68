"""Placement groups Ray kept after the job that made them ended: they hold their CPUs and GPUs for no one.

Ray removes a group once its job and the actor that made it have both ended (unless it is detached). A group whose
creation reaches Ray's control store just after that clean-up is never marked and stays for good (Ray 2.60: seen
when `tessera tune` was interrupted as a trial's Ray Train run created its worker group; an actor creating groups
as its driver exits does it every time). Every later run on the cluster then waits for room it cannot get, so
Tessera releases such groups when it connects (:func:`release_orphans`).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cluster.usage import amount

log = logging.getLogger(__name__)

ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}  # a job's terminal states, as Ray's state API names them
SETTLE_S = 1.0  # what Ray removes after a job that has just ended, it has removed by then


@dataclass(frozen=True)
class Group:
    """One placement group as Ray's control store records it; ``actor`` is None for a group a driver made."""

    id: str
    job: str
    actor: str | None
    detached: bool
    state: str
    resources: dict[str, float] = field(default_factory=dict)


def orphans(
    groups: Iterable[Group], job_ended: Callable[[str], bool], actor_alive: Callable[[str], bool]
) -> list[Group]:
    """The groups Ray should have removed and did not: not removed, not detached, their job ended and the actor
    that made them (if one did) not alive. An actor of an ended job lives on only if it is detached (Ray Serve's
    controller, say) and its groups are its own to keep. The callables are asked only about such candidates."""
    candidates = [g for g in groups if g.state != "REMOVED" and not g.detached]
    return [g for g in candidates if job_ended(g.job) and (g.actor is None or not actor_alive(g.actor))]


def released_line(groups: list[Group]) -> str:
    """What :func:`release_orphans` did, in one line a user reads at a run's start."""
    total: dict[str, float] = {}
    for g in groups:
        for k, v in g.resources.items():
            total[k] = total.get(k, 0.0) + v
    jobs = ", ".join(sorted({g.job for g in groups}))
    n, held = len(groups), amount(total, none="no CPU or GPU")
    return (
        f"ray: released {n} placement group{'s' if n > 1 else ''} ({held}) that Ray kept after "
        f"{'its job' if len({g.job for g in groups}) == 1 else 'their jobs'} ({jobs}) ended: "
        f"{'they' if n > 1 else 'it'} held the cluster's resources for no one"
    )


def cluster_groups() -> list[Group]:
    """Every placement group of the connected cluster, with the actor that made it. Ray's public listings leave the
    creating actor out, so the control store's records are read as Ray's own ``placement_group_table`` reads them."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    record = gcs_pb2.PlacementGroupTableData
    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        d = record.FromString(raw)
        resources: dict[str, float] = {}
        for bundle in d.bundles:
            for k, v in bundle.unit_resources.items():
                resources[k] = resources.get(k, 0.0) + v
        actor = d.creator_actor_id.hex()
        groups.append(
            Group(
                id=d.placement_group_id.hex(),
                job=d.creator_job_id.hex(),
                actor=actor if actor.strip("f") and actor.strip("0") else None,  # a driver's: nil (all f or 0)
                detached=d.is_detached,
                state=record.PlacementGroupState.Name(d.state),
                resources=resources,
            )
        )
    return groups


def _ended_jobs() -> set[str]:
    """The cluster's jobs that have ended, in one listing (a command pays for it only where a group may be an
    orphan). A job listed twice (a submitted one: its submission and its driver) has ended when both have."""
    from ray.util.state import list_jobs

    jobs = list_jobs(limit=10_000, raise_on_missing_output=False)
    ended = {j.job_id: True for j in jobs if j.job_id}
    for j in jobs:
        if j.job_id and str(getattr(j.status, "value", j.status)) not in ENDED:
            ended[j.job_id] = False
    return {job for job, done in ended.items() if done}


def _actor_alive(actor: str) -> bool:
    from ray.util.state import get_actor

    found = get_actor(actor)
    return found is not None and found.state != "DEAD"


def release_orphans() -> list[Group]:
    """Remove the connected cluster's orphaned groups (:func:`orphans`) and return them. Never raises: a cluster
    whose records cannot be read (another Ray's) releases nothing, which is where it would be without this."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    ended = functools.cache(_ended_jobs)
    try:  # one question an actor, however many groups it made
        found = orphans(cluster_groups(), lambda job: job in ended(), functools.cache(_actor_alive))
        if found:  # not a job that ended a moment ago, whose groups Ray is removing now
            time.sleep(SETTLE_S)
            kept = {g.id for g in cluster_groups() if g.state != "REMOVED"}
            found = [g for g in found if g.id in kept]
    except Exception as exc:  # a courtesy: the run goes on as Ray left the cluster
        log.debug("placement groups not read: %s", exc)
        return []
    released = []
    for g in found:
        try:
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(g.id)))
            released.append(g)
        except Exception as exc:  # removed meanwhile (by Ray, or another driver)
            log.debug("placement group %s not removed: %s", g.id, exc)
    return released
