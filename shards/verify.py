"""Check a published dataset against its manifest: every shard present with its size, sha256, count and classes."""

from __future__ import annotations

import hashlib
from typing import BinaryIO

from shards import manifest as mf
from shards import storage, transfers
from shards.index import find_member, parse_index
from shards.local_files import local_copy
from shards.schema import class_label

SHARDS_AT_ONCE = 4  # shards fetched and hashed at once: each is its own download, hashing releases the GIL


def _classes(f: BinaryIO, samples) -> list[int]:
    """Each sample's ``.cls`` label read from the shard file ``f`` (-1 for none)."""
    out = []
    for members in samples:
        cls = find_member(members, "cls")
        if cls is not None:
            f.seek(cls.offset)
        out.append(class_label(f.read(cls.size) if cls else None))
    return out


def verify_shard(url: str, shard: mf.ShardInfo) -> list[str]:
    """What about the shard at ``url`` differs from its manifest entry ``shard``; read as a stream (a shard of
    a GB is never in memory whole), its classes by one small read each."""
    try:
        with local_copy(url) as path, open(path, "rb") as f:
            idx = storage.get_bytes(url[: -len(".tar")] + ".idx").decode()
            h, size = hashlib.sha256(), 0
            while chunk := f.read(1 << 22):
                h.update(chunk)
                size += len(chunk)
            samples = parse_index(idx)
            classes = _classes(f, samples) if shard.classes is not None else None
    except (storage.StorageError, FileNotFoundError) as exc:
        return [f"{url}: missing ({exc})"]
    problems = []
    if size != shard.size:
        problems.append(f"{url}: size {size} != manifest {shard.size}")
    if h.hexdigest() != shard.sha256:
        problems.append(f"{url}: sha256 differs from the manifest")
    if len(samples) != shard.samples:
        problems.append(f"{url}: index has {len(samples)} samples, manifest {shard.samples}")
    if classes is not None and mf.decode_runs(shard.classes or "") != classes:
        problems.append(f"{url}: sample classes differ from the manifest's")
    return problems


def verify_dataset(prefix: str, manifest: mf.Manifest | mf.ManifestHead | None = None) -> list[str]:
    """Problems found (empty when the dataset matches its manifest; ``manifest``: already read by the caller),
    in the manifest's order; ``SHARDS_AT_ONCE`` shards are checked at a time."""
    manifest = manifest or mf.load_head(prefix)[0]
    listed = [(storage.join(prefix, split, s.name), s) for split, info in manifest.splits.items() for s in info.shards]
    found = transfers.concurrently(lambda job: verify_shard(*job), listed, SHARDS_AT_ONCE, "verify")
    problems = [p for shard_problems in found for p in shard_problems]
    for split, info in manifest.splits.items():
        if sum(s.samples for s in info.shards) != info.num_samples:
            problems.append(f"{split}: shard sample counts do not add up to {info.num_samples}")
    return problems
