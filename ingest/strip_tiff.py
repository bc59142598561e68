"""Slides in TIFFs stored in strips (an export of ImageJ, a microscope's software, libtiff's default), which OpenSlide
does not read (its generic TIFF is tiled): Tessera reads them itself, level 0 alone.

A region is assembled from the strips it crosses. An uncompressed file is mapped into memory; compressed strips are
decoded on demand into a byte-bounded LRU (:class:`ingest.tiff_tiles._TileCache`), so that a row of tiles decodes
its strips once and a worker's memory does not grow with the slide. With a single level, the tissue mask is read
from level 0 in blocks (:func:`ingest.wsi.read_mask_image`).
"""

from __future__ import annotations

import numpy as np

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


class StripTiffReader:
    """:class:`~ingest.slides.SlideReader` over the first page of a TIFF stored in strips: 8-bit grey, RGB or RGBA
    samples stored together, in any compression tifffile decodes."""

    def __init__(self, path: str, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        try:
            page = self._tif.pages[0]
            spp = int(page.samplesperpixel)
            if page.is_tiled or np.dtype(page.dtype) != np.uint8 or spp not in (1, 3, 4):
                raise _refused(f"of {np.dtype(page.dtype).name} samples, {spp} a pixel")
            if spp > 1 and page.planarconfig != 1:
                raise _refused("with its colours stored in separate planes")
            self.width, self.height, self._rows = int(page.imagewidth), int(page.imagelength), int(page.rowsperstrip)
            self._map = (
                tifffile.memmap(path, page=0, mode="r") if page.compression == 1 and page.is_contiguous else None
            )
            strip_bytes = self._rows * self.width * spp
            if self._map is None and strip_bytes > MAX_STRIP_BYTES:
                raise _refused(f"of {self._rows} rows each, compressed ({strip_bytes >> 20} MB a strip)")
        except Exception:
            self._tif.close()
            raise
        self._page, self._spp, self._cache = page, spp, _TileCache(cache_bytes)
        self._kwargs = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader} if page.compression == 7 else {}
        self._scans = PageScans(page.jpegtables) if page.compression == 7 else None
        self.level_dimensions = [(self.width, self.height)]
        self.level_downsamples = [1.0]
        self.mpp = tiff_mpp(page)
        self.objective_power = None
        icc = page.tags.get("InterColorProfile")  # tag 34675
        self._icc = bytes(icc.value) if icc is not None else None

    def icc_profile(self) -> bytes | None:
        return self._icc

    def _strip(self, i: int) -> np.ndarray:
        """Rows ``[i * rows, (i + 1) * rows)`` of the image as ``uint8[rows, width, samples]``."""
        hit = self._cache.get((0, i))
        if hit is not None:
            return hit
        fh = self._tif.filehandle
        fh.seek(self._page.dataoffsets[i])
        data = fh.read(self._page.databytecounts[i])
        # libjpeg-turbo decodes a JPEG strip cut short, or with a marker amid its scan, into wrong rows without a word
        # (a damaged strip: its tiles are left out, as below)
        if self._scans is not None and self._scans.clean(data) is False:
            raise SlideError(
                f"strip {i} could not be decoded: its JPEG stream is cut short, or has a marker amid its scan"
            )
        try:
            segment, _, _ = self._page.decode(data, i, **self._kwargs)
        except Exception as exc:  # a damaged strip: its tiles are left out (ingest.wsi.read_tiles)
            raise SlideError(f"strip {i} could not be decoded: {exc}") from exc
        rows = min(self._rows, self.height - i * self._rows)
        strip = np.asarray(segment).reshape(-1, self.width, self._spp)[:rows]
        self._cache.put((0, i), strip)
        return strip

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        if level != 0:
            raise SlideError(f"a TIFF in strips has level 0 alone, not {level}")
        out = np.full((height, width, self._spp if self._spp != 1 else 1), 255, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, self.width), min(y + height, self.height)
        if x0 < x1 and y0 < y1 and self._map is not None:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = self._map[y0:y1, x0:x1].reshape(y1 - y0, x1 - x0, -1)
        elif x0 < x1 and y0 < y1:
            for i in range(y0 // self._rows, (y1 - 1) // self._rows + 1):
                top = i * self._rows
                strip = self._strip(i)
                a, b = max(y0, top), min(y1, top + strip.shape[0])
                out[a - y : b - y, x0 - x : x1 - x] = strip[a - top : b - top, x0:x1]
        if self._spp == 1:
            return np.repeat(out, 3, axis=2)
        return _flatten_rgba(out)

    def reduced(self, k: int) -> np.ndarray:
        """Level 0 averaged over ``k`` x ``k`` blocks as :func:`ingest.wsi.block_mean` gives it, in one pass down
        the strips (``k`` rows of the whole width at a time): a mask read in square blocks would decode each strip
        once per block across."""
        from ingest.wsi import block_mean

        rows = -(-self.height // k)
        out = np.empty((rows, -(-self.width // k), 3), np.uint8)
        for r in range(rows):
            out[r] = block_mean(self.read_region(0, r * k, 0, self.width, k), k)[0]
        return out

    def read_level(self, level: int) -> np.ndarray:
        return self.read_region(0, 0, level, self.width, self.height)

    def close(self) -> None:
        self._cache.clear()
        self._tif.close()
