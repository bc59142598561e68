"""Local paths for sources that may lie on the object store: a temporary copy for one use, or (slides) a copy
downloaded once per worker process and reused while it is needed.

A slide on ``s3://`` is planned in one task and processed in many (one per region), each of which needs it on local
disk: OpenSlide reads files, not streams. Without a cache every region downloads the whole slide again, and a 64k
slide of 2 GB in 12 regions moves 26 GB. The cache keeps the most recently used slides (``slots``, so the disk
holds at most that many per worker) and deletes the oldest as new ones arrive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator

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
    """A local path for ``location``: the path itself, or a temporary download of an ``s3://`` object."""
    if not is_remote(location):
        yield location
        return
    tmp = download(location)
    try:
        yield tmp
    finally:
        os.unlink(tmp)


def local_names(files: list[str]) -> list[str]:
    """Where a slide's files go in its local folder: each keeps its path relative to the first file's folder
    (a MIRAX slide's ``x/`` data folder, a DICOM WSI's level files); a file from elsewhere, or whose name is
    taken, gets a numbered flat name."""
    base = files[0].rsplit("/", 1)[0] + "/"
    names = [os.path.basename(files[0])]
    for i, loc in enumerate(files[1:]):
        rel = loc[len(base) :] if loc.startswith(base) else ""
        ok = rel and ".." not in rel.split("/") and rel not in names
        names.append(rel if ok else f"{i}_{os.path.basename(loc)}")
    return names


class SourceCache:
    """Local copies of remote slides, least recently used out first; local paths pass through untouched.

    A slide may be several files that OpenSlide expects side by side (a DICOM WSI's series, a MIRAX slide's data
    folder): they are downloaded into one folder of their own, laid out as on the store (:func:`local_names`).
    One caller at a time (a Ray actor runs one task at a time); a path stays valid until ``slots`` other remote
    slides have been asked for since its last use, or :meth:`clear`.
    """

    def __init__(self, slots: int = 2, remote: Callable[[str], bool] = is_remote) -> None:
        if slots < 1:
            raise ValueError("a source cache needs at least one slot")
        self.slots, self.remote = slots, remote
        self._folders: OrderedDict[str, tuple[str, str]] = OrderedDict()  # first location -> (folder, path)

    def path(self, locations: str | list[str]) -> str:
        """A local path for the first of ``locations`` (a slide's files), the others beside it; downloaded on
        first use."""
        files = [locations] if isinstance(locations, str) else list(locations)
        first = files[0]
        if not self.remote(first):
            return first
        if first in self._folders:
            self._folders.move_to_end(first)
            return self._folders[first][1]
        while len(self._folders) >= self.slots:
            shutil.rmtree(self._folders.popitem(last=False)[1][0], ignore_errors=True)
        folder = scratch.mkdtemp("src")
        try:
            names = local_names(files)
            for loc, name in zip(files, names, strict=True):
                os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
                storage.get_file(loc, os.path.join(folder, name))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._folders[first] = (folder, os.path.join(folder, names[0]))
        return self._folders[first][1]

    def clear(self) -> None:
        """Delete every local copy (at the end of a run)."""
        while self._folders:
            shutil.rmtree(self._folders.popitem()[1][0], ignore_errors=True)


SLIDES = SourceCache()  # per process: each ingest actor keeps its own
