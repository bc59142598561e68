"""One ingest at a time into a dataset: a lock object beside its manifest.

Two runs amending one dataset at once would number their new shards alike and overwrite each other's, and the
manifest written last would list shards holding the other run's bytes. So a run takes ``_ingest.lock`` before it
reads the dataset, keeps it fresh while it works (a heartbeat), checks it still holds it just before writing the
manifest, and removes it at the end. A lock is taken over when its holder stopped beating ``ttl`` seconds ago, or
at once when its holder was a process on this host that is gone (a killed run, resumed here).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from shards import storage, transfers
from shards.scratch import running

LOCK_NAME = "_ingest.lock"
TTL = 120.0  # seconds without a heartbeat after which a holder on another host counts as gone
SETTLE = 0.5  # seconds between writing a lock and reading it back, for stores that ignore conditional writes
_LEFT_BEHIND: set[str] = set()  # tokens of runs of this process that ended without removing their lock (store down)


class DatasetBusy(ValueError):
    """Another ingest holds the dataset: the message names it and says when to try again."""


@dataclass
class Holder:
    """Who holds a dataset's lock; ``beat`` is the time of its last heartbeat (seconds since the epoch)."""

    token: str
    what: str
    host: str
    pid: int
    started: float
    beat: float

    def gone(self, now: float, ttl: float) -> bool:
        return now - self.beat > ttl or (self.host == socket.gethostname() and not running(self.pid))

    def describe(self, now: float) -> str:
        started = datetime.fromtimestamp(self.started, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.what} (pid {self.pid} on {self.host}, started {started}, last seen {now - self.beat:.0f}s ago)"


def holder(out: str) -> Holder | None:
    """The holder of the lock of the dataset at ``out``, or None when nobody holds it."""
    url = storage.join(out, LOCK_NAME)
    if not storage.exists(url):
        return None
    try:
        return Holder(**json.loads(storage.get_bytes(url)))
    except storage.StorageError:  # released between the two requests
        return None


def lock_line(out: str) -> str | None:
    """What a user should know about the lock of the dataset at ``out``: who writes to it now, or that a run
    which stopped left its lock (the next run takes it over); None when nobody holds it."""
    current, now = holder(out), time.time()
    if current is None:
        return None
    if current.gone(now, TTL):
        return f"a run that stopped left its lock: {current.describe(now)}; the next ingest takes it over"
    return f"another ingest is writing to it now: {current.describe(now)}; an ingest started now is refused"


class DatasetLock:
    """``with DatasetLock(out, "ingest wsi"):`` holds the dataset at ``out`` for this run, or raises
    :class:`DatasetBusy` naming the run that holds it."""

    def __init__(self, out: str, what: str, ttl: float = TTL) -> None:
        self.out, self.url, self.ttl = out, storage.join(out, LOCK_NAME), ttl
        now = time.time()
        self.me = Holder(uuid.uuid4().hex, what, socket.gethostname(), os.getpid(), now, now)
        self.took_over: Holder | None = None
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def _data(self) -> bytes:
        return json.dumps(asdict(self.me)).encode()

    def _busy(self, other: Holder) -> DatasetBusy:
        return DatasetBusy(
            f"{self.out}: another ingest is writing to this dataset: {other.describe(time.time())}; run this again "
            f"once it has finished (a holder that stops for {self.ttl:.0f}s, or has exited on this host, is taken "
            f"over)"
        )  # fmt: skip

    def acquire(self) -> None:
        current = holder(self.out)
        ended = current is not None and current.token in _LEFT_BEHIND  # a run of this process, over
        if current is not None and not ended and not current.gone(time.time(), self.ttl):
            raise self._busy(current)
        if current is None and not storage.create_bytes(self.url, self._data()):
            current = holder(self.out)  # another run created it in between
            if current is not None:
                raise self._busy(current)
        if current is not None:  # a run that stopped: its lock is overwritten, as another taker's may be
            self.took_over = current
            storage.put_bytes(self.url, self._data())
        if current is not None or storage.parse(self.url).scheme == "s3":
            time.sleep(SETTLE)  # a taker that wrote after this one wins; this one then finds its token gone
        self.check()

    def check(self) -> None:
        """Raise :class:`DatasetBusy` unless this run still holds the lock (called before the manifest's commit)."""
        current = holder(self.out)
        if current is None or current.token != self.me.token:
            other = f": {current.describe(time.time())} holds it" if current else ""
            raise DatasetBusy(f"{self.out}: this ingest lost its lock{other}; nothing of this run was committed")

    def _beat(self) -> None:
        transfers.background()  # the run does not wait on its heartbeats
        while not self._stop.wait(self.ttl / 4):
            try:
                self.check()
                self.me.beat = time.time()
                storage.put_bytes(self.url, self._data())
            except DatasetBusy:
                return  # lost: the check before the commit refuses it
            except storage.StorageError:
                continue  # a store that failed one beat may answer the next; the commit's check decides

    def release(self) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        try:
            current = holder(self.out)
            if current is not None and current.token == self.me.token:
                storage.delete(self.url)
        except storage.StorageError:  # left behind: its holder, gone, is taken over by the next run
            _LEFT_BEHIND.add(self.me.token)

    def __enter__(self) -> DatasetLock:
        self.acquire()
        self._beating = threading.Thread(target=self._beat, name="ingest-lock", daemon=True)
        self._beating.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
