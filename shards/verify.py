"""Check a published dataset against its manifest: every shard present with its size, sha256, count and classes."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from shards import manifest as mf
from shards import storage
from shards.index import find_member, parse_index
from shards.schema import class_label


def _classes(data: bytes, samples) -> list[int]:
    """Each sample's ``.cls`` label read from the shard's bytes (-1 for none)."""
    out = []
    for members in samples:
        cls = find_member(members, "cls")
        out.append(class_label(data[cls.offset : cls.offset + cls.size] if cls else None))
    return out


def verify_dataset(prefix: str, manifest: mf.Manifest | None = None) -> list[str]:
    """Problems found (empty when the dataset matches its manifest; ``manifest``: already read by the caller)."""
    manifest = manifest or mf.load(prefix)
    problems = []
    for split, info in manifest.splits.items():
        for shard in info.shards:
            url = storage.join(prefix, split, shard.name)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    local = storage.get_file(url, Path(tmp) / "s.tar")
                    idx = storage.get_bytes(url[: -len(".tar")] + ".idx").decode()
                except storage.StorageError as exc:
                    problems.append(f"{url}: missing ({exc})")
                    continue
                data = local.read_bytes()
            if len(data) != shard.size:
                problems.append(f"{url}: size {len(data)} != manifest {shard.size}")
            if hashlib.sha256(data).hexdigest() != shard.sha256:
                problems.append(f"{url}: sha256 differs from the manifest")
            samples = parse_index(idx)
            if len(samples) != shard.samples:
                problems.append(f"{url}: index has {len(samples)} samples, manifest {shard.samples}")
            if shard.classes is not None and mf.decode_runs(shard.classes) != _classes(data, samples):
                problems.append(f"{url}: sample classes differ from the manifest's")
        if sum(s.samples for s in info.shards) != info.num_samples:
            problems.append(f"{split}: shard sample counts do not add up to {info.num_samples}")
    return problems
