"""Merging a dataset's small shards (``tessera dataset URL --compact``).

Every run that amends a dataset (``--append``, ``--retry-failed``, ``--replace-changed``) writes new shards and
leaves the dataset's own as they are, so a dataset grown by many small runs ends with many shards far below the
target size: more objects to list and open per epoch, and uneven parts for the training workers. Compacting joins,
per split, the shards under half the target into shards of about the target, byte for byte (members copied, index
offsets shifted: :func:`shards.writer.concat_shards`), each in the place of the first it replaces. Samples, their
order within a shard, splits and records stay; the manifest, written last under the dataset's lock, swaps the
shards and counts the run among its amendments; the old shards are deleted after it.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

from ingest.lock import DatasetLock
from ingest.packing import group_parts, join_tars, prune
from shards import manifest as mf
from shards import provenance, storage
from shards.manifest import Manifest, ShardInfo

MERGE_READ_AHEAD = 2  # old shards on the local disk at once: the one being joined and the next, downloading


def small_groups(manifest: Manifest, target: int | None = None) -> dict[str, list[list[str]]]:
    """Per split, the shards to merge: those under half of ``target`` bytes (default: the dataset's own
    ``shard_size``), in the split's order, grouped as packing groups parts (a group closes once it reaches
    ``target``); a group of one is left as it is."""
    target = target or int(manifest.config.get("shard_size", 1 << 30))
    out: dict[str, list[list[str]]] = {}
    for split, info in manifest.splits.items():
        small = [(s.name, s.size) for s in info.shards if s.size < target // 2]
        groups = [g for g in group_parts(small, target) if len(g) > 1]
        if groups:
            out[split] = groups
    return out


def merge_shards(out: str, split: str, names: list[str], index: int, classes: str | None) -> ShardInfo:
    """``<out>/<split>/shard-<index>.tar`` (+ ``.idx``) made of the shards ``names`` joined in order, byte for
    byte; object-store shards are downloaded one ahead of the one being joined (they are large: the local disk
    holds the new shard and two old ones)."""
    urls = [storage.join(out, split, name) for name in names]
    return join_tars(urls, storage.join(out, split), index, classes, MERGE_READ_AHEAD)


def compacted(manifest: Manifest, merged: dict[str, list[tuple[list[str], ShardInfo]]], version: str) -> Manifest:
    """``manifest`` (``version``: its sha256) with each group of shards in ``merged`` (``{split: [(old names, new
    shard)]}``) swapped for its new shard, in the place of the group's first, in the split and in the records."""
    renamed = {f"{s}/{old}": f"{s}/{new.name}" for s, groups in merged.items() for olds, new in groups for old in olds}
    splits = {}
    for split, info in manifest.splits.items():
        first = {names[0]: new for names, new in merged.get(split, [])}
        gone = {old for names, _ in merged.get(split, []) for old in names}
        shards = [first.get(s.name, s) for s in info.shards if s.name in first or s.name not in gone]
        assert sum(s.samples for s in shards) == info.num_samples, f"{split}: samples lost in merging"
        splits[split] = info.model_copy(update={"shards": shards})
    inputs = [
        dataclasses.replace(r, shards=sorted({renamed.get(s, s) for s in r.shards})) if r.shards else r
        for r in manifest.inputs
    ]
    old, new = len(renamed), sum(len(groups) for groups in merged.values())
    now = datetime.now(UTC).isoformat(timespec="seconds")
    change = mf.Amendment(time=now, merged=old, merged_into=new, previous_sha256=version, made_by=provenance.made_by())
    return manifest.model_copy(update={"splits": splits, "inputs": inputs, "amended": [*manifest.amended, change]})


def compact(out: str, dry_run: bool = False) -> tuple[Manifest, dict[str, list[list[str]]]]:
    """Merge the small shards of the dataset at ``out`` (its own ``shard_size`` is the target); returns the
    manifest (the new one, or the one there when nothing was merged or ``dry_run``) and the groups merged."""
    if dry_run:
        manifest = mf.load(out)
        return manifest, small_groups(manifest)
    with DatasetLock(out, "dataset --compact") as lock:
        manifest, data = mf.load_with_bytes(out)
        groups = small_groups(manifest)
        if not groups:
            return manifest, groups
        merged: dict[str, list[tuple[list[str], ShardInfo]]] = {}
        for split, split_groups in groups.items():
            info = {s.name: s for s in manifest.splits[split].shards}
            index = manifest.splits[split].next_index
            for i, names in enumerate(split_groups):
                classes = mf.join_runs([info[n].classes for n in names])
                merged.setdefault(split, []).append((names, merge_shards(out, split, names, index + i, classes)))
        new = compacted(manifest, merged, mf.sha256_of(data))
        mf.check_patient_disjoint(new)
        lock.check()
        mf.save(new, out)  # the commit point
        prune(out, new)
        return new, groups
