"""``tessera submit`` and ``tessera jobs``: Ray job submission with token auth and Tessera's runtime environment.

The job gets the settings it needs to reach the object store and MLflow (endpoints, keys, the pseudonym key)
as runtime-environment variables; secret values are sent, never printed. Locally, the job runs with this
installation's ``tessera``; on a cluster, with the runtime image's.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from cluster import procs
from cluster.errors import TesseraError
from cluster.settings import Settings
from shards import provenance

# Forwarded to the job when set here: endpoints and settings, then secrets (values never printed).
FORWARD = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_REQUEST_CHECKSUM_CALCULATION",
    "AWS_RESPONSE_CHECKSUM_VALIDATION",
    "MLFLOW_TRACKING_URI",
)
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "TESSERA_PSEUDONYM_KEY")
RAY_TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where Ray looks when neither variable is set
EXCLUDES = [".venv/", ".tessera/", ".git/", "__pycache__/", "*.tar", "*.egg-info/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def runtime_env(settings: Settings, working_dir: str | None = None, local: bool = True) -> dict[str, Any]:
    """The job's runtime environment: settings and secrets as variables, optionally the working directory.

    ``TESSERA_*`` settings of this process travel too (state directory, ports, key files), so a job on the local
    stack sees the stack exactly as this shell does; with a working directory, the commit it is a checkout of
    (the copy sent leaves ``.git`` out), which datasets and runs record. ``local`` puts this installation's
    scripts on the PATH and names this shell's state folder, which a job, run from another directory, would not
    find.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith("TESSERA_")}
    env |= {k: v for k, v in settings.client_env().items() if k in FORWARD or k in SECRETS or k.startswith("TESSERA")}
    env |= {k: os.environ[k] for k in (*FORWARD, *SECRETS) if os.environ.get(k)}
    if local:
        env["PATH"] = procs.path_with_this_python(os.environ.get("PATH", ""))
        env["TESSERA_STATE_DIR"] = str(settings.state)
    if working_dir:  # the job runs a copy of it without its .git: it learns the commit from here
        env.pop(provenance.COMMIT_VARIABLE, None)
        if commit := provenance.source_commit(Path(working_dir)):
            env[provenance.COMMIT_VARIABLE] = commit
    out: dict[str, Any] = {"env_vars": env}
    if working_dir:
        out |= {"working_dir": working_dir, "excludes": EXCLUDES}
    return out


def describe(env: dict[str, Any]) -> str:
    """The runtime environment for the terminal: variable names, secret values hidden."""
    names = sorted(env["env_vars"])
    shown = [f"{n}=<hidden>" if n in SECRETS or "TOKEN" in n or "KEY" in n else n for n in names if n != "PATH"]
    extra = f", working_dir={env['working_dir']}" if "working_dir" in env else ""
    return f"runtime env: {', '.join(shown)}{extra}"


def client(settings: Settings, address: str | None):
    """A job-submission client for ``address`` (default: the local stack's dashboard); the token header is
    added by Ray from ``RAY_AUTH_TOKEN``/``RAY_AUTH_TOKEN_PATH`` (``settings.apply()`` exports them). Without
    any token, Ray's client aborts the process with a C++ stack trace, so that case is an error here."""
    from ray.job_submission import JobSubmissionClient

    tokens = (os.environ.get("RAY_AUTH_TOKEN"), os.environ.get("RAY_AUTH_TOKEN_PATH"))
    if os.environ.get("RAY_AUTH_MODE") == "token" and not any(tokens) and not RAY_TOKEN_FILE.exists():
        raise TesseraError(
            f"no Ray token for {address or settings.ray_dashboard_url}: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
            f"(the local stack's is {settings.secret_path('ray_token')})"
        )

    return JobSubmissionClient(address or settings.ray_dashboard_url)


async def _follow(jobs, job_id: str) -> None:
    async for lines in jobs.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def submit(
    settings: Settings,
    command: list[str],
    address: str | None = None,
    working_dir: str | None = None,
    follow: bool = True,
) -> tuple[str, str]:
    """Submit ``command`` as a Ray job; follow its logs until it ends. Returns ``(job id, final status)``."""
    if not command:
        raise ValueError("nothing to submit: give the command after --, e.g. tessera submit -- tessera train X")
    jobs = client(settings, address)
    env = runtime_env(settings, working_dir, local=address is None)
    entrypoint = shlex.join(command)
    job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=env)
    print(f"submitted {job_id}: {entrypoint}\n{describe(env)}", flush=True)
    if not follow:
        return job_id, str(jobs.get_job_status(job_id))
    try:
        asyncio.run(_follow(jobs, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; the job goes on (tessera jobs stop {job_id})", file=sys.stderr)
        raise
    status = str(jobs.get_job_status(job_id))
    while status not in TERMINAL:  # the log stream can end a moment before the status settles
        time.sleep(0.5)
        status = str(jobs.get_job_status(job_id))
    return job_id, status


def list_jobs(settings: Settings, address: str | None = None) -> list[tuple[str, str, str]]:
    """``(job id, status, entrypoint)`` of every job the cluster knows, newest first."""
    details = client(settings, address).list_jobs()
    details.sort(key=lambda d: d.start_time or 0, reverse=True)
    return [(d.submission_id or d.job_id or "?", str(d.status), d.entrypoint) for d in details]


def stop_job(settings: Settings, job_id: str, address: str | None = None) -> bool:
    return client(settings, address).stop_job(job_id)
