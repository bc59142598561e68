"""Packing: staged parts become size-targeted shards, byte for byte, on the ingest actors.

Packing is deterministic (inputs by id, regions by index), so re-packing after a crash rewrites the same shard names
with the same samples: every sample appears exactly once. Shards of earlier runs that the new manifest does not
list are deleted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol

from ingest.config import IngestConfig
from ingest.read_ahead import ReadAhead
from ingest.staging import WorkRecord, part_url
from shards import manifest as mf
from shards import storage, transfers
from shards.index import parse_index
from shards.local_files import local_copy
from shards.manifest import InputRecord, Manifest, ShardInfo
from shards.writer import ShardWriter, concat_shards, iter_tar_samples

SHARD_FILE = re.compile(r"[^/_][^/]*/shard-\d{6}\.(tar|idx)")
PACK_READ_AHEAD = 4  # parts downloaded at once while one is joined
INDEX_READS = 16  # the parts' (shards') indices, read before joining: small GETs
PREVIEW_FILE = re.compile(rf"{mf.PREVIEWS}/[0-9a-f]{{16}}\.png")  # a slide pseudonym's


class Scheduler(Protocol):
    """The run's actors, as :func:`pack_parts` uses them: calls go in, results come back in any order."""

    @property
    def busy(self) -> bool: ...

    def submit(self, kind: str, items: list[Any], front: bool = False) -> None: ...

    def next(self) -> tuple[str, Any, Any]: ...


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


def pack_shard(out: str, split: str, index: int, part_ids: list[str], classes: str | None) -> ShardInfo:
    """Join staged parts byte for byte into ``<out>/<split>/shard-<index>.tar`` (+ ``.idx``); ``classes``: the
    parts' class runs joined, or None when a part (staged before they were recorded) lacks them.

    Parts on the object store are downloaded ``PACK_READ_AHEAD`` ahead of the one being joined (their indices
    first, all at once), so the local disk holds the shard plus a few parts; local parts are read where they lie.
    """
    urls = [part_url(out, work_id) for work_id in part_ids]
    return join_tars(urls, storage.join(out, split), index, classes, PACK_READ_AHEAD)


def join_tars(urls: list[str], folder: str, index: int, classes: str | None, ahead: int) -> ShardInfo:
    """``<folder>/shard-<index>.tar`` (+ ``.idx``) made of the tars at ``urls`` (each with its ``.idx``) joined
    in order, byte for byte: their indices read at once, the remote tars downloaded ``ahead`` at a time."""
    indices = transfers.concurrently(
        lambda u: parse_index(storage.get_bytes(u.removesuffix(".tar") + ".idx").decode()), urls, INDEX_READS, "index"
    )
    with ReadAhead(urls, ahead) as files:

        def parts():
            for url, samples in zip(urls, indices, strict=True):
                with files.local(url) as path:  # concat_shards reads a part whole before asking for the next
                    yield Path(path), samples

        return concat_shards(parts(), folder, index, classes)


def split_parts(recs: list[InputRecord], works: dict[str, list[WorkRecord]]):
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


def pack_parts(
    cfg: IngestConfig,
    inputs: list[InputRecord],
    works: dict[str, list[WorkRecord]],
    sched: Scheduler,
    first: dict[str, int] | None = None,
) -> dict[str, mf.SplitInfo]:
    """Pack the staged parts of ingested inputs, per split, into size-targeted shards, one per actor call; a
    split's shards are numbered from ``first[split]`` (0), after the shards a dataset already has.

    Parts stay on the object store and are joined by the (already warm) actors in parallel, not funnelled
    through the driver.
    """
    splits: dict[str, mf.SplitInfo] = {}
    by_split: dict[str, list[InputRecord]] = {}
    todo: dict[str, tuple[list[list[str]], dict[str, list[InputRecord]]]] = {}
    for rec in inputs:
        if rec.status == "ingested":
            by_split.setdefault(rec.split or "all", []).append(rec)
    classes = {w.id: w.classes for recs in works.values() for w in recs}

    def joined(group: list[str]) -> str | None:
        return mf.join_runs([classes.get(work_id) for work_id in group])

    for split, recs in sorted(by_split.items()):
        parts, owners = split_parts(recs, works)
        todo[split] = group_parts(parts, cfg.shard_size), owners
        start = (first or {}).get(split, 0)
        sched.submit("pack", [(split, start + i, g, joined(g)) for i, g in enumerate(todo[split][0])])
    done: dict[tuple[str, int], ShardInfo] = {}
    while sched.busy:
        _, (split, i, _, _), shard = sched.next()
        done[split, i] = shard
    for split, (groups, owners) in todo.items():
        start = (first or {}).get(split, 0)
        shards = [done[split, start + i] for i in range(len(groups))]
        for group, shard in zip(groups, shards, strict=True):
            for work_id in group:
                for rec in owners[work_id]:
                    rec.shards = sorted({*rec.shards, f"{split}/{shard.name}"})
        splits[split] = mf.SplitInfo(num_samples=sum(s.samples for s in shards), shards=shards)
    return splits


def rewrite_shard(out: str, split: str, name: str, index: int, drop: list[str]) -> ShardInfo | None:
    """``<out>/<split>/shard-<index>`` made of the samples of ``split/name`` but those of the inputs ``drop``
    (their items: a sample's key is its input's item, or starts with it and ``_``), in their order; None when
    none is left. The old shard stays until the manifest that no longer lists it is written."""
    dropped = set(drop)
    with (
        local_copy(storage.join(out, split, name)) as path,
        ShardWriter(storage.join(out, split), target_bytes=1 << 62, start_index=index) as writer,
    ):
        for sample in iter_tar_samples(path):
            if str(sample["__key__"]).split("_", 1)[0] not in dropped:
                writer.write(sample)
    return writer.shards[0] if writer.shards else None


def rewrite_shards(
    previous: Manifest, replaced: set[str], sched: Scheduler, first: dict[str, int]
) -> dict[str, dict[str, ShardInfo | None]]:
    """The shards of ``previous`` that hold samples of its inputs ``replaced`` (ids), each written anew without
    them, one per actor call, numbered per split from ``first[split]``; as ``{split: {old name: new shard, or None
    when it held nothing else}}``."""
    drop = sorted(r.item for r in previous.inputs if r.id in replaced and r.item)
    held = previous.shards_holding(replaced)  # "train/shard-000003.tar", ...
    jobs = []
    for split in sorted({s.split("/", 1)[0] for s in held}):
        names = [s.split("/", 1)[1] for s in held if s.startswith(f"{split}/")]
        jobs += [(split, name, first[split] + i, drop) for i, name in enumerate(names)]
    sched.submit("rewrite", jobs)
    out: dict[str, dict[str, ShardInfo | None]] = {}
    while sched.busy:
        _, (split, name, _, _), shard = sched.next()
        out.setdefault(split, {})[name] = shard
    return out


def leftovers(out: str, manifest: Manifest) -> tuple[list[str], list[str]]:
    """What earlier runs left under ``out`` that ``manifest`` does not list: shards (and indexes) and previews of
    slides, and the spool folders of shards a crashed run was writing; as ``(files, spool folders)``."""
    keep = {storage.join(out, split, s.name) for split, info in manifest.splits.items() for s in info.shards}
    keep |= {u.removesuffix(".tar") + ".idx" for u in keep}
    keep |= {mf.preview_url(out, r.item) for r in manifest.inputs if r.item}
    base = out.rstrip("/") + "/"
    files, spools = [], set()
    for url in list(storage.list_urls(base)):
        rel = url[len(base) :] if url.startswith(base) else ""
        if (SHARD_FILE.fullmatch(rel) or PREVIEW_FILE.fullmatch(rel)) and url not in keep:
            files.append(url)
        elif storage.SPOOL in rel:
            head, _, tail = url.partition(storage.SPOOL)
            spools.add(head + storage.SPOOL + tail.split("/")[0])
    return files, sorted(spools)


def prune(out: str, manifest: Manifest) -> None:
    """Delete what earlier runs left under ``out`` (:func:`leftovers`)."""
    files, spools = leftovers(out, manifest)
    storage.delete_many(files)
    for folder in spools:
        storage.delete_tree(folder)
