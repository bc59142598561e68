"""Which Ray driver trains an MLflow run, so that ``--resume`` does not start a second training of a run that is
still being trained: both would write the same checkpoints and the same MLflow run. A run left RUNNING by a
driver that is gone (killed, its machine or cluster restarted) is resumed as any stopped run."""

from __future__ import annotations

import contextlib

DRIVER_TAG = "tessera.driver"  # "<Ray job id>/<its driver's worker id>": the id is unique across cluster restarts


def _jobs(job_id: str) -> list:
    from ray.util.state import list_jobs

    return list_jobs(filters=[("job_id", "=", job_id)], detail=True, raise_on_missing_output=False)


def driver_tag() -> str | None:
    """The tag of the Ray job this process belongs to (a driver, or an actor of it such as a sweep's trial); None
    when the cluster's job list cannot be read (no dashboard)."""
    import ray

    if not ray.is_initialized():
        return None
    job_id = ray.get_runtime_context().get_job_id()
    with contextlib.suppress(Exception):
        for job in _jobs(job_id):
            if job.driver_info is not None:
                return f"{job_id}/{job.driver_info.id}"
    return None


def live_driver(tag: str | None) -> str | None:
    """The job id of ``tag``'s driver when it runs now on the connected cluster, else None (no tag, another
    cluster, a restarted one whose job ids start again, or a job list that cannot be read)."""
    if not tag or "/" not in tag:
        return None
    job_id, driver = tag.split("/", 1)
    with contextlib.suppress(Exception):
        for job in _jobs(job_id):
            if job.driver_info is not None and job.driver_info.id == driver and job.status == "RUNNING":
                return job_id
    return None
