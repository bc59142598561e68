"""Errors across the ranks of a worker group: a rank that fails alone must not leave the others waiting in a
collective (gloo and NCCL wait up to their timeout, half an hour by default), so each failure is shared and
raised on every rank."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist


def said(error: BaseException | None) -> str | None:
    """What a rank tells the others of its error (an exception object may not unpickle elsewhere)."""
    return None if error is None else f"{type(error).__name__}: {error}"


def raise_any(error: BaseException | None, gathered: list[str | None]) -> None:
    """Raise on every rank if any rank failed (gathered: each rank's error or None): its own exception on the
    rank that had it, the first failed rank's message elsewhere."""
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(gathered) if message]
    if failed:
        raise RuntimeError(f"rank {failed[0][0]} failed: {failed[0][1]}")


def raise_together(error: BaseException | None) -> None:
    """A collective step after work a rank may fail alone: every rank raises if any failed, so that none is
    left waiting in a later collective; with no error anywhere, a barrier."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, said(error))
    raise_any(error, gathered)
