"""Local scratch files and folders that a killed process does not leave behind for good.

Ingest and training workers build files on local disk before they publish them: a shard being written for S3, a
slide downloaded from S3 (gigabytes), a checkpoint being saved. A worker that dies (killed, out of memory, a lost
node's process) runs no cleanup, and a long-lived node's temporary folder would fill up with such leftovers. So
every scratch name carries its owner's process id, and each process, the first time it asks for scratch space,
deletes the scratch of processes that no longer run. Processes that share a temporary folder must share a process
id namespace (a container's processes do; Ray's workers run in the container of their node).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

PREFIX = "tessera-scratch-"


def owner(name: str, prefix: str = PREFIX) -> int | None:
    """The process id that ``name`` (``<prefix><pid>-...``) is named for, or None if it is not named so."""
    found = re.match(re.escape(prefix) + r"(\d+)-", name)
    return int(found[1]) if found else None


def running(pid: int) -> bool:
    """Whether process ``pid`` runs (a process of another user counts; a zombie, killed and not yet reaped by its
    parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def owner_running(name: str, prefix: str = PREFIX) -> bool:
    """Whether ``name`` is named for a process (:func:`owner`) that still runs."""
    pid = owner(name, prefix)
    return pid is not None and running(pid)


def sweep(folder: str) -> list[str]:
    """Delete the scratch in ``folder`` whose owner process is gone; the names deleted."""
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            pid = owner(entry.name)
            if pid is None or pid == os.getpid() or running(pid):
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
            removed.append(entry.name)
    return removed


@functools.cache
def _swept(folder: str) -> list[str]:
    return sweep(folder)


def prefix(kind: str) -> str:
    """The name prefix of this process's scratch of ``kind``, after the first sweep of the temporary folder."""
    _swept(tempfile.gettempdir())
    return f"{PREFIX}{os.getpid()}-{kind}-"


def mkdtemp(kind: str) -> str:
    """A new scratch folder; the caller deletes it when done."""
    return tempfile.mkdtemp(prefix=prefix(kind))


def mkstemp(kind: str, suffix: str = "") -> str:
    """A new empty scratch file's path (``suffix`` kept: OpenSlide goes by the extension); the caller deletes it."""
    fd, path = tempfile.mkstemp(prefix=prefix(kind), suffix=suffix)
    os.close(fd)
    return path


def directory(kind: str) -> tempfile.TemporaryDirectory:
    """A scratch folder deleted when the context (or ``cleanup``) ends, as :class:`tempfile.TemporaryDirectory`."""
    return tempfile.TemporaryDirectory(prefix=prefix(kind))
