"""Slides in TIFFs stored in strips (an export of ImageJ, a microscope's software, libtiff's default), which OpenSlide
does not read (its generic TIFF is tiled): Tessera reads them itself, with the reduced-resolution images a pyramid
of them holds (pages marked reduced, or SubIFDs, as tifffile finds them) as its levels.

A region is assembled from the strips it crosses. An uncompressed page is mapped into memory; compressed strips are
decoded on demand into a byte-bounded LRU (:class:`ingest.tiff_tiles._TileCache`), so that a row of tiles decodes
its strips once and a worker's memory does not grow with the slide. The tissue mask is read in one pass down a
level's strips (:meth:`StripTiffReader.reduced`): a low level where the pyramid has one, level 0 otherwise.
"""

from __future__ import annotations

import numpy as np

from ingest.jpeg_decode import StrictJpeg
from ingest.jpeg_scan import PageScans
from ingest.slides import SlideError, _flatten_rgba
from ingest.tiff_tiles import DEFAULT_CACHE_BYTES, _TileCache

# A compressed strip decoded to more than this (one strip of a whole large image) is refused: reading any region
# would decode all of it.
MAX_STRIP_BYTES = 64 << 20
TIFF_TO_UM = {2: 25400.0, 3: 10000.0}  # ResolutionUnit inch, centimetre: µm per unit


def _refused(why: str) -> SlideError:
    return SlideError(
        f"a TIFF in strips {why}, which Tessera does not read (OpenSlide reads tiled TIFFs only): a tiled pyramid "
        "of it is read: `vips tiffsave SRC DST --tile --pyramid --compression jpeg`"
    )


def tiff_mpp(page) -> float | None:
    """µm per pixel from a page's XResolution and ResolutionUnit (inch or centimetre), else None."""
    res, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if res is None or unit is None or int(unit.value) not in TIFF_TO_UM:
        return None
    num, den = res.value if isinstance(res.value, tuple) else (res.value, 1)
    return TIFF_TO_UM[int(unit.value)] * den / num if num and den else None


class _Strips:
    """One page stored in strips: regions in its own pixels, white outside."""

    def __init__(self, path: str, page, cache: _TileCache, level: int) -> None:
        spp = int(page.samplesperpixel)
        if page.is_tiled or np.dtype(page.dtype) != np.uint8 or spp not in (1, 3, 4):
            raise _refused(f"of {np.dtype(page.dtype).name} samples, {spp} a pixel")
        if spp > 1 and page.planarconfig != 1:
            raise _refused("with its colours stored in separate planes")
        self.width, self.height, self._rows = int(page.imagewidth), int(page.imagelength), int(page.rowsperstrip)
        self.spp, self._page, self._cache, self._level = spp, page, cache, level
        shape = (self.height, self.width, spp)
        contiguous = page.compression == 1 and page.is_contiguous
        self._map = np.memmap(path, np.uint8, "r", int(page.dataoffsets[0]), shape) if contiguous else None
        strip_bytes = self._rows * self.width * spp
        if self._map is None and strip_bytes > MAX_STRIP_BYTES:
            raise _refused(f"of {self._rows} rows each, compressed ({strip_bytes >> 20} MB a strip)")
        self._kwargs = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader} if page.compression == 7 else {}
        self._strict = StrictJpeg.of(page)  # libjpeg-turbo's warnings as errors; else its scan checked, as below
        self._scans = PageScans(page.jpegtables) if page.compression == 7 and self._strict is None else None

    def _strip(self, i: int) -> np.ndarray:
        """Rows ``[i * rows, (i + 1) * rows)`` of the page as ``uint8[rows, width, samples]``."""
        hit = self._cache.get((self._level, i))
        if hit is not None:
            return hit
        fh = self._page.parent.filehandle
        fh.seek(self._page.dataoffsets[i])
        data = fh.read(self._page.databytecounts[i])
        # tifffile's libjpeg-turbo decodes a JPEG strip cut short, or with a marker amid its scan, into wrong rows
        # with a warning no caller sees (a damaged strip: its tiles are left out, as below)
        if self._scans is not None and self._scans.clean(data) is False:
            raise SlideError(
                f"strip {i} could not be decoded: its JPEG stream is cut short, or has a marker amid its scan"
            )
        try:
            segment = self._strict.decode(data) if self._strict else self._page.decode(data, i, **self._kwargs)[0]
        except Exception as exc:  # a damaged strip: its tiles are left out (ingest.wsi.read_tiles)
            raise SlideError(f"strip {i} could not be decoded: {exc}") from exc
        rows = min(self._rows, self.height - i * self._rows)
        strip = np.asarray(segment).reshape(-1, self.width, self.spp)[:rows]
        self._cache.put((self._level, i), strip)
        return strip

    def read(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """``uint8[height, width, samples]`` with top-left at ``(x, y)`` of this page."""
        out = np.full((height, width, self.spp), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, self.width), min(y + height, self.height)
        if x0 < x1 and y0 < y1 and self._map is not None:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._map[y0:y1, x0:x1]
        elif x0 < x1 and y0 < y1:
            for i in range(y0 // self._rows, (y1 - 1) // self._rows + 1):
                top = i * self._rows
                strip = self._strip(i)
                a, b = max(y0, top), min(y1, top + strip.shape[0])
                out[a - y : b - y, x0 - x : x1 - x] = strip[a - top : b - top, x0:x1]
        return out


class StripTiffReader:
    """:class:`~ingest.slides.SlideReader` over a TIFF stored in strips: 8-bit grey, RGB or RGBA samples stored
    together, in any compression tifffile decodes; its level 0 the first page, its other levels the pyramid's
    reduced images stored alike (one stored otherwise is passed over)."""

    def __init__(self, path: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        self._cache = _TileCache(cache_bytes)
        try:
            page = self._tif.pages[0]
            self._levels = [_Strips(path, page, self._cache, 0)]
            self._levels += _reduced_levels(path, self._tif, self._levels[0], self._cache)
        except Exception:
            self._tif.close()
            raise
        self.width, self.height = self._levels[0].width, self._levels[0].height
        self.level_dimensions = [(lv.width, lv.height) for lv in self._levels]
        # as OpenSlide gives them: the mean of the two sides' ratios
        self.level_downsamples = [(self.width / w + self.height / h) / 2 for w, h in self.level_dimensions]
        self.mpp = tiff_mpp(page)
        self.objective_power = None
        icc = page.tags.get("InterColorProfile")  # tag 34675
        self._icc = bytes(icc.value) if icc is not None else None

    def icc_profile(self) -> bytes | None:
        return self._icc

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB ``uint8[height, width, 3]`` of ``level`` with top-left at level-0 pixel ``(x, y)``."""
        if not 0 <= level < len(self._levels):
            raise SlideError(f"this TIFF in strips has {len(self._levels)} level(s), not level {level}")
        ds = self.level_downsamples[level]
        return _rgb(self._levels[level].read(round(x / ds), round(y / ds), width, height))

    def reduced(self, level: int, k: int) -> np.ndarray:
        """``level`` averaged over ``k`` x ``k`` blocks as :func:`ingest.wsi.block_mean` gives it, in one pass down
        its strips (``k`` rows of the whole width at a time): a mask read in square blocks would decode each strip
        once per block across."""
        from ingest.wsi import block_mean

        strips = self._levels[level]
        out = np.empty((-(-strips.height // k), -(-strips.width // k), 3), np.uint8)
        for r in range(out.shape[0]):
            out[r] = block_mean(_rgb(strips.read(0, r * k, strips.width, k)), k)[0]
        return out

    def read_level(self, level: int) -> np.ndarray:
        w, h = self.level_dimensions[level]
        return self.read_region(0, 0, level, w, h)

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()


def _rgb(samples: np.ndarray) -> np.ndarray:
    """Grey, RGB or RGBA samples as RGB (RGBA on white)."""
    return np.repeat(samples, 3, axis=2) if samples.shape[2] == 1 else _flatten_rgba(samples)


def _reduced_levels(path: str, tif, base: _Strips, cache: _TileCache) -> list[_Strips]:
    """The pyramid's reduced images after ``base`` (tifffile's levels of the first series), each smaller than the
    last and stored as ``base`` is; one that is not is passed over, and a slide without them has level 0 alone."""
    try:
        levels = tif.series[0].levels[1:]
    except Exception:  # a series tifffile cannot make out: level 0 alone, as before
        return []
    out: list[_Strips] = []
    for level in levels:
        page = level.pages[0] if level.pages else None
        last = out[-1] if out else base
        if page is None or not (int(page.imagewidth) < last.width and int(page.imagelength) < last.height):
            continue
        try:
            strips = _Strips(path, page, cache, len(out) + 1)
        except SlideError:
            continue
        if strips.spp == base.spp:
            out.append(strips)
    return out
