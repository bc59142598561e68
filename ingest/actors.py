"""The ingest actors and the scheduler that keeps them busy: each actor plans inputs, processes their pieces of
work into staged parts and packs parts into shards (:mod:`ingest.runner` drives them)."""

from __future__ import annotations

import contextlib
import time
from typing import Any

import ray
from tqdm import tqdm

from ingest.config import IngestConfig
from ingest.dispatch import CallQueue
from ingest.model_files import get_model, model_device, model_url
from ingest.packing import pack_shard, rewrite_shard
from ingest.preview import mark_tiles
from ingest.source_cache import fetch_ahead
from ingest.staging import WorkRecord, attempt, process_work, retried
from ingest.units import Unit, Work, plan_unit
from shards import storage
from shards.local_files import is_remote
from shards.manifest import ShardInfo, preview_url
from shards.transfers import Transfers

NO_ROOM_NOTE_S = 30.0  # how long a run waits with no worker started before it says why


def prepare_worker(cpus: int) -> None:
    """Settings of a process that ingests (an actor, or a benchmark's one-core run), made before its work."""
    import cv2

    from shards.allocator import INGEST, keep_freed_memory

    # OpenCV starts a thread per core of the node whatever the actor holds; Ray's OMP_NUM_THREADS does not
    # reach it. Held to the actor's CPUs, as many workers as cores do not oversubscribe the node.
    cv2.setNumThreads(max(1, cpus))
    keep_freed_memory(**INGEST)  # the tile buffers of each region, re-used instead of page-faulted in anew


def mark_preview(out: str, item: str, dropped: list, damaged: list, size0: int, scale: float) -> None:
    """Mark on slide ``item``'s preview the tiles its background model dropped and those that could not be read
    (:func:`~ingest.preview.mark_tiles`; the preview is drawn when the slide is planned, before any tile is read)."""
    url = preview_url(out, item)
    storage.put_bytes(url, mark_tiles(storage.get_bytes(url), size0, scale, dropped, damaged))


@ray.remote(max_restarts=2, max_task_retries=2)
class IngestWorker:
    """A Ray actor holding the ingest configuration: plans inputs and processes their pieces of work."""

    def __init__(self, cfg: IngestConfig) -> None:
        prepare_worker(round(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))
        self.cfg = cfg
        self.background = None
        if sha := getattr(cfg, "background_model_sha256", None):  # loaded once, used for every region
            from ingest.background import BackgroundFilter

            model = get_model(model_url(cfg), cfg.background_model, sha)
            self.background = BackgroundFilter(model, cfg.background_threshold, device=model_device(cfg))

    def ready(self) -> bool:
        """Answered once the actor has started (the cluster placed it and its set-up ran)."""
        return True

    def plan(self, unit: Unit, ahead: list[str] | None = None) -> tuple[list[Work], list[str], str | None, str | None]:
        fetch_ahead(ahead, keep=unit.sources)
        result, action, reason = attempt(lambda: plan_unit(unit, self.cfg, self.background), self.cfg)
        works, warnings = result if result else ([], [])
        return works, warnings, action, reason

    def process(self, work: Work, ahead: list[str] | None = None) -> WorkRecord:
        fetch_ahead(ahead, keep=work.unit.sources)
        return process_work(work, self.cfg, self.background)

    def pack(self, job: tuple[str, int, list[str], str | None]) -> ShardInfo:
        split, index, part_ids, classes = job
        return retried(lambda: pack_shard(self.cfg.out, split, index, part_ids, classes), self.cfg)

    def mark(self, job: tuple[str, list[tuple[int, int]], list[tuple[int, int]], int, float]) -> None:
        retried(lambda: mark_preview(self.cfg.out, *job), self.cfg)

    def rewrite(self, job: tuple[str, str, int, list[str]]) -> ShardInfo | None:
        return retried(lambda: rewrite_shard(self.cfg.out, *job), self.cfg)

    def close(self) -> Transfers:
        """Delete the slides downloaded (before Ray ends the process); what the worker moved to and from the object
        store."""
        # Imported here, not at the top: Ray ships this class with its module's globals by value, so a
        # module-level SLIDES would be a copy, not the cache the worker's tasks filled (and so for the counts).
        from ingest import source_cache
        from shards import transfers

        source_cache.SLIDES.clear()
        return transfers.take()


def _placed() -> int | None:
    """How many of this job's ingest workers not yet started the cluster has placed (still setting up: loading a
    background model); None where Ray's state API cannot say (a cluster without its dashboard)."""
    try:
        from ray.util.state import list_actors

        job = ray.get_runtime_context().get_job_id()
        waiting = [("class_name", "=", "IngestWorker"), ("job_id", "=", job), ("state", "=", "PENDING_CREATION")]
        actors = list_actors(ray.get_runtime_context().gcs_address, filters=waiting, detail=True, timeout=10)
        return sum(1 for a in actors if a.pid)  # a process once placed; 0 while waiting for room
    except Exception:
        return None


def no_room_note(workers: int, placed: int | None, need: dict[str, float], total: dict, free: dict) -> str:
    """The line a run prints when none of its ``workers`` has started after :data:`NO_ROOM_NOTE_S`; ``placed``:
    how many are placed and setting up (None: unknown); ``need``: one worker's resources; ``total``, ``free``: the
    cluster's."""
    asks = " and ".join(f"{v:g} {k}" for k, v in need.items())
    has = ", ".join(f"{free.get(k, 0):g} of {total.get(k, 0):g} {k}s free" for k in need)
    head = f"no ingest worker has started in {NO_ROOM_NOTE_S:.0f} s"
    if placed:
        rest = f"; the other {workers - placed} wait for room" if placed < workers else ""
        return f"{head}: {placed} of {workers} are placed and still setting up{rest} (each needs {asks}; {has})"
    if placed is None:  # Ray's placed-but-setting-up workers hold their resources too
        why = "the cluster has no room for one, or they are still setting up"
    else:
        short = any(free.get(k, 0) < v for k, v in need.items())
        why = "the cluster has no room for one" if short else "none is placed yet"
    return (
        f"{head}: {why} (each needs {asks}; {has}); the run waits for room (`tessera status` shows what holds it; an "
        "autoscaling cluster adds a node)"
    )


class Scheduler:
    """Keeps every actor busy; a slide is cut as soon as it is planned, on the actor that planned it (which has
    it), and its regions go to other actors only at the run's end (:class:`ingest.dispatch.CallQueue`)."""

    def __init__(self, cfg: IngestConfig, n_actors: int) -> None:
        gpus = self.gpus = cfg.gpus_per_worker
        self.actors = [IngestWorker.options(num_cpus=1, num_gpus=gpus).remote(cfg) for _ in range(n_actors)]
        # Work goes to an actor once it has started: one the cluster has no room for yet (its CPUs held by a
        # training run) would hold the call it was given, and the run, until it is placed, if ever.
        self.starting = {actor.ready.remote(): i for i, actor in enumerate(self.actors)}
        self.idle: list[int] = []
        self.pending: dict[ray.ObjectRef, tuple[int, str, Any]] = {}
        self.queue = CallQueue(n_actors, ahead=lambda u: getattr(cfg, "fetch_ahead", False) and is_remote(u.sources[0]))
        self.started = time.perf_counter()
        self.said_no_room = False

    def submit(self, kind: str, items: list[Any], front: bool = False) -> None:
        """Queue a call of ``kind`` per item, in their order: at the back, or (``front``) before all queued."""
        self.queue.add([(kind, item) for item in items], front)
        self._fill()

    def _fill(self) -> None:
        while self.idle and self.queue:
            i = self.idle.pop()
            (kind, item), ahead = self.queue.take(i)
            ref = getattr(self.actors[i], kind).remote(item, *[ahead.sources] if ahead else [])
            self.pending[ref] = (i, kind, item)

    @property
    def busy(self) -> bool:
        """Whether calls are running or waiting for an actor."""
        return bool(self.pending or self.queue)

    def next(self) -> tuple[str, Any, Any]:
        """The next call to finish, as ``(kind, item, result)``. Its actor takes queued work only once the caller
        has queued what the result creates (a slide's regions go to the front, so they run before the next plan
        and on the actor that has the slide), at the next :meth:`submit` or call of this."""
        self._fill()
        while True:
            ready, _ = ray.wait([*self.pending, *self.starting], num_returns=1, timeout=self._note_in())
            if not ready:
                tqdm.write(self._no_room())
                self.said_no_room = True
                continue
            if ready[0] in self.pending:
                break
            ray.get(ready[0])  # an actor whose set-up failed raises here, as a call to it would
            self.idle.append(self.starting.pop(ready[0]))
            self._fill()
        i, kind, item = self.pending.pop(ready[0])
        self.idle.append(i)
        try:
            return kind, item, ray.get(ready[0])
        except ray.exceptions.RayTaskError as exc:  # the actor's own exception, not Ray's wrapping of its traceback
            raise exc.cause from exc

    def _note_in(self) -> float | None:
        """Seconds until the run should say why no worker has started; None: one has, or it has said so."""
        if self.said_no_room or len(self.starting) < len(self.actors):
            return None
        return max(0.0, self.started + NO_ROOM_NOTE_S - time.perf_counter())

    def _no_room(self) -> str:
        """Why the run waits: Ray says nothing of an actor it has no room for, and Tessera cannot tell "not yet"
        (a training run's CPUs, an autoscaler's new node) from "never", so it says so and goes on waiting."""
        need = {"CPU": 1.0, **({"GPU": float(self.gpus)} if self.gpus else {})}
        return no_room_note(len(self.actors), _placed(), need, ray.cluster_resources(), ray.available_resources())

    def close(self) -> None:
        for ref in self.pending:  # a run that stopped: its calls in flight end here, not retried on a new actor
            with contextlib.suppress(Exception):
                ray.cancel(ref)
        if self.starting:  # started since the work ran out, or (still not in a moment) never placed
            done, _ = ray.wait(list(self.starting), num_returns=len(self.starting), timeout=2)
            for ref in done:
                self.starting.pop(ref)
        started = [a for i, a in enumerate(self.actors) if i not in self.starting.values()]
        if self.starting:
            print(f"{len(started)} of {len(self.actors)} ingest workers started: the cluster had no room for the rest")
        with contextlib.suppress(Exception):  # a dead or stuck actor: its temporary files are the OS's to clean
            moved = sum(ray.get([a.close.remote() for a in started], timeout=10), Transfers())
            if moved.downloads or moved.uploads:  # an object store's share of the run: did the network hold it back?
                print(moved.describe(len(started) * (time.perf_counter() - self.started)))
        for actor in self.actors:
            ray.kill(actor)
        for ref in self.pending:  # and taken, so that Ray does not print their errors as unhandled
            with contextlib.suppress(Exception):
                ray.get(ref, timeout=10)
