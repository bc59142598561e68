"""What to do when work on an input raises: retry, fail the input, or stop the run, with the reason recorded
(pure; actors carry it out)."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass
from typing import Literal

from ingest.dicom import DicomError
from ingest.slides import SlideError
from shards.storage import Missing, StorageError

TRANSIENT = (StorageError, ConnectionError, TimeoutError)
BROKEN = (SlideError, DicomError, ValueError)  # the file's content: no retry mends it
GONE = (FileNotFoundError, Missing)  # listed, and not there when read: deleted or moved since
NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


class IngestStopped(RuntimeError):
    """The run stopped for a cause no input is to blame for (its store does not answer, its disk is full): no
    input is recorded as failed for it, and what was staged is kept for the same command to continue from."""


@dataclass(frozen=True)
class Decision:
    """``retry`` the work, record it as ``failed``, or ``stop`` the run; ``reason`` names the cause, never the
    file. ``store``: a failure that may be the store's rather than the input's (an outage stops the run)."""

    action: Literal["retry", "failed", "stop"]
    reason: str
    store: bool = False


def no_space(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is a full (or read-only) disk."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in NO_SPACE:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def not_here() -> str:
    """Why a source the driver listed is missing where a worker reads it."""
    return (
        f"the file is not there on node {socket.gethostname()}: moved or deleted since it was listed, or on a disk "
        "that node does not mount (give s3:// sources, or a folder every node of the cluster mounts)"
    )


def input_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is its file's own fault (broken, or gone since it was listed), which :func:`decide` fails
    at once: of one slice of a series, the slice alone is left out (:mod:`ingest.units`)."""
    return isinstance(exc, BROKEN + GONE) and not no_space(exc)


def decide(exc: BaseException, attempt: int, max_attempts: int = 3) -> Decision:
    """Decide on ``exc`` raised by attempt number ``attempt`` (1-based) of a unit.

    Broken inputs, and objects their store says are not there, fail at once (retrying cannot help); a full disk
    stops the run (every input would fail); storage and network errors are retried until ``max_attempts``, then
    fail the input unless the store itself is found down (``store``; the caller asks it). (Files that are not
    inputs at all are skipped earlier, when sources are listed.)
    """
    reason = f"{type(exc).__name__}: {exc}"
    if no_space(exc):
        return Decision("stop", reason)
    if isinstance(exc, BROKEN):
        return Decision("failed", reason)
    if isinstance(exc, FileNotFoundError):  # listed by the driver, and not there for the worker
        return Decision("failed", f"{type(exc).__name__}: {not_here()}")
    if isinstance(exc, Missing):  # a store that answers says so: asking again cannot bring it back
        gone = "not in the store: deleted (or its bucket) since it was listed"
        return Decision("failed", f"{type(exc).__name__}: {gone}")
    if isinstance(exc, TRANSIENT) and attempt < max_attempts:
        return Decision("retry", reason)
    if isinstance(exc, TRANSIENT):
        return Decision("failed", f"{reason} (after {attempt} attempts)", store=True)
    return Decision("failed", reason)
