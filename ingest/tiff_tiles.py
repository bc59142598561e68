"""Direct tile reads for tiled TIFF-family slides (generic pyramidal TIFF, Aperio SVS, Philips TIFF, Ventana BIF): a
fast path under OpenSlide.

OpenSlide decodes every source tile a region touches, composites through cairo into premultiplied ARGB and hands
back a new image per call; a 600 px read over 256 px JPEG tiles decodes about twice the pixels it returns, and
neighbouring reads decode the shared tiles again. Here each source tile is decoded once (libjpeg-turbo, each of its
warnings an error: :mod:`ingest.jpeg_decode`; tifffile/imagecodecs for what that does not decode) into a byte-bounded
LRU cache and regions are assembled by slicing. OpenSlide stays the reader of record: a level is served here only
when OpenSlide's backend draws levels from single pages, the level maps to a tiled 8-bit RGB page and a probe read
matches OpenSlide's pixels, so an unusual colour space or layout falls back to OpenSlide rather than going wrong.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from ingest.jpeg_decode import StrictJpeg
from ingest.jpeg_scan import PageScans

# Decoded source tiles kept per slide: ~700 tiles of 256 px, several 600 px tile rows on a 64k slide.
DEFAULT_CACHE_BYTES = 128 << 20
# Largest difference from OpenSlide's pixels tolerated by the probe (identical decoders give 0).
PROBE_MAX_DIFF = 2
# OpenSlide backends that draw each level from one tiled TIFF page. Others composite a level from several pages
# (Leica places its main images on the glass) or are not TIFF; there a page as large as a level may be something
# else, such as Leica's macro photo with the label, and a probe on empty glass cannot tell it from the level.
PAGE_LEVEL_VENDORS = frozenset({"aperio", "generic-tiff", "philips", "ventana"})


class TiledLevel:
    """One tiled TIFF page: decode tiles on demand, cache them, assemble RGB regions in level pixels."""

    def __init__(self, page, cache: _TileCache) -> None:
        self._page = page
        self._fh = page.parent.filehandle
        self._cache = cache
        self.height, self.width = int(page.imagelength), int(page.imagewidth)
        self.tile_h, self.tile_w = int(page.tilelength), int(page.tilewidth)
        self._across = -(-self.width // self.tile_w)
        self._decode = page.decode
        self._kwargs: dict = {"_fullsize": True}
        if page.compression in {6, 7, 34892, 33007}:  # the JPEG family: shared tables live in the page
            self._kwargs.update(jpegtables=page.jpegtables, jpegheader=page.jpegheader)
        # each tile a JPEG stream of its own, from SOI to EOI, decoded with libjpeg-turbo's warnings as errors; where
        # tifffile's decoder serves the page instead (it passes over them), its scan is checked before it decodes it
        self._strict = StrictJpeg.of(page)
        self._scans = PageScans(page.jpegtables) if page.compression == 7 and self._strict is None else None

    @staticmethod
    def supported(page) -> bool:
        """Tiled, contiguous, 8-bit, 3 samples, one plane: the layout regions can be sliced from."""
        return bool(
            page.is_tiled
            and page.tiledepth == 1
            and page.samplesperpixel == 3
            and page.planarconfig == 1
            and np.dtype(page.dtype) == np.uint8
        )

    def _tile(self, ty: int, tx: int) -> np.ndarray | None:
        index = ty * self._across + tx
        key = (id(self), index)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        offset, count = self._page.dataoffsets[index], self._page.databytecounts[index]
        if count == 0:  # sparse pyramid: a tile never scanned reads as background, as OpenSlide shows it
            return None
        self._fh.seek(offset)
        data = self._fh.read(count)
        # a tile cut short, or one libjpeg-turbo decodes only with a warning (tifffile's decoder: one with a marker
        # amid its scan), where OpenSlide refuses it: left to OpenSlide (the caller's fallback), which reads it or
        # says why
        if len(data) != count or (self._scans is not None and self._scans.clean(data) is not True):
            raise ValueError(f"tile {index} of a level {self.width} px wide is not whole")
        if self._strict is not None:
            tile = self._strict.decode(data).reshape(self.tile_h, self.tile_w, 3)
        else:
            segment, _, _ = self._decode(data, index, **self._kwargs)
            tile = np.asarray(segment).reshape(self.tile_h, self.tile_w, 3)
        self._cache.put(key, tile)
        return tile

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """RGB ``uint8[height, width, 3]`` with top-left at level pixel ``(x, y)``; outside the image is white."""
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, self.width), min(y + height, self.height)
        inside = (x0, y0, x1, y1) == (x, y, x + width, y + height)
        # Source tiles cover a request inside the image, so only one reaching outside needs a white fill first.
        out = np.empty((height, width, 3), np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
        if x0 >= x1 or y0 >= y1:
            return out
        for ty in range(y0 // self.tile_h, (y1 - 1) // self.tile_h + 1):
            for tx in range(x0 // self.tile_w, (x1 - 1) // self.tile_w + 1):
                tile = self._tile(ty, tx)
                # Overlap of this source tile with the request, in level pixels.
                sx0, sy0 = max(x0, tx * self.tile_w), max(y0, ty * self.tile_h)
                sx1, sy1 = min(x1, (tx + 1) * self.tile_w), min(y1, (ty + 1) * self.tile_h)
                dest = out[sy0 - y : sy1 - y, sx0 - x : sx1 - x]
                if tile is None:
                    dest[:] = 255
                else:
                    dest[:] = tile[
                        sy0 - ty * self.tile_h : sy1 - ty * self.tile_h,
                        sx0 - tx * self.tile_w : sx1 - tx * self.tile_w,
                    ]
        return out


class _TileCache:
    """LRU of decoded tiles bounded in bytes, so a worker's memory does not grow with the slide."""

    def __init__(self, max_bytes: int) -> None:
        self._items: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._bytes = 0
        self.max_bytes = max_bytes

    def get(self, key: tuple[int, int]) -> np.ndarray | None:
        tile = self._items.get(key)
        if tile is not None:
            self._items.move_to_end(key)
        return tile

    def put(self, key: tuple[int, int], tile: np.ndarray) -> None:
        self._items[key] = tile
        self._bytes += tile.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, old = self._items.popitem(last=False)
            self._bytes -= old.nbytes

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


class TiffTiles:
    """The OpenSlide levels that can be read directly, found and checked when a slide is opened."""

    def __init__(self, tiff, levels: dict[int, TiledLevel]) -> None:
        self._tiff = tiff
        self.levels = levels

    @classmethod
    def open(
        cls,
        path: str,
        level_dimensions: list[tuple[int, int]],
        level_downsamples: list[float],
        reference: Callable[[int, int, int, int, int], np.ndarray],
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> TiffTiles | None:
        """Map OpenSlide levels to tiled pages of the TIFF at ``path``; ``None`` when none can be served.

        ``reference(x0, y0, level, w, h)`` is OpenSlide's own read; each mapped level is probed against it.
        """
        import tifffile

        try:
            tiff = tifffile.TiffFile(path)
        except Exception:  # not a TIFF (MIRAX, NDPI variants, DICOM WSI...): OpenSlide alone reads it
            return None
        try:
            levels = cls._match(tiff, level_dimensions, level_downsamples, reference, _TileCache(cache_bytes))
        except Exception:
            levels = {}
        if not levels:
            tiff.close()
            return None
        return cls(tiff, levels)

    @staticmethod
    def _match(tiff, level_dimensions, level_downsamples, reference, cache: _TileCache) -> dict[int, TiledLevel]:
        pages = {}
        for page in tiff.pages:
            if TiledLevel.supported(page):
                pages.setdefault((int(page.imagewidth), int(page.imagelength)), page)
        levels = {}
        for i, dims in enumerate(level_dimensions):
            page = pages.get(tuple(dims))
            if page is None:
                continue
            level = TiledLevel(page, cache)
            # Probe a window straddling tile boundaries near the middle, where there is likely tissue.
            w, h = min(level.width, 160), min(level.height, 160)
            px = max(0, min(level.width - w, level.width // 2 - level.tile_w // 2 - 7))
            py = max(0, min(level.height - h, level.height // 2 - level.tile_h // 2 - 5))
            x0, y0 = round(px * level_downsamples[i]), round(py * level_downsamples[i])
            if to_level(x0, level_downsamples[i]) != px or to_level(y0, level_downsamples[i]) != py:
                continue
            if _close(level.read(px, py, w, h), reference(x0, y0, i, w, h)):
                levels[i] = level
        cache.clear()
        return levels

    def close(self) -> None:
        self._tiff.close()


def to_level(v0: int, downsample: float) -> int | None:
    """Level pixel of level-0 coordinate ``v0`` when it falls exactly on one (else OpenSlide resamples)."""
    v = v0 / downsample
    return round(v) if abs(v - round(v)) < 1e-9 else None


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= PROBE_MAX_DIFF
