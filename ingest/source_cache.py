"""Local copies of slides on the object store, downloaded once per worker process and reused while they are needed
(a file for one use: :func:`shards.local_files.local_copy`).

A slide on ``s3://`` is planned in one task and processed in many (one per region), each of which needs it on local
disk: OpenSlide reads files, not streams. Without a cache every region downloads the whole slide again, and a 64k
slide of 2 GB in 12 regions moves 26 GB. The cache keeps the most recently used slides (``slots``, so the disk
holds at most that many per worker) and deletes the oldest as new ones arrive.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from shards import scratch, storage, transfers
from shards.local_files import is_remote


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
    slides have been asked for or fetched ahead since its last use, or :meth:`clear`.

    :meth:`fetch_ahead` downloads a slide the caller will ask for next in a thread of its own, while the caller
    cuts the current one: a worker reading slides of gigabytes from the object store otherwise waits on the
    network for each slide before it can use its core again.
    """

    def __init__(self, slots: int = 2, remote: Callable[[str], bool] = is_remote) -> None:
        if slots < 1:
            raise ValueError("a source cache needs at least one slot")
        self.slots, self.remote = slots, remote
        self._folders: OrderedDict[str, tuple[str, str]] = OrderedDict()  # first location -> (folder, path)
        self._fetching: dict[str, Future] = {}  # first location -> its download in the background
        self._pool: ThreadPoolExecutor | None = None

    def path(self, locations: str | list[str]) -> str:
        """A local path for the first of ``locations`` (a slide's files), the others beside it; downloaded on
        first use, or waited for where :meth:`fetch_ahead` is downloading it."""
        files = [locations] if isinstance(locations, str) else list(locations)
        first = files[0]
        if not self.remote(first):
            return first
        if first in self._folders:
            self._folders.move_to_end(first)
            fetch = self._fetching.pop(first, None)
            with transfers.waiting():
                failed = fetch is not None and fetch.exception() is not None
            if not failed:
                return self._folders[first][1]
            self._drop(first)  # failed in the background: downloaded again here, where its error is the caller's
        self._make_room()
        folder = scratch.mkdtemp("src")
        try:
            path = _download(files, folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self._folders[first] = (folder, path)
        return path

    def fetch_ahead(self, locations: list[str], keep: list[str] | None = None) -> None:
        """Start downloading a remote slide's files in the background (nothing for a local or held slide); it
        takes a slot now, the least recently used slide other than ``keep`` (the one in use) making room; with one
        slot, nothing (it would be the one in use)."""
        first = locations[0]
        if self.slots < 2 or not self.remote(first) or first in self._folders:
            return
        if keep and keep[0] in self._folders:
            self._folders.move_to_end(keep[0])
        self._make_room()
        folder = scratch.mkdtemp("src")
        self._folders[first] = (folder, os.path.join(folder, local_names(locations)[0]))
        self._pool = self._pool or ThreadPoolExecutor(
            1, thread_name_prefix="fetch-ahead", initializer=transfers.background
        )
        self._fetching[first] = self._pool.submit(_download, list(locations), folder)

    def _make_room(self) -> None:
        while len(self._folders) >= self.slots:
            self._drop(next(iter(self._folders)))

    def _drop(self, first: str) -> None:
        folder, _ = self._folders.pop(first)
        if (fetch := self._fetching.pop(first, None)) is not None:
            with transfers.waiting():
                wait([fetch])  # its thread may still be writing into the folder
        shutil.rmtree(folder, ignore_errors=True)

    def clear(self) -> None:
        """Delete every local copy (at the end of a run)."""
        while self._folders:
            self._drop(next(iter(self._folders)))


def _download(files: list[str], folder: str) -> str:
    """Download a slide's files into ``folder`` (:func:`local_names`); the first one's local path."""
    names = local_names(files)
    for loc, name in zip(files, names, strict=True):
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        storage.get_file(loc, os.path.join(folder, name))
    return os.path.join(folder, names[0])


SLIDES = SourceCache()  # per process: each ingest actor keeps its own


def fetch_ahead(ahead: list[str] | None, keep: list[str]) -> None:
    """This process's :meth:`SourceCache.fetch_ahead` of the slide ``ahead`` (an ingest actor's next), if any."""
    if ahead:
        SLIDES.fetch_ahead(ahead, keep)
