"""Ray orchestration of ingest: actors process units into staged parts, then parts pack into shards.

Crash safety: a unit's part tar is staged under ``<out>/_staging/`` and its record written after it; a
re-run skips units whose record exists. Packing is deterministic (units sorted by id), so re-packing after a
crash rewrites the same shard names with the same samples: every sample appears exactly once.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray
from tqdm import tqdm

from ingest.config import DicomIngestConfig, IngestConfig, WsiIngestConfig, pseudonym_key
from ingest.plan import Plan, plan_dicom, plan_wsi
from ingest.units import Unit, unit_samples
from shards import manifest as mf
from shards import storage
from shards.manifest import InputRecord, Manifest, ShardInfo
from shards.writer import ShardWriter, iter_tar_members

STAGING = "_staging"


def _staged(out: str, unit_id: str, ext: str) -> str:
    return storage.join(out, STAGING, f"{unit_id}.{ext}")


def process_unit(unit: Unit, cfg: IngestConfig) -> InputRecord:
    """Write one unit's samples to a staged part tar and return its record (failures become records)."""
    warnings: list[str] = []
    rec = InputRecord(id=unit.id, kind=unit.kind, status="ingested", patient=unit.patient, label=unit.label)
    rec.split = unit.split
    spool = tempfile.mkdtemp(prefix="tessera-part-")
    try:
        # A huge target keeps the whole unit in one local part; its name is fixed by the unit id.
        writer = ShardWriter(spool, target_bytes=1 << 62)
        for sample in unit_samples(unit, cfg, warnings):
            writer.write(sample)
        parts = writer.close()
        rec.samples = sum(p.samples for p in parts)
        if parts:
            storage.put_file(os.path.join(spool, parts[0].name), _staged(cfg.out, unit.id, "tar"))
        else:
            rec.status, rec.reason = "skipped", "no samples (no tissue above the threshold, or empty series)"
    except Exception as exc:  # any failure of one input is recorded; the run goes on
        return InputRecord(
            id=unit.id,
            kind=unit.kind,
            status="failed",
            reason=f"{type(exc).__name__}: {exc}",
            patient=unit.patient,
        )
    finally:
        for f in os.listdir(spool):
            os.unlink(os.path.join(spool, f))
        os.rmdir(spool)
    rec.warnings = warnings
    storage.put_bytes(_staged(cfg.out, unit.id, "json"), rec.model_dump_json().encode())
    return rec


@ray.remote(max_restarts=2, max_task_retries=2)
class IngestWorker:
    """A Ray actor holding the ingest configuration; each call processes one unit (slide or series)."""

    def __init__(self, cfg: IngestConfig) -> None:
        self.cfg = cfg

    def process(self, unit: Unit) -> InputRecord:
        return process_unit(unit, self.cfg)


def _done_records(out: str) -> dict[str, InputRecord]:
    done = {}
    for url in storage.list_urls(storage.join(out, STAGING)):
        if url.endswith(".json"):
            rec = InputRecord.model_validate_json(storage.get_bytes(url))
            done[rec.id] = rec
    return done


def _run_units(units: list[Unit], cfg: IngestConfig, done: dict[str, InputRecord]) -> list[InputRecord]:
    todo = [u for u in units if u.id not in done]
    records = [done[u.id] for u in units if u.id in done]
    if not todo:
        return records
    n = cfg.workers or max(1, min(len(todo), int(ray.available_resources().get("CPU", 1))))
    actors = [IngestWorker.options(num_cpus=1).remote(cfg) for _ in range(min(n, len(todo)))]
    pending: dict[ray.ObjectRef, int] = {}
    queue = list(todo)
    for i, actor in enumerate(actors):
        if queue:
            pending[actor.process.remote(queue.pop(0))] = i
    bar = tqdm(total=len(units), initial=len(records), desc=f"ingest {units[0].kind}", unit="input")
    samples = 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(ready[0])
        rec = ray.get(ready[0])
        records.append(rec)
        samples += rec.samples
        bar.update(1)
        bar.set_postfix(samples=samples, failed=sum(r.status == "failed" for r in records))
        if queue:
            pending[actors[i].process.remote(queue.pop(0))] = i
    bar.close()
    for actor in actors:
        ray.kill(actor)
    return records


def _samples_of(part: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Regroup a part tar's members into sample dicts (members of one key are contiguous)."""
    sample: dict[str, Any] = {}
    for name, data in iter_tar_members(part):
        key, ext = name.split(".", 1)
        if sample and sample["__key__"] != key:
            yield sample
            sample = {}
        sample["__key__"] = key
        sample[ext] = data
    if sample:
        yield sample


def _pack(cfg: IngestConfig, records: list[InputRecord]) -> dict[str, mf.SplitInfo]:
    splits: dict[str, mf.SplitInfo] = {}
    by_split: dict[str, list[InputRecord]] = {}
    for rec in records:
        if rec.status == "ingested" and rec.samples:
            by_split.setdefault(rec.split or "all", []).append(rec)
    for split, recs in sorted(by_split.items()):
        writer = ShardWriter(storage.join(cfg.out, split), target_bytes=cfg.shard_size)
        for rec in sorted(recs, key=lambda r: r.id):
            names: set[str] = set()
            with tempfile.TemporaryDirectory() as tmp:
                part = storage.get_file(_staged(cfg.out, rec.id, "tar"), os.path.join(tmp, "part.tar"))
                for sample in _samples_of(part):
                    names.add(writer.write(sample))
            rec.shards = sorted(f"{split}/{n}" for n in names)
        shards: list[ShardInfo] = writer.close()
        splits[split] = mf.SplitInfo(num_samples=sum(s.samples for s in shards), shards=shards)
    return splits


def run_ingest(kind: str, cfg: IngestConfig, on_private: Callable[[dict[str, str]], None] | None = None):
    """Ingest ``cfg.sources`` of ``kind`` (``wsi`` or ``dicom``) into shards; returns ``(manifest, url)``.

    ``on_private`` receives the pseudonym -> location map, for the caller to keep somewhere private.
    """
    key = pseudonym_key()
    if kind == "wsi":
        assert isinstance(cfg, WsiIngestConfig)
        plan: Plan = plan_wsi(cfg, key)
    elif kind == "dicom":
        assert isinstance(cfg, DicomIngestConfig)
        plan = plan_dicom(cfg, key)
    else:
        raise ValueError(f"unknown ingest kind {kind!r}")
    if on_private:
        on_private(plan.private)
    storage.ensure_bucket(cfg.out)
    if not ray.is_initialized():
        ray.init(num_cpus=cfg.workers, log_to_driver=False)
    t0 = time.time()
    records = _run_units(plan.units, cfg, _done_records(cfg.out)) if plan.units else []
    splits = _pack(cfg, records)
    manifest = Manifest(
        dataset=cfg.out,
        kind=kind,
        classes=plan.classes,
        config=cfg.public(),
        splits=splits,
        inputs=sorted(records + plan.skipped, key=lambda r: r.id),
    )
    mf.check_patient_disjoint(manifest)
    url = mf.save(manifest, cfg.out)
    for staged in list(storage.list_urls(storage.join(cfg.out, STAGING))):
        storage.delete(staged)
    manifest.config["elapsed_s"] = round(time.time() - t0, 2)
    return manifest, url


def manifest_summary(manifest: Manifest) -> str:
    """One line per split and the input status counts, for the terminal."""
    parts = [f"{s}: {info.num_samples} samples in {len(info.shards)} shards" for s, info in manifest.splits.items()]
    return "; ".join(parts) + " | inputs " + json.dumps(manifest.counts())
