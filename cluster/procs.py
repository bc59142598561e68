"""Background services as process sessions: start detached, check, stop everything they spawned.

A pid file holds the session id of the service's first process. Ray's ``ray start`` exits after launching
its daemons, and MLflow forks workers, so "running" means "some process of that session is alive" and
stopping means terminating the whole session.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def members(sid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of session ``sid``."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and _sid(p.pid) == sid:
            out.append(p)
    return out


@contextlib.contextmanager
def _locked(pidfile: Path):
    """Held while ``pidfile`` is read and then removed, or written: a stop ending in one process (a Ray Train
    callback) and a start in another (the restart after an outage) cannot interleave between the reading of the
    old session and the removal of what is by then the new service's file."""
    with open(pidfile.with_name(f"{pidfile.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def session_of(pidfile: Path) -> int | None:
    """The session in ``pidfile`` if any of its processes lives; a stale file (crash, reboot) is removed."""
    if not pidfile.exists():  # nothing to lock for, and a lookup makes no folder (`status` of an unused state)
        return None
    with _locked(pidfile):
        try:
            sid = int(pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if sid != os.getsid(0) and members(sid):
            return sid
        pidfile.unlink(missing_ok=True)
        return None


def start(cmd: list[str], pidfile: Path, log: Path, env: dict[str, str], wait: bool = False) -> int:
    """Start ``cmd`` in a new session logging to ``log``; with ``wait``, return its exit code, else its pid."""
    log.parent.mkdir(parents=True, exist_ok=True)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    with _locked(pidfile):
        pidfile.write_text(str(proc.pid))
    return proc.wait() if wait else proc.pid


def _terminate(procs: list[psutil.Process], timeout: float) -> None:
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def stop(pidfile: Path, timeout: float = 15.0, last: Callable[[psutil.Process], bool] | None = None) -> bool:
    """Terminate every process of the session in ``pidfile``; True if something was running. ``last``: the
    processes to end only once the others have (a hub its clients need while they end: Ray's GCS)."""
    sid = session_of(pidfile)
    if sid is None:
        return False
    rounds = [lambda p: not _matches(last, p)] if last else []
    for wanted in [*rounds, lambda p: True]:  # the others first, then whatever is left
        # Repeat: a dying supervisor (raylet, gunicorn) may spawn a last child while we terminate the rest.
        for _ in range(3):
            procs = [p for p in members(sid) if wanted(p)]
            if not procs:
                break
            _terminate(procs, timeout)
    # Only its own: a service restarted while this one took its time to end (up to ``timeout``) wrote its own.
    with _locked(pidfile), contextlib.suppress(FileNotFoundError, ValueError):
        if int(pidfile.read_text().strip()) == sid:
            pidfile.unlink()
    return True


def _matches(predicate: Callable[[psutil.Process], bool], p: psutil.Process) -> bool:
    try:
        return predicate(p)
    except psutil.Error:  # ended meanwhile: one of the others
        return False


def path_with_this_python(path: str) -> str:
    """``path`` (a PATH) with this Python's ``bin`` first, as an activated virtualenv has it: what Tessera starts
    (services, jobs, DeepSpeed's JIT builds) finds this installation's scripts (ray, mlflow, ninja) first."""
    here = os.path.dirname(sys.executable)
    return path if path.split(os.pathsep)[0] == here else os.pathsep.join([here, path])


def wait_until(check, timeout: float, interval: float = 0.5) -> bool:
    """Poll ``check()`` until it returns True or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return bool(check())
