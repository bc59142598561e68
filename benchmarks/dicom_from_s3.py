"""DICOM series (or image folders) ingested from the object store: files downloaded as used vs read ahead.

A series of CT slices on ``s3://`` is one small object per slice; a worker that downloads each as it uses it
waits a request's round trip per slice. One run: ``--series`` synthetic CT series of ``--slices`` slices
(``--kind images``: a class-folder set of ``--images`` MRI-like images) on a real S3 server (``rclone serve s3``)
with ``--latency-ms`` added to every request (a cloud store's round trip, through a local TCP proxy), ingested by
``--workers`` Ray workers into a local folder, three ways, alternating, best of ``--repeats``:

- local: the same files read from local disk (no requests at all);
- one at a time (``--read-ahead 0``): each file downloaded when it is used;
- read ahead (Tessera's default, 16, or ``--read-ahead N``): each worker downloads the next files in threads.

``--headers N`` then times the plan's header pass over ``N`` small slices on the same server: one process (on
its threads) against Tessera's default processes (one per 2048 files, at most one per core, each on its threads).

Usage: ``python benchmarks/dicom_from_s3.py [--kind dicom|images] [--series 4] [--slices 100] [--images 512]
[--latency-ms 20] [--workers 2] [--repeats 2] [--read-ahead N] [--headers 8000]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from loader import s3_server


def _ingest(kind: str, source: str, out: Path, workers: int, read_ahead: int | None) -> tuple[float, int]:
    """Seconds ``run_ingest`` takes, and the samples it made."""
    from ingest.config import CONFIGS
    from ingest.runner import run_ingest

    shutil.rmtree(out, ignore_errors=True)
    options = {"read_ahead": read_ahead} if read_ahead is not None else {}
    cfg = CONFIGS[kind](sources=[source], out=str(out), workers=workers, split="train=1.0", **options)
    t = time.perf_counter()
    manifest, _ = run_ingest(kind, cfg)
    secs = time.perf_counter() - t
    assert manifest.counts()["failed"] == 0, manifest.counts()
    shutil.rmtree(out, ignore_errors=True)
    return secs, sum(r.samples for r in manifest.inputs)


def header_files(root: Path, count: int) -> list[str]:
    """``count`` small CT slices in ``root`` (the S3 server's bucket ``hdr``: made before it starts, which lists
    its buckets once); their URLs."""
    from ingest.synthetic import make_ct_series

    make_ct_series(root, n=max(1, count // 400), slices=min(count, 400), size=16)
    (root.parent / f"{root.name}_labels.csv").unlink()
    return sorted(f"s3://hdr/{p.relative_to(root).as_posix()}" for p in root.rglob("*.dcm"))


def header_pass(urls: list[str], repeats: int) -> str:
    """The plan's header pass over ``urls``: one process against Tessera's default, each run in a fresh process."""
    import multiprocessing as mp

    from dicom_ingest import _headers_child

    from ingest.dicom import header_processes

    times: dict[int | None, list[float]] = {1: [], None: []}
    ctx = mp.get_context("spawn")
    for _ in range(repeats):
        for processes in times:
            q = ctx.Queue()
            proc = ctx.Process(target=_headers_child, args=(urls, processes, q))
            proc.start()
            secs, found = q.get()
            proc.join()
            assert found == len(urls)
            times[processes].append(secs)
    n = header_processes(len(urls))
    one, many = min(times[1]), min(times[None])
    return (
        f"plan's header pass, {len(urls)} slices on S3: 1 process {', '.join(f'{t:.2f}' for t in times[1])} s; "
        f"{n} processes {', '.join(f'{t:.2f}' for t in times[None])} s: {one / many:.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["dicom", "images"], default="dicom")
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--images", type=int, default=512, help="--kind images: images in all (four classes)")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--read-ahead", type=int, help="files each worker downloads ahead (default: the run's default)")
    ap.add_argument("--headers", type=int, default=0, help="then time the header pass over this many slices")
    args = ap.parse_args()
    os.environ.setdefault("TESSERA_PSEUDONYM_KEY", "benchmark")
    os.environ.setdefault("TQDM_DISABLE", "1")

    from ingest.synthetic import make_ct_series, make_mri_folders

    root = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    data = root / "s3" / "data"
    if args.kind == "dicom":
        make_ct_series(data, n=args.series, slices=args.slices, size=512)
        (root / "s3" / "data_labels.csv").unlink()
        what = f"{args.series} CT series of {args.slices} slices (512 px)"
    else:
        make_mri_folders(data, per_class=args.images // 4, size=256)
        what = f"{args.images // 4 * 4} images (256 px) in class folders"
    sub = "images/" if args.kind == "images" else ""  # the class folders, not the box files beside them
    files = [p for p in (data / sub).rglob("*") if p.is_file()]
    mb = sum(p.stat().st_size for p in files) / 1e6
    print(f"{what}: {len(files)} files, {mb:.0f} MB; {args.workers} workers; {args.latency_ms:g} ms a request")

    urls = header_files(root / "s3" / "hdr", args.headers) if args.headers else []

    import ray

    times: dict[str, list[float]] = {}
    headers = ""
    try:
        with s3_server(root / "s3", args.latency_ms) as (_, endpoint):
            os.environ["AWS_ENDPOINT_URL"] = endpoint  # before Ray starts: its workers inherit the environment
            ray.init(num_cpus=args.workers, log_to_driver=False, include_dashboard=False)
            _ingest(args.kind, f"s3://data/{sub}", root / "warm", args.workers, None)  # Ray's workers up, imports done
            for _ in range(args.repeats):
                runs = [
                    ("local", str(data / sub), 0),
                    ("one at a time", f"s3://data/{sub}", 0),
                    ("read ahead", f"s3://data/{sub}", args.read_ahead),
                ]
                for name, source, ahead in runs:
                    secs, samples = _ingest(args.kind, source, root / "out", args.workers, ahead)
                    times.setdefault(name, []).append(secs)
            ray.shutdown()
            headers = header_pass(urls, args.repeats) if args.headers else ""
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{'way':14s} {'seconds (each run)':>24s} {'best':>7s} {'samples/s':>10s}")
    for name, ts in times.items():
        print(f"{name:14s} {', '.join(f'{t:.2f}' for t in ts):>24s} {min(ts):7.2f} {samples / min(ts):10.1f}")
    best = {name: min(ts) for name, ts in times.items()}
    print(f"\none at a time / read ahead: {best['one at a time'] / best['read ahead']:.2f}x")
    print(f"read ahead / local: {best['read ahead'] / best['local']:.2f} (1.00: the requests cost nothing)")
    if headers:
        print(f"\n{headers}")


if __name__ == "__main__":
    main()
