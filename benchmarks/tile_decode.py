"""The direct path's JPEG tile decode: strict libjpeg-turbo (:mod:`ingest.jpeg_decode`, each warning an error) against
tifffile's decoder after the scan's marker check (:mod:`ingest.jpeg_scan`), the path it replaced.

One run, one synthetic JPEG-tiled pyramidal TIFF (the slide ``benchmarks/wsi_ingest.py`` makes): every source tile
of level 0 decoded through :class:`ingest.tiff_tiles.TiledLevel` by each path in turn, the cache cleared between
rounds, best of ``--repeats``. Checks that both give the same pixels. Prints tiles/s of each and the ratio.
Usage: ``python benchmarks/tile_decode.py [--size 8192] [--repeats 5] [--workdir DIR]``.
"""

from __future__ import annotations

import time

import numpy as np
import tifffile
from slides import slide_args, synthetic_slide

from ingest.jpeg_scan import PageScans
from ingest.tiff_tiles import TiledLevel, _TileCache


def _decode_all(level: TiledLevel, cache: _TileCache) -> list[np.ndarray]:
    cache.clear()
    down, across = -(-level.height // level.tile_h), -(-level.width // level.tile_w)
    return [level._tile(ty, tx) for ty in range(down) for tx in range(across)]


def main() -> None:
    args = slide_args(__doc__, repeats=5)
    _, path = synthetic_slide(args, "slide")
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        cache = _TileCache(1 << 40)  # every tile kept within a round: each decoded once
        strict = TiledLevel(page, cache)
        marked = TiledLevel(page, cache)
        assert strict._strict is not None, "the page is not one the strict decoder reads"
        marked._strict, marked._scans = None, PageScans(page.jpegtables)  # the path before it
        tiles = len(_decode_all(strict, cache))
        pairs = zip(_decode_all(strict, cache), _decode_all(marked, cache), strict=True)
        assert all(np.array_equal(a, b) for a, b in pairs), "the two paths decode different pixels"
        best = {"strict": np.inf, "tifffile + marker check": np.inf}
        for _ in range(args.repeats):
            for name, level in (("strict", strict), ("tifffile + marker check", marked)):
                start = time.perf_counter()
                _decode_all(level, cache)
                best[name] = min(best[name], time.perf_counter() - start)
    print(f"{path.name}: {tiles} level-0 JPEG tiles of {page.tilewidth} px, best of {args.repeats}, one core")
    for name, seconds in best.items():
        print(f"  {name:24s} {seconds:7.3f} s  {tiles / seconds:8.0f} tiles/s")
    ratio = best["tifffile + marker check"] / best["strict"]
    print(f"strict / tifffile + marker check (tiles/s): {ratio:.2f}x (same pixels)")


if __name__ == "__main__":
    main()
