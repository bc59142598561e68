"""DICOM ingest benchmark: slices/s on one core for the naive method and for Tessera, on one synthetic CT series.

- naive (papers 002/003 as usually coded): ``dcmread``, float HU, three float windows, PNG save per slice (PIL);
- Tessera: header pass and anatomical order, HU windows through a lookup table, PNG (OpenCV), shard + DALI index.

Tessera runs twice: with PNG (lossless, as the naive method; the encoder dominates) and with JPEG quality 95.
Also prints Tessera's peak RSS, which stays flat with series length (a sample holds at most ``2k + 1`` rendered slices).

Then the plan's header pass over a cohort of ``--plan-files`` small local slices: in one process, and in the
processes Tessera starts for that many files (one per 2048 files, at most one per core), in a fresh process each
(their start-up counted).
Usage: ``python benchmarks/dicom_ingest.py [--slices 200] [--size 512] [--plan-files 8000] [--workdir DIR]``.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

WINDOWS = ((40.0, 80.0), (80.0, 200.0), (40.0, 380.0))


def write_series(root: Path, slices: int, size: int) -> None:
    from pydicom.uid import generate_uid

    from ingest.synthetic import SyntheticPatient, ct_slice_dataset, ct_volume

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    patient = SyntheticPatient("BENCH^MARK", "B1", "19700101")
    study, series = generate_uid(), generate_uid()
    for k in range(slices):
        vol = ct_volume(1, size, bleed=k % 3 == 0, rng=rng)
        noise = rng.integers(-20, 20, (size, size))
        ct_slice_dataset(vol[0] + noise, patient, study, series, k).save_as(
            root / f"{k:05d}.dcm", enforce_file_format=True
        )


def naive(files: list[Path]) -> float:
    import pydicom
    from PIL import Image

    t = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(f)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        chans = []
        for c, w in WINDOWS:
            lo, hi = c - w / 2, c + w / 2
            chans.append(((np.clip(hu, lo, hi) - lo) / (hi - lo) * 255).astype(np.uint8))
        Image.fromarray(np.stack(chans, -1)).save(io.BytesIO(), format="PNG")
    return time.perf_counter() - t


def tessera(root: str, out: str, fmt: str = "png") -> tuple[int, float]:
    from ingest.config import DicomIngestConfig
    from ingest.plan import plan_dicom
    from ingest.units import Work, dicom_samples
    from shards.writer import ShardWriter

    t = time.perf_counter()
    cfg = DicomIngestConfig(sources=[root], out=out, split="train=1.0", format=fmt, quality=95)
    (unit,) = plan_dicom(cfg, b"benchmark").units
    with ShardWriter(out) as writer:
        for sample in dicom_samples(Work(unit), cfg):
            writer.write(sample)
    return sum(s.samples for s in writer.shards), time.perf_counter() - t


def _child(root: str, out: str, fmt: str, q) -> None:
    from ingest.actors import prepare_worker

    prepare_worker(1)  # as an ingest actor of one CPU sets its process up
    n, secs = tessera(root, out, fmt)
    q.put((n, secs, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def _headers_child(files: list[str], processes: int | None, q) -> None:
    from ingest.dicom import map_headers
    from ingest.plan import source_headers

    t = time.perf_counter()
    found = map_headers(source_headers, files, processes)
    q.put((time.perf_counter() - t, sum(len(headers) for headers, _ in found)))


def header_pass(root: Path, count: int) -> None:
    """The plan's header pass over ``count`` slices: one process against Tessera's default, each run fresh."""
    from ingest.dicom import header_processes
    from ingest.synthetic import make_ct_series

    if not root.exists():
        make_ct_series(root, n=max(1, count // 400), slices=min(count, 400), size=16)
    files = sorted(str(p) for p in root.rglob("*.dcm"))
    times = {}
    for processes in (1, None):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_headers_child, args=(files, processes, q))
        proc.start()
        times[processes], found = q.get()
        proc.join()
        assert found == len(files)
    n = header_processes(len(files))
    print(f"\nplan's header pass, {len(files)} local slices: 1 process {times[1]:.2f}s "
          f"({len(files) / times[1]:.0f} files/s), {n} processes {times[None]:.2f}s "
          f"({len(files) / times[None]:.0f} files/s): {times[1] / times[None]:.2f}x")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--plan-files", type=int, default=8000)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    root = Path(args.workdir or tempfile.mkdtemp(prefix="tessera-dicom-bench-")) / f"ct{args.slices}_{args.size}"
    if not root.exists():
        write_series(root, args.slices, args.size)
    files = sorted(root.glob("*.dcm"))
    naive_s = naive(files)
    print(f"CT series: {len(files)} slices of {args.size} x {args.size}")
    print(f"naive (PNG)      {naive_s:7.2f}s  {len(files) / naive_s:7.1f} slices/s")
    for fmt in ("png", "jpg"):
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        proc = ctx.Process(target=_child, args=(str(root), str(root.parent / "out"), fmt, q))
        proc.start()
        n, t_s, rss = q.get()
        proc.join()
        shutil.rmtree(root.parent / "out", ignore_errors=True)
        print(f"tessera ({fmt:3s} )   {t_s:7.2f}s  {n / t_s:7.1f} slices/s  (peak RSS {rss:.0f} MB)")
        print(f"  tessera ({fmt}) / naive: {(n / t_s) / (len(files) / naive_s):.2f}x  (target >= 5)")
    if args.plan_files:
        header_pass(root.parent / f"cohort{args.plan_files}", args.plan_files)


if __name__ == "__main__":
    os.environ.setdefault("TESSERA_PSEUDONYM_KEY", "benchmark")
    main()
