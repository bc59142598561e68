"""Ray orchestration of ingest: actors plan each input and process its pieces of work into staged parts
(:mod:`ingest.staging`), then pack the parts into size-targeted shards (:mod:`ingest.packing`); the manifest is
written last, as the commit point.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable

import ray

from ingest import progress, rendering
from ingest.actors import Scheduler
from ingest.config import ImagesIngestConfig, IngestConfig, pseudonym_key
from ingest.decisions import IngestStopped
from ingest.lock import DatasetLock
from ingest.model_files import gpu_actors, model_url, put_model, recording
from ingest.packing import pack_parts, prune, rewrite_shards
from ingest.plan import Plan, make_plan
from ingest.rerun import amended, decide, recorded_balance, to_ingest
from ingest.staging import STAGING, WorkRecord, done_records, retried, reusable
from ingest.units import Unit, Work, batch_images, plan_unit
from shards import manifest as mf
from shards import provenance, storage, transfers
from shards.manifest import InputRecord, Manifest, ShardInfo
from shards.nodes import alive_resources, cluster_fixed


class _Tracker:
    """Which pieces of work each input still waits for; queues work not already staged; the progress bar."""

    def __init__(self, units: list[Unit], done: dict[str, WorkRecord], sched: Scheduler) -> None:
        self.done, self.sched = done, sched
        self.records: dict[str, list[WorkRecord]] = {u.id: [] for u in units}
        self.left: dict[str, int] = {}
        self.settled: set[str] = set()
        self.bar = progress.bar(len(units), f"ingest {units[0].kind}", "input")
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
        staged = reusable(self.done, works)
        for w in works:
            if w.id in staged:
                self.finished(self.done[w.id])
        self.sched.submit("process", [w for w in works if w.id not in staged], front=front)


def _run(units: list[Unit], done: dict[str, WorkRecord], sched: Scheduler, cfg: IngestConfig):
    """Plan every unit and process its work; returns ``(plans, work records)`` keyed by unit id.

    Slides are planned on the actors (a tissue mask to compute); series and images need no reading to plan and
    are planned here, single images batched ``images_per_task`` to a piece of work.
    """
    plans: dict[str, tuple[list[Work], list[str], str | None, str | None]] = {}
    track = _Tracker(units, done, sched)
    singles = []
    for unit in units:
        if unit.kind == "wsi":
            sched.submit("plan", [unit])
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
    try:
        while sched.busy:
            try:
                kind, item, result = sched.next()
            except IngestStopped as exc:
                done = sum(1 for uid in track.settled if all(r.status == "ingested" for r in track.records[uid]))
                raise IngestStopped(f"{exc}; {done} of {len(units)} inputs were staged before it") from exc
            if kind == "plan":
                plans[item.id] = result
                track.queue(result[0], front=True)  # a slide's regions before the next slide's plan
                track.settle(item.id)
            else:
                track.finished(result)
    finally:
        track.bar.close()  # before any error is printed, not on the bar's line
    return plans, track.records


def _mark_previews(units: list[Unit], plans: dict, works: dict[str, list[WorkRecord]], sched: Scheduler) -> None:
    """Mark on each slide's preview the tiles its background model dropped and those that could not be read, on
    the actors."""
    jobs = []
    for u in units:
        dropped = [xy for r in works[u.id] for xy in r.dropped_at]
        damaged = [xy for r in works[u.id] for xy in r.damaged_at]
        if (dropped or damaged) and (regions := plans[u.id][0]):
            jobs.append((u.item, dropped, damaged, regions[0].plan.size0, regions[0].plan.preview_scale))
    sched.submit("mark", jobs)
    while sched.busy:
        sched.next()


def _merge(unit: Unit, plan, works: list[WorkRecord], threshold: float | None = None) -> InputRecord:
    """One input's record from its plan and its pieces of work (any failed piece fails the input); ``threshold``:
    the background model's, where one dropped tiles."""
    regions, warnings, action, reason = plan
    rec = InputRecord(
        id=unit.id,
        kind=unit.kind,
        status="ingested",
        item=unit.item,
        patient=unit.patient,
        label=unit.label,
        fingerprint=unit.fingerprint,
        site=unit.site,
    )
    rec.split, rec.warnings = unit.split, list(warnings) + [n for w in works for n in w.warnings]
    if unit.kind == "wsi" and regions and regions[0].plan:  # where heatmaps of its tiles are drawn
        rec.preview_scale = regions[0].plan.preview_scale
    if threshold is not None:
        rec.background_dropped = sum(len(w.dropped_at) for w in works)
    rec.left_out = sum(w.left_out for w in works)
    failed = [w for w in works if w.status != "ingested"]
    samples = sum(w.samples for w in works)
    if action:
        rec.status, rec.reason = action, reason
    elif failed:
        where = f"region {failed[0].index}: " if unit.kind == "wsi" else ""  # only slides have several pieces
        rec.status, rec.reason = "failed", f"{where}{failed[0].reason}"
    elif not samples and rec.left_out and rec.left_out == sum(len(r.plan.tiles) for r in regions or [] if r.plan):
        rec.status, rec.reason = "failed", f"none of its {rec.left_out} tile(s) with tissue could be read (damaged)"
    elif not samples and rec.background_dropped:  # how many: its background_dropped (one reason groups inputs)
        why = f"the background model called each of its tiles with tissue background (P >= {threshold})"
        rec.status, rec.reason = "skipped", f"no samples: {why}"
    elif not samples:
        rec.status, rec.reason = "skipped", "no samples (no tissue above the threshold, or an empty series)"
    rec.samples = samples if rec.status == "ingested" else 0
    return rec


def nothing_to_ingest(plan: Plan, out: str) -> str:
    """Why a run that would make a dataset of nothing at ``out`` is refused: what its inputs were skipped for,
    and where to look when the label table named none of them."""
    if not plan.skipped:
        return f"nothing to ingest: no input found; nothing was written to {out}"
    reasons = Counter(rec.reason or "" for rec in plan.skipped)
    why = "; ".join(f"{n} {reason}" for reason, n in reasons.most_common(3))
    hint = (
        "; do the label table's IDs name the inputs as they are known (slide file stem, series, patient or SOP "
        "instance UID, image name)? `--dry-run` lists what was found"
        if "not in the label table" in reasons
        else ""
    )
    return (
        f"nothing to ingest: all {len(plan.skipped)} input(s) were skipped ({why}){hint}; nothing was written to {out}"
    )


# The driver's object-store line only once it waited this long on its requests: a run's few bookkeeping requests
# (lock, manifest) take milliseconds, a large cohort's header pass minutes.
DRIVER_LINE_S = 1.0


def run_ingest(kind: str, cfg: IngestConfig, on_private: Callable[[dict[str, str]], object] | None = None):
    """Ingest ``cfg.sources`` of ``kind`` (``wsi``, ``dicom`` or ``images``) into shards; returns ``(manifest, url)``.

    ``on_private`` receives the private map (pseudonym -> what it stands for), for the caller to keep private.
    """
    transfers.take()  # what this process moved before the run is not the run's
    started = time.perf_counter()
    try:
        return _plan_and_ingest(kind, cfg, on_private)
    finally:
        moved = transfers.take()
        if moved.waited >= DRIVER_LINE_S:  # planning's share: a large cohort's header pass is its own GETs
            print(moved.describe(time.perf_counter() - started, transfers.DRIVER))


def _plan_and_ingest(kind: str, cfg: IngestConfig, on_private: Callable[[dict[str, str]], object] | None):
    """Plan the run, then ingest under the dataset's lock."""
    cfg = recorded_balance(cfg)
    plan = make_plan(kind, cfg, pseudonym_key())
    cfg, model_line = recording(cfg, plan.model)
    if model_line:
        print(model_line)
    if on_private:
        on_private(plan.private)
    storage.ensure_bucket(cfg.out)
    with DatasetLock(cfg.out, f"ingest {kind}") as lock:  # before the dataset is read: one run amends it at a time
        if lock.took_over:
            print(f"{cfg.out}: took over the lock of a run that stopped: {lock.took_over.describe(time.time())}")
        try:
            return _ingest(kind, cfg, plan, lock)
        except IngestStopped as exc:
            raise IngestStopped(
                f"ingest stopped: {exc}; no input was recorded as failed for it, and what was staged is kept: the "
                "same command, run again once that is put right, continues from there"
            ) from exc


def _ingest(kind: str, cfg: IngestConfig, plan, lock: DatasetLock) -> tuple[Manifest, str]:
    previous = decide(kind, plan, cfg)
    if previous is None:
        _starting(plan, cfg)
    adds = to_ingest(previous, plan, cfg) if previous is not None else None
    if previous is not None and not adds:
        prune(cfg.out, previous)  # what a run stopped between its manifest and its tidying left; none other writes
        failed = previous.counts()["failed"] if not cfg.retry_failed else 0
        retry = f" ({failed} of its inputs failed: --retry-failed ingests them again)" if failed else ""
        print(
            f"{cfg.out}: already made from these inputs with these options ({previous.created}); nothing to do{retry}"
        )
        return previous, storage.join(cfg.out, mf.MANIFEST_NAME)
    units = adds.units if adds is not None else plan.units
    if adds is not None and (note := rendering.amend_note(previous, cfg)):
        print(note)
    # the version this run amends (training runs that recorded it find it among the new manifest's ancestors)
    version = mf.sha256_of(storage.get_bytes(storage.join(cfg.out, mf.MANIFEST_NAME))) if adds else None
    inputs: list[InputRecord] = []
    splits: dict[str, mf.SplitInfo] = {}
    rewritten: dict[str, dict[str, ShardInfo | None]] = {}
    rendered: provenance.Rendering | None = None  # what its workers rendered with, ``a | b`` where they differ
    if units:
        if not ray.is_initialized():
            ray.init(num_cpus=cfg.workers, log_to_driver=False, include_dashboard=False, logging_level="WARNING")
        # One per CPU of the cluster, held by other work or not: a worker it has no room for yet starts once a CPU
        # is free (a training run ended) and only then takes work (Scheduler); one per CPU free at the start ran
        # the whole of a long ingest begun beside a training run on as few workers.
        n = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        if cfg.gpus_per_worker:
            n = gpu_actors(n, alive_resources(), cfg.gpus_per_worker, cluster_fixed())
        if plan.model:  # the driver's bytes, for actors on any node (the path it read need not be there)
            retried(lambda: put_model(plan.model, model_url(cfg)), cfg)
        sched = Scheduler(cfg, max(1, min(n, len(units))))
        # Shards of inputs added to a dataset are numbered after its own, which stay as they are.
        first = {s: info.next_index for s, info in previous.splits.items()} if previous else {}
        try:
            plans, works = _run(units, done_records(cfg), sched, cfg)
            _mark_previews(units, plans, works, sched)
            threshold = getattr(cfg, "background_threshold", None) if plan.model else None
            inputs = [_merge(u, plans[u.id], works[u.id], threshold) for u in units]
            found = [w.rendered_with for u in units for w in works[u.id] if w.rendered_with]
            if note := rendering.mixed_note(cfg.out, found):
                print(note)
            rendered = provenance.combined(found)
            if adds is not None and rendered and (note := rendering.amend_note(previous, cfg, rendered)):
                print(note)  # nodes on another image than the driver's
            splits = pack_parts(cfg, inputs, works, sched, first)
            if adds is not None and adds.replaced:  # the shards that held their samples, written anew after
                after = {s: n + len(splits[s].shards) if s in splits else n for s, n in first.items()}
                rewritten = rewrite_shards(previous, {u.id for u in adds.replaced}, sched, after)
        finally:
            sched.close()
    if previous is not None and adds is not None:
        # its shards and records as they were, but the shards rewritten without the replaced inputs' samples
        manifest = amended(previous, adds, plan, inputs, splits, version, rewritten, rendered)
    else:
        manifest = Manifest(
            dataset=cfg.out,
            kind=kind,
            classes=plan.classes,
            multilabel=plan.multilabel,
            config=cfg.public(),
            splits=splits,
            inputs=sorted(inputs + plan.skipped, key=lambda r: r.id),
            unmatched_labels=plan.unmatched,
            made_by=provenance.made_by(),
            rendered_with=rendered,
        )
    mf.check_patient_disjoint(manifest)
    lock.check()  # a run that lost its lock (stalled past its time-out) commits nothing
    url = retried(lambda: mf.save(manifest, cfg.out), cfg)  # the commit point: what follows only tidies up
    prune(cfg.out, manifest)
    storage.delete_tree(storage.join(cfg.out, STAGING))
    return manifest, url


def _starting(plan, cfg: IngestConfig) -> None:
    """Before a new dataset's run: refuse one with nothing to ingest (an empty dataset would only stand in the way
    of the next run), and say which splits hold no patient (a dataset already there keeps its splits)."""
    if not plan.units:
        raise ValueError(nothing_to_ingest(plan, cfg.out))
    for note in plan.notes:
        print(note)


def manifest_summary(manifest: Manifest) -> str:
    """One line per split and the input status counts, for the terminal."""
    parts = [f"{s}: {info.num_samples} samples in {len(info.shards)} shards" for s, info in manifest.splits.items()]
    unmatched = f" | label rows naming no input {len(n)}" if (n := manifest.unmatched_labels) else ""
    grown = ""
    if manifest.amended:
        last = manifest.amended[-1]
        times = len(manifest.amended)
        grown = f" | made {manifest.created}, amended {times} time(s); last {last.time}: {last.describe()}"
    dropped = [r.background_dropped for r in manifest.inputs if r.background_dropped is not None]
    model = f" | the background model dropped {sum(dropped)} tiles" if dropped else ""
    n = sum(1 for r in manifest.inputs if r.warnings)
    warned = f" | {n} input(s) with warnings (`tessera dataset {manifest.dataset}` counts them)" if n else ""
    counts = " | inputs " + json.dumps(manifest.counts())
    return ("; ".join(parts) or "no samples") + counts + unmatched + model + warned + grown
