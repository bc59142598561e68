"""WSI ingest from the object store: what a worker gains by downloading its next slide while it cuts the current one.

OpenSlide reads files, so an ingest worker downloads each slide on ``s3://`` to its disk before it can read it.
One run: ``--slides`` copies of a synthetic slide (``wsi_ingest.py``'s, ``--size`` px) on a real S3 server
(``rclone serve s3``) whose bandwidth is limited to ``--bwlimit`` (the network a node's workers share), ingested
by ``--workers`` Ray workers into a local folder, four ways, alternating, best of ``--repeats``:

- local: the same slides read from local disk (the work alone: the floor if the network were free);
- network: the slides only downloaded, ``--workers`` at a time (the floor if the work were free);
- one at a time (``--no-fetch-ahead``): each worker downloads a slide when it starts on it;
- fetch ahead (Tessera's default): each worker downloads its next slide while it cuts the current one.

Prints the seconds, one at a time / fetch ahead, and fetch ahead against the larger floor (1.0: download and work
overlap entirely). On a machine this small the S3 server and the downloads share the workers' cores, which a
cluster's network does not. Usage: ``python benchmarks/wsi_from_s3.py [--size 16384] [--slides 8] [--workers 2]
[--bwlimit 200M] [--repeats 2] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loader import s3_server
from wsi_ingest import TILE, _slide


def _ingest(sources: list[str], out: Path, workers: int, fetch_ahead: bool) -> float:
    """Seconds ``run_ingest`` takes over ``sources`` into ``out`` (removed after)."""
    from ingest.config import WsiIngestConfig
    from ingest.runner import run_ingest

    shutil.rmtree(out, ignore_errors=True)
    cfg = WsiIngestConfig(
        sources=sources, out=str(out), tile_size=TILE, workers=workers, split="train=1.0", fetch_ahead=fetch_ahead
    )
    t = time.perf_counter()
    manifest, _ = run_ingest("wsi", cfg)
    secs = time.perf_counter() - t
    assert manifest.counts()["ingested"] == len(sources), manifest.counts()
    shutil.rmtree(out, ignore_errors=True)
    return secs


def _download_all(urls: list[str], root: Path, workers: int) -> float:
    """Seconds to download every one of ``urls``, ``workers`` at a time, as the workers would."""
    from shards import storage

    def get(k: int) -> None:
        local = root / f"dl{k}.tiff"
        storage.get_file(urls[k], local)
        local.unlink()

    t = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(get, range(len(urls))))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=16384, help="slide side in px")
    ap.add_argument("--slides", type=int, default=8, help="copies of the slide on the store")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--bwlimit", default="200M", help="the S3 server's bandwidth (rclone's --bwlimit, bytes/s)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", help="where the slide is generated and kept (default: a new temporary folder)")
    args = ap.parse_args()
    os.environ.setdefault("TESSERA_PSEUDONYM_KEY", "benchmark")
    os.environ.setdefault("TQDM_DISABLE", "1")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="tessera-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    slide = _slide(root, args.size)
    store = Path(tempfile.mkdtemp(prefix="tessera-bench-s3-", dir=root))
    (store / "slides").mkdir()
    local = []
    for k in range(args.slides):  # one slide under several names: each is downloaded and cut as a slide of its own
        os.link(slide, store / "slides" / f"s{k:03d}.tiff")
        local.append(str(store / "slides" / f"s{k:03d}.tiff"))
    mb = slide.stat().st_size / 1e6
    print(f"{args.slides} slides of {args.size} px, {mb:.0f} MB each, {args.workers} workers, S3 at {args.bwlimit}/s")

    import ray

    times: dict[str, list[float]] = {}
    try:
        with s3_server(store, 0, ("--bwlimit", args.bwlimit)) as (endpoint, _):
            os.environ["AWS_ENDPOINT_URL"] = endpoint  # before Ray starts: its workers inherit the environment
            urls = [f"s3://slides/s{k:03d}.tiff" for k in range(args.slides)]
            ray.init(num_cpus=args.workers, log_to_driver=False, include_dashboard=False)
            _ingest(urls[: args.workers], root / "warm", args.workers, True)  # Ray's workers started, imports done
            for _ in range(args.repeats):
                times.setdefault("local", []).append(_ingest(local, root / "out", args.workers, True))
                times.setdefault("network", []).append(_download_all(urls, root, args.workers))
                for name, ahead in (("one at a time", False), ("fetch ahead", True)):
                    times.setdefault(name, []).append(_ingest(urls, root / "out", args.workers, ahead))
    finally:
        ray.shutdown()
        shutil.rmtree(store, ignore_errors=True)
    print(f"\n{'way':14s} {'seconds (each run)':>28s} {'best':>7s}")
    for name, ts in times.items():
        print(f"{name:14s} {', '.join(f'{t:.2f}' for t in ts):>28s} {min(ts):7.2f}")
    best = {name: min(ts) for name, ts in times.items()}
    floor = max(best["local"], best["network"])
    print(f"\nnetwork: {args.slides * mb / best['network']:.0f} MB/s over {args.workers} downloads at a time")
    print(f"one at a time / fetch ahead: {best['one at a time'] / best['fetch ahead']:.2f}x")
    print(f"fetch ahead / max(local, network): {best['fetch ahead'] / floor:.2f} (1.00: download and work overlap)")
    print(f"one at a time / (local + network): {best['one at a time'] / (best['local'] + best['network']):.2f}")


if __name__ == "__main__":
    main()
