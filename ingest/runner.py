"""Ray orchestration of ingest: actors plan each input, process its regions into staged parts, then parts pack
into size-targeted shards.

Crash safety: each piece of work (a series, or a region of a slide) is staged under ``<out>/_staging/`` as a
part tar, and its record is written after the tar; a re-run redoes only work without a record. Packing is
deterministic (inputs by id, regions by index), so re-packing after a crash rewrites the same shard names with
the same samples: every sample appears exactly once.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from pydantic import BaseModel, Field
from tqdm import tqdm

from ingest.config import DicomIngestConfig, ImagesIngestConfig, IngestConfig, WsiIngestConfig, pseudonym_key
from ingest.decisions import decide
from ingest.plan import Plan, plan_dicom, plan_images, plan_wsi
from ingest.source_cache import local_copy
from ingest.units import Unit, Work, batch_images, plan_unit, work_samples
from shards import manifest as mf
from shards import storage
from shards.index import parse_index
from shards.manifest import InputRecord, Manifest, ShardInfo
from shards.writer import ShardWriter, concat_shards, shard_name

STAGING = "_staging"
SHARD_FILE = re.compile(r"[^/_][^/]*/shard-\d{6}\.(tar|idx)")


class Outcome(BaseModel):
    """What one image of a batch came to."""

    status: str = "ingested"
    reason: str | None = None
    samples: int = 0


class WorkRecord(BaseModel):
    """What one piece of work produced (staged beside its part tar; not part of the manifest).

    A batch of images records each image's outcome in ``members``: one bad image fails alone.
    """

    id: str
    unit: str
    index: int
    status: str
    reason: str | None = None
    samples: int = 0
    bytes: int = 0
    warnings: list[str] = Field(default_factory=list)
    members: dict[str, Outcome] = Field(default_factory=dict)

    def per_unit(self) -> list[WorkRecord]:
        """One record per input: itself, or (a batch) one per image, each naming the shared part."""
        if not self.members:
            return [self]
        return [
            self.model_copy(update={"unit": uid, **o.model_dump(), "members": {}}) for uid, o in self.members.items()
        ]


def _record_url(out: str, work_id: str) -> str:
    return storage.join(out, STAGING, f"{work_id}.json")


def part_url(out: str, work_id: str) -> str:
    """Where a piece of work's part tar is staged (its ``.idx`` lies beside it)."""
    return storage.join(out, STAGING, work_id, shard_name(0))


def _attempt(fn: Callable[[], Any], max_attempts: int) -> tuple[Any, str | None, str | None]:
    """Run ``fn`` with the retry policy of :func:`decide`; returns ``(result, action, reason)``."""
    for attempt in range(1, max_attempts + 1):
        try:
            return fn(), None, None
        except Exception as exc:  # one input's failure is recorded; the run goes on
            decision = decide(exc, attempt, max_attempts)
            if decision.action != "retry":
                return None, decision.action, decision.reason
            time.sleep(min(2.0**attempt * 0.1, 5.0))
    raise AssertionError("unreachable")


def _batch_samples(work: Work, cfg: IngestConfig, members: dict[str, Outcome]):
    """The samples of each image of a batch in turn; an image that fails is recorded in ``members`` and skipped
    (its samples are made whole before any is written, so none of a failed image reaches the part)."""
    for unit in work.batch:
        made, action, reason = _attempt(lambda u=unit: list(work_samples(Work(u), cfg)), cfg.max_attempts)
        members[unit.id] = Outcome(status=action or "ingested", reason=reason, samples=len(made or []))
        yield from made or []


def _write_part(work: Work, cfg: IngestConfig, background=None) -> tuple[int, int, dict[str, Outcome]]:
    """Stage one piece of work as one part tar; returns ``(samples, bytes, outcomes of a batch's images)``."""
    members: dict[str, Outcome] = {}
    samples = _batch_samples(work, cfg, members) if work.batch else work_samples(work, cfg, background)
    # A huge target keeps one part per piece of work, published straight to staging once complete.
    with ShardWriter(storage.join(cfg.out, STAGING, work.id), target_bytes=1 << 62) as writer:
        for sample in samples:
            writer.write(sample)
    return sum(p.samples for p in writer.shards), sum(p.size for p in writer.shards), members


def process_work(work: Work, cfg: IngestConfig, background=None) -> WorkRecord:
    """Stage one piece of work as a part tar, then its record; failures become records too."""
    written, action, reason = _attempt(lambda: _write_part(work, cfg, background), cfg.max_attempts)
    rec = WorkRecord(id=work.id, unit=work.unit.id, index=work.index, status=action or "ingested", reason=reason)
    rec.samples, rec.bytes, rec.members = written or (0, 0, {})
    if action and work.batch:  # the part itself could not be staged: every image of the batch shares its fate
        rec.members = {u.id: Outcome(status=action, reason=reason) for u in work.batch}
    # Recorded as done only when whole: a re-run retries work with a failure in it (a batch with a bad image too).
    if action is None and all(m.status == "ingested" for m in rec.members.values()):
        storage.put_bytes(_record_url(cfg.out, work.id), rec.model_dump_json().encode())
    return rec


@ray.remote(max_restarts=2, max_task_retries=2)
class IngestWorker:
    """A Ray actor holding the ingest configuration: plans inputs and processes their pieces of work."""

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg
        self.background = None
        model = getattr(cfg, "background_model", None)
        if model:  # loaded once per actor, used for every region it processes
            from ingest.background import BackgroundFilter

            self.background = BackgroundFilter(model, cfg.background_threshold)

    def plan(self, unit: Unit) -> tuple[list[Work], list[str], str | None, str | None]:
        result, action, reason = _attempt(lambda: plan_unit(unit, self.cfg), self.cfg.max_attempts)
        works, warnings = result if result else ([], [])
        return works, warnings, action, reason

    def process(self, work: Work) -> WorkRecord:
        return process_work(work, self.cfg, self.background)

    def pack(self, job: tuple[str, int, list[str]]) -> ShardInfo:
        split, index, part_ids = job
        return pack_shard(self.cfg.out, split, index, part_ids)

    def close(self) -> None:
        # Imported here, not at the top: Ray ships this class with its module's globals by value, so a
        # module-level SLIDES would be a copy, not the cache the worker's tasks filled.
        from ingest import source_cache

        source_cache.SLIDES.clear()  # downloaded slides off the worker's disk before Ray ends the process


def _done_records(cfg: IngestConfig) -> dict[str, WorkRecord]:
    """Work finished by an earlier, interrupted run with the same configuration (none for a fresh run)."""
    marker = storage.join(cfg.out, STAGING, "config.json")
    mine = json.dumps(cfg.public(), sort_keys=True)
    if storage.exists(marker):
        if storage.get_bytes(marker).decode() != mine:
            raise ValueError(
                f"{cfg.out} holds staged work of an interrupted run with other options; re-run with the same "
                f"options, or delete {storage.join(cfg.out, STAGING)} to start over"
            )
    else:
        storage.put_bytes(marker, mine.encode())
    done = {}
    for url in storage.list_urls(storage.join(cfg.out, STAGING)):
        if url.endswith(".json") and not url.endswith("/config.json"):
            rec = WorkRecord.model_validate_json(storage.get_bytes(url))
            done[rec.id] = rec
    return done


class _Scheduler:
    """Keeps every actor busy: plans first (they create work), then regions, as results come back."""

    def __init__(self, cfg: IngestConfig, n_actors: int) -> None:
        self.actors = [IngestWorker.options(num_cpus=1).remote(cfg) for _ in range(n_actors)]
        self.idle = list(range(n_actors))
        self.pending: dict[ray.ObjectRef, tuple[int, str, Any]] = {}
        self.queue: list[tuple[str, Any]] = []

    def submit(self, kind: str, item: Any, front: bool = False) -> None:
        if front:
            self.queue.insert(0, (kind, item))
        else:
            self.queue.append((kind, item))
        self._fill()

    def _fill(self) -> None:
        while self.idle and self.queue:
            i = self.idle.pop()
            kind, item = self.queue.pop(0)
            ref = getattr(self.actors[i], kind).remote(item)
            self.pending[ref] = (i, kind, item)

    def next(self) -> tuple[str, Any, Any]:
        ready, _ = ray.wait(list(self.pending), num_returns=1)
        i, kind, item = self.pending.pop(ready[0])
        self.idle.append(i)
        result = ray.get(ready[0])
        self._fill()
        return kind, item, result

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a dead or stuck actor: its temporary files are the OS's to clean
            ray.get([a.close.remote() for a in self.actors], timeout=10)
        for actor in self.actors:
            ray.kill(actor)


class _Tracker:
    """Which pieces of work each input still waits for; queues work not already staged; the progress bar."""

    def __init__(self, units: list[Unit], done: dict[str, WorkRecord], sched: _Scheduler) -> None:
        self.done, self.sched = done, sched
        self.records: dict[str, list[WorkRecord]] = {u.id: [] for u in units}
        self.left: dict[str, int] = {}
        self.settled: set[str] = set()
        self.bar = tqdm(total=len(units), desc=f"ingest {units[0].kind}", unit="input")
        self.samples, self.t0 = 0, time.monotonic()

    def settle(self, uid: str) -> None:
        """Count an input whose pieces of work have all come back (or that has none)."""
        if self.left.get(uid, 0) == 0 and uid not in self.settled:
            self.settled.add(uid)
            self.samples += sum(r.samples for r in self.records[uid])
            self.bar.update(1)
            rate = self.samples / max(time.monotonic() - self.t0, 1e-9)
            self.bar.set_postfix(samples=self.samples, per_s=f"{rate:.1f}", refresh=False)  # drawn at tqdm's pace

    def finished(self, rec: WorkRecord) -> None:
        for r in rec.per_unit():
            self.records[r.unit].append(r)
            self.left[r.unit] -= 1
            self.settle(r.unit)

    def queue(self, works: list[Work], front: bool = False) -> None:
        for w in works:
            for u in w.batch or [w.unit]:
                self.left[u.id] = self.left.get(u.id, 0) + 1
        for w in works:
            if w.id in self.done:
                self.finished(self.done[w.id])
            else:
                self.sched.submit("process", w, front=front)


def _run(units: list[Unit], done: dict[str, WorkRecord], sched: _Scheduler, cfg: IngestConfig):
    """Plan every unit and process its work; returns ``(plans, work records)`` keyed by unit id.

    Slides are planned on the actors (a tissue mask to compute); series and images need no reading to plan and
    are planned here, single images batched ``images_per_task`` to a piece of work.
    """
    plans: dict[str, tuple[list[Work], list[str], str | None, str | None]] = {}
    track = _Tracker(units, done, sched)
    singles = []
    for unit in units:
        if unit.kind == "wsi":
            sched.submit("plan", unit)
            continue
        works, warnings = plan_unit(unit, cfg)
        plans[unit.id] = (works, warnings, None, None)
        if unit.kind == "image":
            singles.append(unit)
        else:
            track.queue(works)
    if singles:
        assert isinstance(cfg, ImagesIngestConfig)
        track.queue(batch_images(singles, cfg.images_per_task))
    for uid in plans:
        track.settle(uid)
    while sched.pending:
        kind, item, result = sched.next()
        if kind == "plan":
            plans[item.id] = result
            track.queue(result[0], front=True)  # a slide's regions before the next slide's plan
            track.settle(item.id)
        else:
            track.finished(result)
    track.bar.close()
    return plans, track.records


def _merge(unit: Unit, plan, works: list[WorkRecord]) -> InputRecord:
    """One input's record from its plan and its pieces of work (any failed piece fails the input)."""
    _, warnings, action, reason = plan
    rec = InputRecord(id=unit.id, kind=unit.kind, status="ingested", patient=unit.patient, label=unit.label)
    rec.split, rec.warnings = unit.split, list(warnings)
    failed = [w for w in works if w.status != "ingested"]
    if action:
        rec.status, rec.reason = action, reason
    elif failed:
        where = f"region {failed[0].index}: " if unit.kind == "wsi" else ""  # only slides have several pieces
        rec.status, rec.reason = "failed", f"{where}{failed[0].reason}"
    elif not works or not sum(w.samples for w in works):
        rec.status, rec.reason = "skipped", "no samples (no tissue above the threshold, or an empty series)"
    rec.samples = sum(w.samples for w in works) if rec.status == "ingested" else 0
    return rec


def group_parts(parts: list[tuple[str, int]], target_bytes: int) -> list[list[str]]:
    """Cut ordered ``(part id, bytes)`` into shards: a shard closes once it reaches ``target_bytes``.

    The same rule as :class:`ShardWriter`, at part granularity, so shard contents are fixed before any is written
    and the shards can be packed in parallel with deterministic names.
    """
    groups: list[list[str]] = []
    size = target_bytes
    for part, nbytes in parts:
        if size >= target_bytes:
            groups.append([])
            size = 0
        groups[-1].append(part)
        size += nbytes
    return groups


def pack_shard(out: str, split: str, index: int, part_ids: list[str]) -> ShardInfo:
    """Join staged parts byte for byte into ``<out>/<split>/shard-<index>.tar`` (+ ``.idx``).

    Parts on the object store are fetched one at a time, so the local disk holds the shard plus one part; local
    parts are read where they lie.
    """

    def parts():
        for work_id in part_ids:
            url = part_url(out, work_id)
            samples = parse_index(storage.get_bytes(url.removesuffix(".tar") + ".idx").decode())
            with local_copy(url) as path:  # concat_shards reads a part whole before asking for the next
                yield Path(path), samples

    return concat_shards(parts(), storage.join(out, split), index)


def _split_parts(recs: list[InputRecord], works: dict[str, list[WorkRecord]]):
    """A split's staged parts in packing order (inputs by id, regions by index) and the inputs in each part
    (several for a batch of images)."""
    owners: dict[str, list[InputRecord]] = {}
    parts: list[tuple[str, int]] = []
    for rec in sorted(recs, key=lambda r: r.id):
        for work in sorted(works[rec.id], key=lambda w: w.index):
            if work.samples:
                if work.id not in owners:
                    parts.append((work.id, work.bytes))
                owners.setdefault(work.id, []).append(rec)
    return parts, owners


def _pack(cfg: IngestConfig, inputs: list[InputRecord], works: dict[str, list[WorkRecord]], sched: _Scheduler):
    """Pack the staged parts of ingested inputs, per split, into size-targeted shards, one per actor call.

    Parts stay on the object store and are joined by the (already warm) actors in parallel, not funnelled
    through the driver.
    """
    splits: dict[str, mf.SplitInfo] = {}
    by_split: dict[str, list[InputRecord]] = {}
    todo: dict[str, tuple[list[list[str]], dict[str, list[InputRecord]]]] = {}
    for rec in inputs:
        if rec.status == "ingested":
            by_split.setdefault(rec.split or "all", []).append(rec)
    for split, recs in sorted(by_split.items()):
        parts, owners = _split_parts(recs, works)
        todo[split] = group_parts(parts, cfg.shard_size), owners
        for i, group in enumerate(todo[split][0]):
            sched.submit("pack", (split, i, group))
    done: dict[tuple[str, int], ShardInfo] = {}
    while sched.pending:
        _, (split, i, _), shard = sched.next()
        done[split, i] = shard
    for split, (groups, owners) in todo.items():
        shards = [done[split, i] for i in range(len(groups))]
        for group, shard in zip(groups, shards, strict=True):
            for work_id in group:
                for rec in owners[work_id]:
                    rec.shards = sorted({*rec.shards, f"{split}/{shard.name}"})
        splits[split] = mf.SplitInfo(num_samples=sum(s.samples for s in shards), shards=shards)
    return splits


def _prune(out: str, manifest: Manifest) -> None:
    """Delete shards (and indexes) under ``out`` that the new manifest does not list: leftovers of earlier runs."""
    keep = {storage.join(out, split, s.name) for split, info in manifest.splits.items() for s in info.shards}
    keep |= {u.removesuffix(".tar") + ".idx" for u in keep}
    base = out.rstrip("/") + "/"
    for url in list(storage.list_urls(base)):
        if url.startswith(base) and SHARD_FILE.fullmatch(url[len(base) :]) and url not in keep:
            storage.delete(url)


def run_ingest(kind: str, cfg: IngestConfig, on_private: Callable[[dict[str, str]], None] | None = None):
    """Ingest ``cfg.sources`` of ``kind`` (``wsi``, ``dicom`` or ``images``) into shards; returns ``(manifest, url)``.

    ``on_private`` receives the pseudonym -> location map, for the caller to keep somewhere private.
    """
    key = pseudonym_key()
    if kind == "wsi":
        assert isinstance(cfg, WsiIngestConfig)
        plan: Plan = plan_wsi(cfg, key)
    elif kind == "dicom":
        assert isinstance(cfg, DicomIngestConfig)
        plan = plan_dicom(cfg, key)
    elif kind == "images":
        assert isinstance(cfg, ImagesIngestConfig)
        plan = plan_images(cfg, key)
    else:
        raise ValueError(f"unknown ingest kind {kind!r}")
    if on_private:
        on_private(plan.private)
    storage.ensure_bucket(cfg.out)
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.workers, log_to_driver=False, include_dashboard=False)
    inputs: list[InputRecord] = []
    splits: dict[str, mf.SplitInfo] = {}
    if plan.units:
        n = cfg.workers or max(1, int(ray.available_resources().get("CPU", 1)))
        sched = _Scheduler(cfg, max(1, min(n, len(plan.units))))
        try:
            plans, works = _run(plan.units, _done_records(cfg), sched, cfg)
            inputs = [_merge(u, plans[u.id], works[u.id]) for u in plan.units]
            splits = _pack(cfg, inputs, works, sched)
        finally:
            sched.close()
    manifest = Manifest(
        dataset=cfg.out,
        kind=kind,
        classes=plan.classes,
        multilabel=plan.multilabel,
        config=cfg.public(),
        splits=splits,
        inputs=sorted(inputs + plan.skipped, key=lambda r: r.id),
    )
    mf.check_patient_disjoint(manifest)
    url = mf.save(manifest, cfg.out)  # the commit point: what follows only tidies up
    _prune(cfg.out, manifest)
    storage.delete_tree(storage.join(cfg.out, STAGING))
    return manifest, url


def manifest_summary(manifest: Manifest) -> str:
    """One line per split and the input status counts, for the terminal."""
    parts = [f"{s}: {info.num_samples} samples in {len(info.shards)} shards" for s, info in manifest.splits.items()]
    return "; ".join(parts) + " | inputs " + json.dumps(manifest.counts())
