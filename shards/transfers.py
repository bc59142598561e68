"""What this process moved to and from the object store, and how long its work waited on it.

:mod:`shards.storage` counts each S3 transfer; a transfer on a thread that :func:`background` marked (a
read-ahead or fetch-ahead pool) is not waited on unless the work then blocks on it (:func:`waiting`). An ingest
sums its workers' counts at the end, so that a run on object storage says whether the network held it back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")


WORKERS = ("the workers", "they", "their")  # who moved what :meth:`Transfers.describe` counts
DRIVER = ("the driver (planning, staged records, the manifest)", "it", "its")


@dataclass
class Transfers:
    """Transfer counts; ``seconds``: spent in transfers on any thread; ``waited``: the part the work waited on."""

    downloads: int = 0
    downloaded: int = 0  # bytes
    uploads: int = 0
    uploaded: int = 0
    seconds: float = 0.0
    waited: float = 0.0
    listings: int = 0  # listing requests (a thousand objects each): a large prefix's take minutes

    def __add__(self, other: Transfers) -> Transfers:
        return Transfers(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def describe(self, seconds: float, who: tuple[str, str, str] = WORKERS) -> str:
        """One line for the terminal; ``seconds``: the time ``who`` (:data:`WORKERS`, :data:`DRIVER`) had in the
        run (workers x wall time; the driver's wall time)."""
        name, they, their = who
        share = f", {self.waited / seconds:.0%} of {their} time" if seconds > 0 else ""
        moved = [f"downloaded {self.downloads} file(s), {_size(self.downloaded)}"] if self.downloads else []
        moved += [f"uploaded {self.uploads} file(s), {_size(self.uploaded)}"] if self.uploads else []
        moved += [f"listed {self.listings} page(s) of objects"] if self.listings else []
        return (
            f"object store: {name} {' and '.join(moved) or 'moved nothing'}, in {_seconds(self.seconds)} of "
            f"transfers; {they} waited {_seconds(self.waited)} on them{share}"
        )


def _seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds:.2f} s"


def _size(nbytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


_LOCK = threading.Lock()
_TOTAL = Transfers()
_THREAD = threading.local()


def background() -> None:
    """Mark the calling thread as one whose transfers the work does not wait on (a pool's initializer)."""
    _THREAD.background = True


def _spent(seconds: float) -> None:
    """Count ``seconds`` of a transfer, waited on unless on a background thread; the caller holds ``_LOCK``."""
    _TOTAL.seconds += seconds
    _TOTAL.waited += 0.0 if getattr(_THREAD, "background", False) else seconds


def counted(upload: bool, size: int | Callable[[T], int], call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, one S3 transfer, counted with its size in bytes (``size``, or ``size(result)``);
    one that fails counts its time only."""
    start = time.perf_counter()
    done = False
    try:
        out = call(*args, **kwargs)
        done = True
        return out
    finally:
        seconds = time.perf_counter() - start
        nbytes = (size if isinstance(size, int) else size(out)) if done else 0
        with _LOCK:
            if done and upload:
                _TOTAL.uploads += 1
                _TOTAL.uploaded += nbytes
            elif done:
                _TOTAL.downloads += 1
                _TOTAL.downloaded += nbytes
            _spent(seconds)


def listing(pages: Iterable[T]) -> Iterator[T]:
    """``pages`` (a paginator's: each a request when it is drawn), each counted as a listing request and its time
    as a transfer's."""
    pages = iter(pages)
    while True:
        start = time.perf_counter()
        page = next(pages, None)
        seconds = time.perf_counter() - start
        with _LOCK:
            _TOTAL.listings += page is not None
            _spent(seconds)
        if page is None:
            return
        yield page


@contextmanager
def waiting() -> Iterator[None]:
    """Count the time the block takes as waited on transfers (the work blocking on a background one)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        with _LOCK:
            _TOTAL.waited += time.perf_counter() - start


def concurrently(
    call: Callable[[Any], T], items: Iterable[Any], threads: int, name: str, each: Callable[[T], object] | None = None
) -> list[T]:
    """``call`` on each of ``items`` (many small requests: indices, records), ``threads`` at a time, the results in
    the items' order; the caller's wait for them all counts once as waited (not once per thread). ``each`` sees
    each result as it comes, in order, on the caller's thread (a progress bar's count)."""
    with ThreadPoolExecutor(threads, name, background) as pool, waiting():
        out = []
        for result in pool.map(call, items):
            out.append(result)
            if each is not None:
                each(result)
        return out


def add(moved: Transfers) -> None:
    """Count ``moved`` (a helper process's :func:`take`) as this process's."""
    global _TOTAL
    with _LOCK:
        _TOTAL = _TOTAL + moved


def take() -> Transfers:
    """This process's counts since the last call, which starts them again."""
    global _TOTAL
    with _LOCK:
        out, _TOTAL = _TOTAL, Transfers()
    return out
