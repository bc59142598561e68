"""Manifest benchmark: a dataset of many inputs (an image folder of a chest X-ray archive's size), its manifest
written and read the way it was (every field of every input record indented; read by ``json.loads`` then
validated, each record a pydantic model; every training driver and worker reading it whole) against Tessera's
(records one line each without their defaults; read by pydantic's JSON parser into slotted dataclasses, a few MB
of records at a time; a driver reading a brief of each record, a worker none), in one run.

Each read runs in a fresh process, so that its peak memory is its own.

Usage: ``python benchmarks/manifest_scale.py [--inputs 200000] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

PER_SHARD = 5000  # 256 px JPEG tiles or X-rays of ~200 KB: a shard of about 1 GB


def make_manifest(n: int):
    """``n`` image inputs: 1 % failed with a reason, the rest one sample each, 3 inputs per patient."""
    from shards import manifest as mf

    inputs = []
    for i in range(n):
        common = {"id": f"{i:016x}", "kind": "image", "item": f"{i ^ 0x5A5A:016x}", "fingerprint": f"{i * 7:016x}"}
        if i % 100 == 99:
            inputs.append(mf.InputRecord(status="failed", reason="cannot identify image file", **common))
            continue
        split = "train" if i % 10 < 8 else "val"
        shard = f"{split}/shard-{i // PER_SHARD:06d}.tar"
        patient = f"{i // 3:016x}"
        inputs.append(
            mf.InputRecord(
                status="ingested", patient=patient, label=i % 4, split=split, samples=1, shards=[shard], **common
            )
        )
    splits = {}
    for split, share in (("train", 0.8), ("val", 0.2)):
        count = int(n * share * 0.99)
        shards = [
            mf.ShardInfo(name=f"shard-{k:06d}.tar", size=1 << 30, sha256="0" * 64, samples=PER_SHARD, classes="0x1")
            for k in range(max(1, count // PER_SHARD))
        ]
        splits[split] = mf.SplitInfo(num_samples=count, shards=shards)
    return mf.Manifest(dataset="s3://shards/xray", kind="images", classes=list("abcd"), splits=splits, inputs=inputs)


def _read(path: str, how: str, q) -> None:
    from shards import manifest as mf

    before = peak_mb()
    t = time.perf_counter()
    if how == "former":
        m = former_manifest().model_validate(json.loads(Path(path).read_bytes()))
    elif how == "models":
        m = former_manifest().model_validate_json(Path(path).read_bytes())
    elif how == "whole":
        m, _ = mf.load_with_bytes(str(Path(path).parent))
    elif how == "brief":
        m, _ = mf.load_brief(str(Path(path).parent))
    else:
        m, _ = mf.load_head(str(Path(path).parent))
    seconds = time.perf_counter() - t
    assert m.num_samples("train") > 0
    q.put((seconds, peak_mb() - before))


def former_manifest():
    """The manifest type as it was before input records became slotted dataclasses: each record a pydantic model
    (the same fields), which keeps a dict and a set of the fields given beside its values."""
    import dataclasses
    import typing

    from pydantic import create_model

    from shards import manifest as mf

    hints = typing.get_type_hints(mf.InputRecord)
    fields = {
        f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(mf.InputRecord)
    }
    record = create_model("FormerRecord", **fields)
    return create_model("FormerManifest", __base__=mf.ManifestHead, inputs=(list[record], []))


def peak_mb() -> float:
    """This process's peak resident memory (``VmHWM``: its own, where ``ru_maxrss`` keeps the parent's across the
    spawn's exec), MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def timed_read(path: Path, how: str) -> tuple[float, float]:
    """Seconds and MB of peak memory (the bytes read included) that reading ``path`` ``how`` takes, in a new process."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_read, args=(str(path), how, q))
    proc.start()
    out = q.get()
    proc.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from shards import manifest as mf

    root = Path(args.workdir or tempfile.mkdtemp(prefix="manifest-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    manifest = make_manifest(args.inputs)
    former, now = root / "former.json", root / "manifest.json"
    t = time.perf_counter()
    former.write_bytes(manifest.model_dump_json(indent=2).encode())
    former_s = time.perf_counter() - t
    t = time.perf_counter()
    now.write_bytes(mf.dumps(manifest))
    now_s = time.perf_counter() - t
    assert mf.Manifest.model_validate_json(now.read_bytes()) == manifest

    print(f"{args.inputs} inputs ({args.inputs * 99 // 100} images ingested, 1 % failed), {root}")
    print(f"\n{'':34s} {'former':>10s} {'tessera':>10s} {'ratio':>7s}")
    row("manifest.json, MB", former.stat().st_size / 1e6, now.stat().st_size / 1e6)
    row("written, s", former_s, now_s)
    (whole_s, whole_mb), (former_whole_s, former_whole_mb) = timed_read(now, "whole"), timed_read(former, "former")
    row("read whole (ingest, dataset), s", former_whole_s, whole_s)
    row("  its peak memory, MB", former_whole_mb, whole_mb)
    models_s, models_mb = timed_read(now, "models")  # this layout, parsed at once, each record a model
    row("  as models, at once, s", models_s, whole_s)
    row("  its peak memory, MB", models_mb, whole_mb)
    brief_s, brief_mb = timed_read(now, "brief")  # the former driver read it whole, as ingest does
    row("read by a training driver, s", former_whole_s, brief_s)
    row("  its peak memory, MB", former_whole_mb, brief_mb)
    (head_s, head_mb), (former_head_s, former_head_mb) = timed_read(now, "head"), timed_read(former, "former")
    row("read by a training worker, s", former_head_s, head_s)
    row("  its peak memory, MB", former_head_mb, head_mb)


def row(what: str, former: float, now: float) -> None:
    """A line of the table: the former way, Tessera's, and how many times less Tessera's is."""
    print(f"{what:34s} {former:10.2f} {now:10.2f} {former / max(now, 1e-9):6.2f}x")


if __name__ == "__main__":
    main()
