"""What holds the connected Ray cluster's CPUs and GPUs, job by job, for `tessera status`: the answer to a run's
"the run waits for room" line, on the local stack too (where `ray status` wants the stack's address and token).

A job holds its placement groups' bundles (Ray Train's worker groups, a sweep's trials) and the actors and tasks
it runs outside them (an ingest's workers); what runs inside a group is counted with the group.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from training.console import elapsed

SHOWN = ("CPU", "GPU")
COMMAND_CHARS = 100


@dataclass(frozen=True)
class Holder:
    """One thing holding resources: ``group`` is the placement group it runs in, if any (its bundles count)."""

    job: str
    resources: dict[str, float] = field(default_factory=dict)
    group: str | None = None


@dataclass(frozen=True)
class Job:
    command: str
    running: bool
    started_ms: int = 0


def shown_command(entrypoint: str) -> str:
    """A job's command line as its user typed it: ``tessera train ...`` for ``/venv/bin/python /venv/bin/tessera
    train ...`` (how Ray records a console script), cut at :data:`COMMAND_CHARS`."""
    words = entrypoint.split(" ")
    if len(words) > 1 and re.fullmatch(r"python[\d.]*", words[0].rsplit("/", 1)[-1]) and words[1].endswith("/tessera"):
        words = ["tessera", *words[2:]]
    text = " ".join(words)
    return text if len(text) <= COMMAND_CHARS else text[: COMMAND_CHARS - 3] + "..."


def by_job(groups: list[Holder], others: list[Holder]) -> dict[str, dict[str, float]]:
    """Each job's CPUs and GPUs in ``groups`` (placement groups: their bundles) and ``others`` (actors and tasks:
    only those outside a group, whose resources the group holds): what it holds, or what it waits for."""
    held: dict[str, dict[str, float]] = {}
    for h in groups + [o for o in others if not o.group]:
        mine = held.setdefault(h.job, {})
        for k in SHOWN:
            if h.resources.get(k):
                mine[k] = mine.get(k, 0.0) + h.resources[k]
    return {job: r for job, r in held.items() if r}


def amount(resources: dict[str, float], zero: bool = False, none: str = "nothing") -> str:
    """``2 CPU and 1 GPU``; ``zero``: also the kinds at 0 that ``resources`` names; ``none`` where it has neither."""
    shown = [k for k in SHOWN if resources.get(k) or (zero and k in resources)]
    return " and ".join(f"{resources[k]:g} {k}" for k in shown) or none


def _job_lines(amounts: dict[str, dict[str, float]], jobs: dict[str, Job], now_ms: int) -> list[str]:
    """A line a job, the largest first: its amount, id, age and command."""
    lines = []
    for job, resources in sorted(amounts.items(), key=lambda kv: (-kv[1].get("GPU", 0), -kv[1].get("CPU", 0), kv[0])):
        info = jobs.get(job)
        if info is None:
            lines.append(f"  {amount(resources):12s} job {job}")
            continue
        state = f"running {elapsed((now_ms - info.started_ms) / 1000)}" if info.running else "ended"
        lines.append(f"  {amount(resources):12s} job {job} ({state}): {shown_command(info.command)}")
    return lines


def usage_lines(
    total: dict[str, float], free: dict[str, float], held: dict[str, dict[str, float]],
    waiting: dict[str, dict[str, float]], jobs: dict[str, Job], now_ms: int,
) -> list[str]:  # fmt: skip
    """The cluster's resources and free share, a line a job that holds some, then those a job waits for."""
    free_now = {k: free.get(k, 0.0) for k in SHOWN if total.get(k)}
    lines = [f"cluster: {amount(total)}; free now: {amount(free_now, zero=True)}"]
    lines += _job_lines(held, jobs, now_ms)
    if waiting:
        lines += ["waiting for room:", *_job_lines(waiting, jobs, now_ms)]
    return lines


def cluster_usage() -> list[str]:
    """:func:`usage_lines` of the connected cluster, read through Ray's state API."""
    import ray
    from ray.util.state import list_actors, list_jobs, list_placement_groups, list_tasks

    def resources(bundles) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in bundles or []:
            for k, v in (b.get("unit_resources") or {}).items():
                out[k] = out.get(k, 0.0) + v
        return out

    live = list_placement_groups(filters=[("state", "!=", "REMOVED")], detail=True, limit=10_000)
    groups = {
        created: [Holder(g.creator_job_id, resources(g.bundles), g.placement_group_id) for g in live
                  if (g.state == "CREATED") == created]
        for created in (True, False)
    }  # fmt: skip
    actors = list_actors(filters=[("state", "!=", "DEAD")], detail=True, limit=10_000)
    placed = [a for a in actors if a.state == "ALIVE" or (a.state == "PENDING_CREATION" and a.pid)]
    unplaced = [a for a in actors if a.state == "PENDING_CREATION" and not a.pid]  # no node has room for it yet

    def tasks(state: str) -> list:
        return list_tasks(filters=[("state", "=", state), ("type", "=", "NORMAL_TASK")], detail=True, limit=10_000)

    def others(actors: list, tasks: list) -> list[Holder]:
        return [Holder(x.job_id, x.required_resources or {}, x.placement_group_id) for x in actors + tasks]

    held = by_job(groups[True], others(placed, tasks("RUNNING")))
    waiting = by_job(groups[False], others(unplaced, tasks("PENDING_NODE_ASSIGNMENT")))
    jobs = {
        j.job_id: Job(j.entrypoint or "", str(getattr(j.status, "value", j.status)) == "RUNNING", j.start_time or 0)
        for j in list_jobs(detail=True, limit=10_000)
        if j.job_id in held or j.job_id in waiting
    }
    now_ms = int(time.time() * 1000)
    return usage_lines(ray.cluster_resources(), ray.available_resources(), held, waiting, jobs, now_ms)
