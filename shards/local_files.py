"""Local paths for files that may lie on the object store: OpenSlide, pydicom and tar readers want a file on disk.

A local path passes through untouched; an ``s3://`` object is downloaded to a scratch file (:mod:`shards.scratch`:
a killed process's leftovers are swept) that the caller's block owns.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from shards import scratch, storage


def is_remote(location: str) -> bool:
    return location.startswith("s3://")


def download(location: str) -> str:
    """``location``'s bytes in a new temporary file (same extension, which OpenSlide goes by); the caller deletes it."""
    tmp = scratch.mkstemp("src", suffix=os.path.splitext(location)[1])
    try:
        storage.get_file(location, tmp)
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


@contextlib.contextmanager
def local_copy(location: str) -> Iterator[str]:
    """A local path for ``location``: the path itself, or a temporary download of an ``s3://`` object deleted
    after the block."""
    if not is_remote(location):
        yield location
        return
    tmp = download(location)
    try:
        yield tmp
    finally:
        os.unlink(tmp)
