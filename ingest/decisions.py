"""What to do when work on an input raises: retry or fail, with the reason recorded (pure; actors carry it out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ingest.dicom import DicomError
from ingest.slides import SlideError
from shards.storage import StorageError

TRANSIENT = (StorageError, ConnectionError, TimeoutError)


@dataclass(frozen=True)
class Decision:
    """``retry`` the work, or record it as ``failed``; ``reason`` names the cause, never the file."""

    action: Literal["retry", "failed"]
    reason: str


def decide(exc: BaseException, attempt: int, max_attempts: int = 3) -> Decision:
    """Decide on ``exc`` raised by attempt number ``attempt`` (1-based) of a unit.

    Broken inputs fail at once (retrying cannot help); storage and network errors are retried until
    ``max_attempts``. (Files that are not inputs at all are skipped earlier, when sources are listed.)
    """
    reason = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (SlideError, DicomError, ValueError)):
        return Decision("failed", reason)
    if isinstance(exc, TRANSIENT) and attempt < max_attempts:
        return Decision("retry", reason)
    if isinstance(exc, TRANSIENT):
        return Decision("failed", f"{reason} (after {attempt} attempts)")
    return Decision("failed", reason)
