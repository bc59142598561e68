"""Stain-jitter benchmark: images/s of HED jitter in DALI's CPU mode, DALI's own arithmetic (the GPU path's graph,
the baseline) against the OpenCV kernel the CPU pipelines call (``shards.stain``), on the same batches, with a
flip alone as the pipeline's floor; in one run.

Usage: ``python benchmarks/stain_jitter.py [--size 256] [--batch 32] [--threads 2] [--iters 20]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def rate(how: str, images: list[np.ndarray], threads: int, iters: int) -> float:
    from nvidia.dali import fn, pipeline_def

    from shards.stain import hed_draws, hed_jitter, stain_jittered

    @pipeline_def(batch_size=len(images), num_threads=threads, device_id=None, seed=1)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout="HWC")
        if how == "flip":
            return fn.flip(x, horizontal=1)
        if how == "dali":
            return hed_jitter(x, *hed_draws(0.05))
        return stain_jittered(x, 0.05, False, "HWC", threads)

    p = pipe()
    p.build()
    p.run()  # warm-up
    t = time.perf_counter()
    for _ in range(iters):
        p.run()
    return iters * len(images) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (args.size, args.size, 3), np.uint8) for _ in range(args.batch)]
    rates = {how: rate(how, images, args.threads, args.iters) for how in ("flip", "dali", "opencv")}
    for how, r in rates.items():
        print(f"{how:7s} {r:8.0f} images/s  ({1e3 * args.threads / r:.2f} ms of a thread an image)")
    print(f"opencv / dali: {rates['opencv'] / rates['dali']:.2f}x  ({args.size} px, {args.threads} threads)")


if __name__ == "__main__":
    main()
