"""Slide readers: OpenSlide for files, an in-memory reader for tests (same interface, as MONAI/TIAToolbox)."""

from __future__ import annotations

import errno
import os
from typing import Protocol

import numpy as np

from ingest.tiff_tiles import PAGE_LEVEL_VENDORS, TiffTiles, to_level


class SlideError(RuntimeError):
    """A slide could not be opened or read; the message says why (never the file's name)."""


class StrippedTiff(SlideError):
    """OpenSlide would not open the slide because it is a TIFF in strips (:data:`STRIPPED`), which
    :func:`open_slide` reads through :class:`~ingest.strip_tiff.StripTiffReader`."""


class SlideReader(Protocol):
    """What tiling needs from a slide: level geometry, MPP and region reads (level-0 coordinates)."""

    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: float | None
    objective_power: float | None

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB ``uint8[height, width, 3]`` at ``level``, top-left at level-0 ``(x, y)``."""
        ...

    def read_level(self, level: int) -> np.ndarray:
        """The whole of a (low-resolution) level as RGB ``uint8[H, W, 3]``."""
        ...

    def icc_profile(self) -> bytes | None:
        """The slide's embedded ICC colour profile as stored (None: it has none; :mod:`ingest.colour`)."""
        ...

    def close(self) -> None: ...


def _flatten_rgba(rgba: np.ndarray) -> np.ndarray:
    """RGBA with transparent (outside-scan) areas to RGB on white, as slide viewers show them."""
    if rgba.shape[2] == 3:
        return rgba
    if rgba[:, :, 3].min() == 255:  # fully scanned region: no blend needed (the common, hot case)
        return rgba[:, :, :3]
    rgb = rgba[:, :, :3].astype(np.float32)
    a = rgba[:, :, 3:4].astype(np.float32) / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


STRIPPED = (
    "a TIFF stored in strips, not tiles, which OpenSlide does not read (its generic TIFF is tiled); a tiled pyramid "
    "of it is: `vips tiffsave SRC DST --tile --pyramid --compression jpeg`"
)


BIG_ENDIAN = (
    "a TIFF in big-endian byte order (MM), whose header OpenSlide 4.0 misreads (it reads the first directory's "
    "offset as 8 bytes and keeps the low 4, for Hamamatsu's NDPI); the same file little-endian is read: "
    "`tiffcp -L SRC DST` keeps its tiles and levels"
)


def not_recognised(path: str) -> str:
    """Why OpenSlide would not open ``path``: a TIFF in strips, or a tiled classic TIFF in big-endian order, which
    it does not read, said with how to mend it; anything else damaged or not a slide, as a cut-short copy and a foreign
    file are alike to it."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.pages[0].is_tiled:  # Tessera reads these itself (ingest.strip_tiff), in either byte order
                return STRIPPED
            if tif.byteorder == ">" and not tif.is_bigtiff:
                return BIG_ENDIAN
    except Exception:  # not a TIFF, or one cut short: OpenSlide's word below
        pass
    return "OpenSlide does not recognise the file (damaged, or not a slide)"


class OpenSlideReader:
    """:class:`SlideReader` over OpenSlide (SVS, tiled TIFF, NDPI, MRXS, DICOM WSI, ...)."""

    def __init__(self, path: str, fast: bool = True) -> None:
        import openslide

        if not os.path.exists(path):  # else OpenSlide calls it an unknown format
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        self._path = path
        try:
            self._slide = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError as exc:
            # A cut-short slide is as unidentifiable as a foreign file: both are slides that cannot be used.
            why = not_recognised(path)
            raise (StrippedTiff if why == STRIPPED else SlideError)(why) from exc
        except openslide.OpenSlideError as exc:
            raise SlideError(f"OpenSlide could not open the file: {exc}") from exc
        self.level_dimensions = list(self._slide.level_dimensions)
        self.level_downsamples = [float(d) for d in self._slide.level_downsamples]
        props = self._slide.properties
        mpp = props.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        power = props.get("openslide.objective-power")
        self.objective_power = float(power) if power else None
        # Tiled TIFF/SVS levels are read straight from their tiles when a probe matches OpenSlide's pixels.
        direct = fast and props.get("openslide.vendor") in PAGE_LEVEL_VENDORS
        self._tiles = (
            TiffTiles.open(path, self.level_dimensions, self.level_downsamples, self._openslide_read)
            if direct
            else None
        )

    @property
    def direct_levels(self) -> list[int]:
        """Levels served by the direct tile path (the rest go through OpenSlide)."""
        return sorted(self._tiles.levels) if self._tiles else []

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        direct = self._tiles.levels.get(level) if self._tiles else None
        if direct is not None:
            lx, ly = to_level(x, self.level_downsamples[level]), to_level(y, self.level_downsamples[level])
            if lx is not None and ly is not None:
                try:
                    return direct.read(lx, ly, width, height)
                except Exception:  # a tile it cannot decode, or one cut short: OpenSlide reads it or says why
                    pass
        return self._openslide_read(x, y, level, width, height)

    def _openslide_read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        import openslide

        try:
            region = self._slide.read_region((x, y), level, (width, height))
        except openslide.OpenSlideError as exc:
            # OpenSlide refuses every later call on a handle that met an error: a fresh one reads the slide's other
            # tiles, so that one damaged tile costs its own reads only (ingest.wsi.read_tiles leaves it out).
            self._slide.close()
            self._slide = openslide.OpenSlide(self._path)
            raise SlideError(f"read failed at ({x}, {y}) level {level}: {exc}") from exc
        return _flatten_rgba(np.asarray(region))

    def read_level(self, level: int) -> np.ndarray:
        w, h = self.level_dimensions[level]
        return self.read_region(0, 0, level, w, h)

    def icc_profile(self) -> bytes | None:
        import openslide
        from openslide import lowlevel

        if "openslide.icc-size" not in self._slide.properties:  # OpenSlide 4 names its size where there is one
            return None
        try:  # the bytes as stored (OpenSlide.color_profile would parse them first)
            return lowlevel.read_icc_profile(self._slide._osr)
        except openslide.OpenSlideError as exc:
            self._slide.close()  # OpenSlide refuses every later call on a handle that met an error
            self._slide = openslide.OpenSlide(self._path)
            raise SlideError(f"its ICC profile could not be read: {exc}") from exc

    def close(self) -> None:
        if self._tiles:
            self._tiles.close()
        self._slide.close()


def open_slide(path: str, fast: bool = True) -> SlideReader:
    """The slide at ``path``: through OpenSlide, or a TIFF in strips, which OpenSlide does not read, through
    :class:`~ingest.strip_tiff.StripTiffReader`."""
    try:
        return OpenSlideReader(path, fast)
    except StrippedTiff:
        pass
    from ingest.strip_tiff import StripTiffReader

    return StripTiffReader(path)


class ArraySlideReader:
    """:class:`SlideReader` over an in-memory level-0 array, with power-of-two levels made by striding."""

    def __init__(
        self, level0: np.ndarray, levels: int = 3, mpp: float | None = 0.5, icc_profile: bytes | None = None
    ) -> None:
        self._levels = [level0[:: 2**i, :: 2**i] for i in range(levels)]
        self._icc = icc_profile
        self.level_dimensions = [(a.shape[1], a.shape[0]) for a in self._levels]
        self.level_downsamples = [float(2**i) for i in range(levels)]
        self.mpp = mpp
        self.objective_power = 20.0 if mpp else None
        self.reads: list[tuple[int, int, int, int, int]] = []

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        self.reads.append((x, y, level, width, height))
        d = int(self.level_downsamples[level])
        arr = self._levels[level]
        out = np.full((height, width, 3), 255, np.uint8)
        patch = arr[y // d : y // d + height, x // d : x // d + width]
        out[: patch.shape[0], : patch.shape[1]] = patch
        return out

    def read_level(self, level: int) -> np.ndarray:
        return self._levels[level].copy()

    def icc_profile(self) -> bytes | None:
        return self._icc

    def close(self) -> None:
        pass
