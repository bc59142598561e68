"""Compaction benchmark: MB/s of ``tessera dataset --compact`` merging a split's small shards, against re-tarring
every sample into a new shard (read each sample, write it again: what merging without the index would cost) and
against a plain file copy of the same bytes (the disk's floor), in one run on local disk.

Usage: ``python benchmarks/compact.py [--shards 24] [--shard-mb 40] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def make_dataset(out: Path, shards: int, shard_mb: int) -> None:
    """A dataset of ``shards`` shards of about ``shard_mb`` MB each, 48 KB samples (a 256 px JPEG's size), its
    manifest targeting shards of ``shards * shard_mb`` MB so that all are small."""
    from ingest.config import WsiIngestConfig
    from shards import manifest as mf
    from shards.writer import ShardWriter

    rng = np.random.default_rng(0)
    per = shard_mb * 1024 // 48
    infos = []
    for i in range(shards):
        with ShardWriter(str(out / "train"), target_bytes=1 << 40, start_index=i) as writer:
            for j in range(per):
                writer.write({"__key__": f"s{i:03d}_{j:05d}", "jpg": rng.bytes(48 * 1024), "cls": str(j % 2)})
        infos += writer.shards
    cfg = WsiIngestConfig(sources=["x"], out=str(out), split="train=1.0", shard_size=shards * shard_mb << 20)
    manifest = mf.Manifest(dataset=str(out), kind="wsi", classes=["a", "b"], config=cfg.public())
    manifest.splits = {"train": mf.SplitInfo(num_samples=sum(s.samples for s in infos), shards=infos)}
    mf.save(manifest, str(out))


def retar(out: Path, names: list[str]) -> None:
    """The baseline: every sample of ``names`` read and written again into one new shard."""
    from shards.writer import ShardWriter, iter_tar_samples

    with ShardWriter(str(out / "retar"), target_bytes=1 << 62, start_index=0) as writer:
        for name in names:
            for sample in iter_tar_samples(out / "train" / name):
                writer.write(sample)


def copy(out: Path, names: list[str]) -> None:
    """The floor: the shards' bytes copied into one file."""
    with open(out / "copy.tar", "wb") as dst:
        for name in names:
            with open(out / "train" / name, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=24)
    ap.add_argument("--shard-mb", type=int, default=40)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TESSERA_PSEUDONYM_KEY", "benchmark")
    from ingest.compact import compact
    from shards import manifest as mf
    from shards.verify import verify_dataset

    root = Path(args.workdir or tempfile.mkdtemp(prefix="tessera-compact-bench-"))
    out = root / "ds"
    shutil.rmtree(out, ignore_errors=True)
    make_dataset(out, args.shards, args.shard_mb)
    names = [s.name for s in mf.load(str(out)).splits["train"].shards]
    total = sum((out / "train" / n).stat().st_size for n in names) / 1e6
    times = {}
    for label, fn in (("file copy (floor)", lambda: copy(out, names)), ("re-tar samples", lambda: retar(out, names))):
        t = time.perf_counter()
        fn()
        times[label] = time.perf_counter() - t
    t = time.perf_counter()
    manifest, groups = compact(str(out))
    times["tessera --compact"] = time.perf_counter() - t
    assert groups and len(manifest.splits["train"].shards) == 1 and verify_dataset(str(out)) == []
    print(f"{len(names)} shards, {total:.0f} MB, merged into 1 (manifest, index, sha256 and prune included):")
    for label, secs in times.items():
        print(f"  {label:20s} {secs:7.2f} s  {total / secs:8.1f} MB/s")
    base = times["re-tar samples"]
    print(f"tessera / re-tar: {base / times['tessera --compact']:.2f}x faster")
    print(f"tessera / copy:   {times['file copy (floor)'] / times['tessera --compact']:.2f}x of the floor's speed")
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
