"""Colour-profile benchmark: what ``--color-profile apply`` costs, in one run on one core.

Per tile: LittleCMS through Pillow (``ImageCms``, the baseline) against Tessera's table of LittleCMS's answer for
every 8-bit colour (``ingest.colour.lookup``), on tiles of a synthetic slide read as the ingest reads them (their
outputs are checked equal). End to end: a slide's tiles per second through the ingest's own path (plan, read,
encode), with the profile ignored and applied, at the stored size of the paper's tiles (600 px) and at 256 px.

Usage: ``python benchmarks/colour_profile.py [--size 8192] [--repeats 3] [--workdir DIR]``.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from slides import slide_args, synthetic_slide


def per_tile(slide: Path, repeats: int) -> None:
    from ingest.colour import lookup, open_profile, srgb_lut, srgb_transform, to_srgb
    from ingest.slides import open_slide

    reader = open_slide(str(slide))
    icc = reader.icc_profile()
    w, _ = reader.level_dimensions[0]
    tiles = [reader.read_region(x, x, 0, 600, 600) for x in range(0, w - 600, max(600, (w - 600) // 16))]
    reader.close()
    transform = srgb_transform(open_profile(icc))
    t = time.perf_counter()
    lut = srgb_lut(icc)
    build = time.perf_counter() - t
    assert all(np.array_equal(lookup(tile, lut), to_srgb(tile, transform)) for tile in tiles)
    rows = {}
    for name, convert in (("littlecms", lambda a: to_srgb(a, transform)), ("table", lambda a: lookup(a, lut))):
        runs = []
        for _ in range(repeats):
            t = time.perf_counter()
            for tile in tiles:
                convert(tile)
            runs.append((time.perf_counter() - t) / len(tiles) * 1e3)
        rows[name] = min(runs)
        each = ", ".join(f"{r:.2f}" for r in runs)
        print(f"{name:10s} {rows[name]:6.2f} ms a 600 px tile (best of {repeats}: {each})")
    print(f"table / littlecms: {rows['littlecms'] / rows['table']:.2f}x faster; the table built once in {build:.2f} s")


def end_to_end(slide: Path, root: Path, repeats: int) -> None:
    from ingest.config import WsiIngestConfig
    from ingest.plan import make_plan
    from ingest.units import plan_unit, wsi_samples

    for store in (None, 256):
        rates: dict[str, list[float]] = {"ignore": [], "apply": []}
        for _ in range(repeats):
            for colour in rates:
                cfg = WsiIngestConfig(
                    sources=[str(slide)], out=str(root / colour), tile_size=600, store_size=store,
                    split="train=1.0", color_profile=colour,
                )  # fmt: skip
                [unit] = make_plan("wsi", cfg, b"k").units
                t = time.perf_counter()
                works, _ = plan_unit(unit, cfg)
                n = sum(1 for w in works for _ in wsi_samples(w, cfg))
                rates[colour].append(n / (time.perf_counter() - t))
        best = {k: max(v) for k, v in rates.items()}
        print(
            f"stored at {store or 600} px: ignore {best['ignore']:.0f} tiles/s, apply {best['apply']:.0f} tiles/s "
            f"(best of {repeats}; medians {statistics.median(rates['ignore']):.0f} and "
            f"{statistics.median(rates['apply']):.0f}): apply / ignore {best['apply'] / best['ignore']:.2f}x"
        )


def main() -> None:
    from ingest.synthetic import swapped_profile

    args = slide_args(__doc__, repeats=3)
    root, slide = synthetic_slide(args, "profiled", icc=swapped_profile())
    per_tile(slide, args.repeats)
    # the table is built once per worker: a run's first slide pays it, as the first end-to-end pass here
    end_to_end(slide, root, args.repeats)


if __name__ == "__main__":
    main()
