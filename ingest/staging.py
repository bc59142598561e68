"""Staging: each piece of work (a region of a slide, a series, or a batch of images) becomes one part tar under
``<out>/_staging/``, then its record; a re-run redoes only work without a record.

The record is written after the tar, and only when none of the work failed, so a crash between the two, or a
failure, leaves work that a re-run does again rather than work counted twice or lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from ingest import rendering
from ingest.config import IngestConfig, changed_options
from ingest.decisions import IngestStopped, decide
from ingest.read_ahead import ReadAhead
from ingest.units import Work, work_samples
from shards import probes, storage, transfers
from shards.writer import ShardWriter, shard_name

STAGING = "_staging"


class Outcome(BaseModel):
    """What one image of a batch came to."""

    status: str = "ingested"
    reason: str | None = None
    samples: int = 0
    warnings: list[str] = Field(default_factory=list)


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
    classes: str | None = None  # the part's samples' labels as runs (see shards.manifest.encode_runs)
    warnings: list[str] = Field(default_factory=list)
    left_out: int = 0  # a series' slices, or a region's tiles, that could not be read (``Work.left_out``)
    dropped_at: list[tuple[int, int]] = Field(default_factory=list)  # level-0 (x, y) of tiles the model dropped
    damaged_at: list[tuple[int, int]] = Field(default_factory=list)  # and of a region's tiles that could not be read
    members: dict[str, Outcome] = Field(default_factory=dict)
    fingerprint: str | None = None  # of the files it was made from (Work.fingerprint)
    rendered_with: dict[str, str] | None = None  # what its worker rendered with (``ingest.rendering``)

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


def outage(cfg: IngestConfig) -> str | None:
    """Why a store this run writes to or reads its inputs from does not answer now, or None when all answer."""
    return probes.stores_down([cfg.out, *cfg.sources])


def back_within(cfg: IngestConfig, poll_s: float = 5.0) -> bool:
    """Whether every store answers again within ``cfg.outage_wait_s`` (asked every ``poll_s`` seconds)."""
    return probes.answers_within([cfg.out, *cfg.sources], cfg.outage_wait_s, poll_s)


def retried(fn: Callable[[], Any], cfg: IngestConfig) -> Any:
    """``fn()``, with its storage and network errors retried by the policy of :func:`decide`; raises its last
    error, or :class:`IngestStopped` when the disk is full, or the store is down and stays down for
    ``cfg.outage_wait_s`` (no input is to blame; once it answers again, ``fn`` is tried anew)."""
    n = 0
    while True:
        n += 1
        try:
            return fn()
        except Exception as exc:
            decision = decide(exc, n, cfg.max_attempts)
            if decision.action == "retry":
                time.sleep(min(2.0**n * 0.1, 5.0))
                continue
            if decision.action == "stop":
                raise IngestStopped(f"no space left to write ({decision.reason})") from exc
            if decision.store and (down := outage(cfg)):
                print(f"{down}; waiting up to {cfg.outage_wait_s:.0f} s for it (--outage-wait-s)", flush=True)
                if back_within(cfg):
                    print("the store answers again; going on", flush=True)
                    n = 0
                    continue
                raise IngestStopped(f"{down} for {cfg.outage_wait_s:.0f} s") from exc
            raise


def attempt(fn: Callable[[], Any], cfg: IngestConfig) -> tuple[Any, str | None, str | None]:
    """Run ``fn`` as :func:`retried` does; returns ``(result, action, reason)``: an input's own failure is
    recorded and the run goes on, while :class:`IngestStopped` stops it."""
    try:
        return retried(fn, cfg), None, None
    except IngestStopped:
        raise
    except Exception as exc:  # one input's failure is recorded; the run goes on
        decision = decide(exc, cfg.max_attempts, cfg.max_attempts)
        return None, decision.action, decision.reason


def _batch_samples(work: Work, cfg: IngestConfig, members: dict[str, Outcome]):
    """The samples of each image of a batch in turn; an image that fails is recorded in ``members`` and skipped
    (its samples are made whole before any is written, so none of a failed image reaches the part)."""
    with ReadAhead((u.sources[0] for u in work.batch), cfg.read_ahead) as files:
        for unit in work.batch:
            one = Work(unit)
            made, action, reason = attempt(lambda w=one: list(work_samples(w, cfg, files=files)), cfg)
            members[unit.id] = Outcome(
                status=action or "ingested", reason=reason, samples=len(made or []), warnings=one.notes if made else []
            )
            yield from made or []


def _write_part(work: Work, cfg: IngestConfig, background=None) -> tuple[int, int, str, dict[str, Outcome], list]:
    """Stage one piece of work as one part tar; returns ``(samples, bytes, class runs, outcomes of a batch's
    images, tiles the background model dropped)``."""
    members: dict[str, Outcome] = {}
    if background:
        background.dropped.clear()
    samples = _batch_samples(work, cfg, members) if work.batch else work_samples(work, cfg, background)
    # A huge target keeps one part per piece of work, published straight to staging once complete.
    with ShardWriter(storage.join(cfg.out, STAGING, work.id), target_bytes=1 << 62) as writer:
        for sample in samples:
            writer.write(sample)
    classes = " ".join(p.classes for p in writer.shards if p.classes)
    dropped = [(t.x, t.y) for t in background.dropped] if background else []
    return sum(p.samples for p in writer.shards), sum(p.size for p in writer.shards), classes, members, dropped


def process_work(work: Work, cfg: IngestConfig, background=None) -> WorkRecord:
    """Stage one piece of work as a part tar, then its record; failures become records too."""
    written, action, reason = attempt(lambda: _write_part(work, cfg, background), cfg)
    rec = WorkRecord(
        id=work.id,
        unit=work.unit.id,
        index=work.index,
        status=action or "ingested",
        reason=reason,
        fingerprint=work.fingerprint,
        rendered_with=rendering.rendered_with(cfg),
    )
    rec.samples, rec.bytes, rec.classes, rec.members, rec.dropped_at = written or (0, 0, None, {}, [])
    if written and not work.batch:  # a series' slices left out (a batch's images keep theirs in ``members``)
        rec.warnings, rec.left_out, rec.damaged_at = list(work.notes), work.left_out, list(work.damaged_at)
    if action and work.batch:  # the part itself could not be staged: every image of the batch shares its fate
        rec.members = {u.id: Outcome(status=action, reason=reason) for u in work.batch}
    # Recorded as done only when whole: a re-run retries work with a failure in it (a batch with a bad image too).
    if action is None and all(m.status == "ingested" for m in rec.members.values()):
        record = rec.model_dump_json().encode()
        retried(lambda: storage.put_bytes(_record_url(cfg.out, work.id), record), cfg)
    return rec


RECORD_READS = 32


def done_records(cfg: IngestConfig) -> dict[str, WorkRecord]:
    """Work finished by an earlier, interrupted run with the same configuration (none for a fresh run); which of
    it a run takes: :func:`reusable`."""
    marker = storage.join(cfg.out, STAGING, "config.json")
    mine = json.dumps(cfg.output_options(), sort_keys=True)
    if storage.exists(marker):  # what it recorded, the options added since at their defaults
        recorded = cfg.recorded_options(json.loads(storage.get_bytes(marker)))
        if changed := changed_options(recorded, json.loads(mine)):
            raise ValueError(
                f"{cfg.out} holds staged work of an interrupted run with other options ({changed}); re-run with the "
                f"same options, or delete {storage.join(cfg.out, STAGING)} to start over"
            )
    else:
        storage.put_bytes(marker, mine.encode())
    staging = storage.join(cfg.out, STAGING)
    # records lie at the top; what a run stages below (its model) is no record
    listed = [(url, url[len(staging) + 1 :]) for url in storage.list_urls(staging)]
    urls = [url for url, name in listed if name.endswith(".json") and "/" not in name and name != "config.json"]
    # a record a GET: tens of thousands after a long run stopped, read RECORD_READS at a time, not one by one
    records = transfers.concurrently(
        lambda url: WorkRecord.model_validate_json(storage.get_bytes(url)), urls, RECORD_READS, "staged-records"
    )
    return {rec.id: rec for rec in records}


def reusable(done: dict[str, WorkRecord], works: list[Work]) -> set[str]:
    """The ids of ``works`` already staged from the same files (the same fingerprint): a slide replaced between a
    crash and the run that resumes it is cut again, not taken from the parts of the one it replaced."""
    return {w.id for w in works if w.id in done and done[w.id].fingerprint == w.fingerprint}
