"""Image-folder ingest benchmark: images/s through Ray with one image per unit of work (the baseline) and with
Tessera's batches (``images_per_task``), same folder, workers and options, alternating runs.

A folder of single images (paper 004's MRI set has ~7,000) costs little per image to decode and encode, so the
per-unit overhead (a task round trip, a staged part, its index and record) decides the rate; on an object store
each of those is a request. ``--out s3://...`` measures there, on the local stack (``tessera up``): its S3 and its
Ray cluster.
Usage: ``python benchmarks/image_ingest.py [--images 1000] [--size 256] [--workers 2] [--out DIR|s3://...]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path


def run(src: Path, out: str, per_task: int, workers: int) -> float:
    from ingest.config import ImagesIngestConfig
    from ingest.runner import run_ingest
    from shards import storage

    storage.delete_tree(out)
    cfg = ImagesIngestConfig(sources=[str(src)], out=out, workers=workers, images_per_task=per_task)
    t = time.perf_counter()
    manifest, _ = run_ingest("images", cfg)
    secs = time.perf_counter() - t
    assert manifest.counts().get("ingested") == sum(1 for _ in src.rglob("*.jpg")), manifest.counts()
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="dataset prefix to write (default: a temporary directory)")
    args = ap.parse_args()
    os.environ.setdefault("TESSERA_PSEUDONYM_KEY", "benchmark")
    on_stack = bool(args.out and args.out.startswith("s3://"))
    if on_stack:
        from cluster.settings import load_settings

        load_settings().apply()  # before Ray is imported: it reads its auth settings then
    import ray

    from ingest.config import ImagesIngestConfig
    from ingest.synthetic import make_mri_folders

    root = Path(tempfile.mkdtemp(prefix="tessera-img-bench-"))
    make_mri_folders(root, per_class=args.images // 4, size=args.size)
    out = args.out or str(root / "out")
    batch = ImagesIngestConfig.model_fields["images_per_task"].default
    if on_stack:
        ray.init(log_to_driver=False)  # the stack's cluster (RAY_ADDRESS)
    else:
        ray.init(num_cpus=args.workers, log_to_driver=False, include_dashboard=False)
    times: dict[int, list[float]] = {1: [], batch: []}
    try:
        for _ in range(args.repeats):
            for per_task in times:
                times[per_task].append(run(root / "images", out, per_task, args.workers))
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    n = (args.images // 4) * 4
    one, many = min(times[1]), min(times[batch])
    print(f"{n} images of {args.size} px to {args.out or 'local disk'}, {args.workers} workers, best of {args.repeats}")
    print(f"one image per task:     {one:6.2f}s  {n / one:7.1f} images/s  runs {times[1]}")
    print(f"{batch} images per task:   {many:6.2f}s  {n / many:7.1f} images/s  runs {times[batch]}")
    print(f"batched / one per task: {one / many:.2f}x")


if __name__ == "__main__":
    main()
