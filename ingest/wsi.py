"""From a slide to tissue tiles: level choice, mask, grid and region reads (thin over pure helpers)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from ingest.colour import lookup, srgb_lut, usable_profile
from ingest.ink import ink_mask, without_ink
from ingest.slides import SlideError, SlideReader
from ingest.tiling import Tile, tissue_tiles
from ingest.tissue import tissue_fraction, tissue_mask
from shards.schema import scale_ratio

# Longest side of the level the tissue mask is computed on (the smallest level at least this large): enough to
# resolve a 600 px tile on a 64k slide at ~10 mask pixels a side, small enough to stay cheap.
MASK_TARGET_PX = 1024
# The mask image's longest side at most: a larger mask level (a slide without a pyramid, or with few levels) is read
# in blocks of at most READ_BLOCK_PX a side, each averaged down, so a worker's memory does not grow with the slide.
# A tile far coarser than the level it is read from (a low --mpp without a matching level) is read the same way.
MASK_MAX_PX = 4096
READ_BLOCK_PX = 4096


@dataclass(frozen=True)
class TilePlan:
    """How a slide will be tiled: read ``level``, tiles of ``size0`` level-0 px, and the kept tiles."""

    level: int
    target_downsample: float
    size0: int
    mpp: float | None
    thumb: np.ndarray | None
    mask: np.ndarray | None
    mask_downsample: float
    tiles: list[Tile]
    warnings: list[str]
    preview_scale: float | None = None  # preview px per level-0 px, once the preview is drawn (ingest.preview)
    ink: np.ndarray | None = None  # pen marks found on the mask's image (ingest.ink), where they were looked for
    unread: list[tuple[int, int, int, int]] = field(default_factory=list)  # (x, y, w, h) of the mask's image
    # that could not be read (damaged; taken as background)
    srgb: bool = False  # its pixels converted to sRGB from its ICC profile (ingest.colour), the tiles' as the mask's


def choose_level(downsamples: list[float], target: float) -> int:
    """Index of the coarsest level whose downsample does not exceed ``target`` (read there, then resize)."""
    if target < 1.0:
        raise ValueError(f"target downsample must be >= 1, got {target}")
    best = 0
    for i, d in enumerate(downsamples):
        if d <= target * (1 + 1e-6):
            best = i if d >= downsamples[best] else best
    return best


def mask_level(dimensions: list[tuple[int, int]]) -> int:
    """The smallest level whose longest side is at least :data:`MASK_TARGET_PX` (else the largest level)."""
    for i in range(len(dimensions) - 1, -1, -1):
        if max(dimensions[i]) >= MASK_TARGET_PX:
            return i
    return 0


def block_mean(rgb: np.ndarray, k: int) -> np.ndarray:
    """``rgb`` averaged over ``k`` x ``k`` blocks; a partial block at the right or bottom edge is padded with white
    (background), so output pixel ``(i, j)`` covers input ``[i*k, (i+1)*k) x [j*k, (j+1)*k)`` exactly."""
    h, w = rgb.shape[:2]
    oh, ow = math.ceil(h / k), math.ceil(w / k)
    if (oh * k, ow * k) != (h, w):
        rgb = cv2.copyMakeBorder(rgb, 0, oh * k - h, 0, ow * k - w, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    return cv2.resize(rgb, (ow, oh), interpolation=cv2.INTER_AREA)  # an integer factor: the exact block mean


def read_reduced(
    reader: SlideReader,
    x0: int,
    y0: int,
    level: int,
    width: int,
    height: int,
    k: int,
    block: int | None = None,
    damaged: list[tuple[tuple[int, int, int, int], SlideError]] | None = None,
) -> np.ndarray:
    """``width`` x ``height`` pixels of ``level`` from level-0 ``(x0, y0)``, averaged over ``k`` x ``k`` blocks
    (:func:`block_mean`), read in blocks of at most ``block`` (:data:`READ_BLOCK_PX`) px a side so that memory
    stays bounded. A block that cannot be read is left white and its place in the output (x, y, w, h) and error
    added to ``damaged``, where that list is given; else it raises."""
    ds = reader.level_downsamples[level]
    step = max(1, (block or READ_BLOCK_PX) // k) * k  # a whole number of output pixels per block
    out = np.full((math.ceil(height / k), math.ceil(width / k), 3), 255, np.uint8)
    for by in range(0, height, step):
        for bx in range(0, width, step):
            bw, bh = min(step, width - bx), min(step, height - by)
            try:
                region = reader.read_region(x0 + round(bx * ds), y0 + round(by * ds), level, bw, bh)
            except SlideError as exc:
                if damaged is None:
                    raise
                damaged.append(((bx // k, by // k, math.ceil(bw / k), math.ceil(bh / k)), exc))
                continue
            small = block_mean(region, k)
            out[by // k : by // k + small.shape[0], bx // k : bx // k + small.shape[1]] = small
    return out


def read_mask_image(reader: SlideReader, level: int) -> tuple[np.ndarray, float]:
    """The image the tissue mask is computed on, and its level-0 pixels per pixel.

    ``level`` whole when its longest side is at most :data:`MASK_MAX_PX`; else averaged down by the smallest
    integer factor that brings it there (:func:`read_reduced`).
    """
    w, h = reader.level_dimensions[level]
    ds = reader.level_downsamples[level]
    k = math.ceil(max(w, h) / MASK_MAX_PX)
    if k == 1:
        return reader.read_level(level), ds
    if hasattr(reader, "reduced"):  # a TIFF in strips: one pass down the level's strips
        return reader.reduced(level, k), ds * k
    return read_reduced(reader, 0, 0, level, w, h, k), ds * k


# Side of the pieces, in output pixels, a mask level with a damaged tile is read in: a damaged source tile whites
# out about one piece's area of the mask (source tiles are 240-512 px).
MASK_PIECE_PX = 256


def read_mask_in_pieces(
    reader: SlideReader, level: int
) -> tuple[np.ndarray, float, str | None, list[tuple[int, int, int, int]]]:
    """:func:`read_mask_image` read in pieces of :data:`MASK_PIECE_PX` px, each that cannot be read left white (no
    tissue), a warning saying how many (None where every piece was read) and where they are (x, y, w, h of the
    image, for the preview): a damaged tile of the level costs the tissue under it, not the slide."""
    w, h = reader.level_dimensions[level]
    k = math.ceil(max(w, h) / MASK_MAX_PX)
    bad: list[tuple[tuple[int, int, int, int], SlideError]] = []
    out = read_reduced(reader, 0, 0, level, w, h, k, MASK_PIECE_PX * k, bad)
    pieces = math.ceil(w / (MASK_PIECE_PX * k)) * math.ceil(h / (MASK_PIECE_PX * k))
    note = bad and (
        f"{len(bad)} of {pieces} parts of the level the tissue mask is read from could not be read (damaged): "
        f"taken as background, no tile is cut there (crossed out on the preview): {bad[0][1]}"
    )
    return out, reader.level_downsamples[level] * k, note or None, [box for box, _ in bad]


def target_downsample(
    slide_mpp: float | None, slide_power: float | None, mpp: float | None, magnification: float | None
) -> tuple[float, list[str]]:
    """Level-0 pixels per output pixel for the requested ``mpp`` or ``magnification``, and warnings.

    Unknown slide metadata means level 0 (downsample 1) with a warning; requests finer than level 0 are
    clamped to level 0 (never upsampled), with a warning where it is more than :data:`COARSER` coarser: its tiles
    show more specimen than the others'.
    """
    if mpp is not None and magnification is not None:
        raise ValueError("give --mpp or --magnification, not both")
    if mpp is not None:
        if slide_mpp is None:
            return 1.0, ["slide has no MPP metadata; tiled at level 0"]
        return max(1.0, mpp / slide_mpp), _coarser(slide_mpp / mpp, f"{slide_mpp:.3g} µm/px", f"--mpp {mpp:g}")
    if magnification is not None:
        if slide_power is None:
            return 1.0, ["slide has no objective power; tiled at level 0"]
        return max(1.0, slide_power / magnification), _coarser(
            magnification / slide_power, f"{slide_power:g}x", f"--magnification {magnification:g}"
        )
    return 1.0, []


COARSER = 1.1  # a scan this much coarser than asked is said (0.2525 µm/px for 0.25 is not)
# µm per level-0 pixel that a slide scanner's image can have (a 100x oil objective gives 0.1, a 1.25x scan 8).
# OpenSlide derives a generic TIFF's MPP from its resolution tags, and many writers leave theirs at a default of
# 72 or 96 dots per inch: 353 or 265 µm/px, which would be taken as the scan's.
SCANNER_MPP = (0.02, 50.0)
SCANNER_POWER = (0.5, 200.0)  # objective magnifications (1.25x to 100x), where a header's 0 means unknown


def scanned_scale(mpp: float | None, power: float | None) -> tuple[float | None, float | None, list[str]]:
    """The slide's level-0 ``mpp`` and objective ``power`` where a scanner could have made them (:data:`SCANNER_MPP`,
    :data:`SCANNER_POWER`); else None (unknown) and a warning. Tiles cut at ``--mpp`` by a 72 dpi default came from
    level 0 as if it were 700 times coarser than asked, each recording that figure as its scale; a power of 0
    failed the slide with a division by zero."""
    warnings = []
    if mpp is not None and not SCANNER_MPP[0] <= mpp <= SCANNER_MPP[1]:
        warnings.append(
            f"slide's MPP metadata ({mpp:.4g} µm/px) is no scanner's (a file's default resolution?): ignored"
        )
        mpp = None
    if power is not None and not SCANNER_POWER[0] <= power <= SCANNER_POWER[1]:
        warnings.append(f"slide's objective power ({power:g}x) is no scanner's: ignored")
        power = None
    return mpp, power, warnings


def _coarser(ratio: float, scanned: str, asked: str) -> list[str]:
    if ratio <= COARSER:
        return []
    return [f"scanned at {scanned}, coarser than {asked}: tiled at level 0, each tile {ratio:.3g}x as wide as asked"]


@dataclass(frozen=True)
class TileGeometry:
    """Where a slide's tiles come from, from its header alone: read ``level``, ``target_downsample`` level-0 px
    per output px, tiles of ``size0`` every ``stride0`` level-0 px (None: the size); ``mpp``: level 0's µm/px
    (None: unknown, or no scanner's: :func:`scanned_scale`)."""

    level: int
    target_downsample: float
    size0: int
    stride0: int | None
    warnings: list[str]
    mpp: float | None


def scale_mismatch(model_um: float | None, tile_um: float | None, tile_size: int) -> str | None:
    """A warning when tiles ``tile_um`` µm across (``tile_size`` px) are of another scale
    (:func:`shards.schema.scale_ratio`) than the ``model_um`` its background model was trained on: its calls on
    them can drop tissue. None where they agree or either is unknown. It names the ``--mpp`` that matches."""
    if (ratio := scale_ratio(model_um, tile_um)) is None:
        return None
    return (
        f"its tiles are {tile_um:.0f} µm across and the background model's training tiles were {model_um:.0f} µm "
        f"({ratio:.2g}x): its calls may be wrong at this scale (--mpp {model_um / tile_size:.3g} matches it)"
    )


def tile_geometry(
    reader: SlideReader, tile_size: int, mpp: float | None, stride: int | None, magnification: float | None = None
) -> TileGeometry:
    """The level and level-0 tile size for tiles of ``tile_size`` px at ``mpp`` or ``magnification`` (else level
    0), with the warnings of :func:`scanned_scale` and :func:`target_downsample`."""
    slide_mpp, power, warnings = scanned_scale(reader.mpp, reader.objective_power)
    target_ds, more = target_downsample(slide_mpp, power, mpp, magnification)
    level = choose_level(reader.level_downsamples, target_ds)
    stride0 = round(stride * target_ds) if stride else None
    return TileGeometry(level, target_ds, round(tile_size * target_ds), stride0, warnings + more, slide_mpp)


def plan_tiles(
    reader: SlideReader,
    tile_size: int,
    mpp: float | None,
    stride: int | None,
    threshold: float,
    magnification: float | None = None,
    inks: list[str] | tuple[str, ...] = (),
    ink_max: float = 0.05,
    colour: str = "ignore",
) -> TilePlan:
    """Tile plan for ``reader``: tiles of ``tile_size`` px at ``mpp`` or ``magnification`` (else level 0).

    ``inks`` (:data:`ingest.ink.INKS`): pen marks of these colours are not tissue, and a tile more than
    ``ink_max`` of whose area they cover is not cut, whatever tissue it holds (the pen is in its pixels).
    ``colour`` ``apply``: the slide's pixels are converted to sRGB from its ICC profile (:mod:`ingest.colour`),
    the mask's image as its tiles will be.
    """
    g = tile_geometry(reader, tile_size, mpp, stride, magnification)
    level, warnings, unread = mask_level(reader.level_dimensions), list(g.warnings), []
    try:
        thumb, mask_ds = read_mask_image(reader, level)
    except SlideError:  # a damaged tile failed the read of the whole level: read around it
        thumb, mask_ds, note, unread = read_mask_in_pieces(reader, level)
        warnings += [note] if note else []
    icc, note = usable_profile(reader, colour == "apply")
    warnings += [note] if note else []
    thumb = lookup(thumb, srgb_lut(icc)) if icc else thumb
    ink = ink_mask(thumb, inks) if inks else None
    inked = ink is not None and bool(ink.any())
    mask = tissue_mask(without_ink(thumb, ink) if inked else thumb)
    w0, h0 = reader.level_dimensions[0]
    tiles = tissue_tiles(mask, mask_ds, w0, h0, g.size0, g.stride0, threshold)
    if inked:
        d = mask_ds
        clean = [
            t
            for t in tiles
            if tissue_fraction(ink, t.x / d, t.y / d, (t.x + t.size0) / d, (t.y + t.size0) / d) <= ink_max
        ]
        warnings.append(
            f"pen marks over {ink.mean():.1%} of the slide's area, not taken for tissue; {len(tiles) - len(clean)} "
            f"tile(s) with tissue and more than {ink_max:.0%} ink not cut"
        )
        tiles = clean
    return TilePlan(
        g.level, g.target_downsample, g.size0, g.mpp, thumb, mask, mask_ds, tiles, warnings, ink=ink,
        unread=unread, srgb=icc is not None,
    )  # fmt: skip


def read_tiles(
    reader: SlideReader,
    plan: TilePlan,
    tile_size: int,
    store_size: int | None,
    damaged: list[tuple[Tile, SlideError]] | None = None,
) -> Iterator[tuple[Tile, np.ndarray]]:
    """Yield ``(tile, rgb[S, S, 3])`` for each planned tile; only kept tiles' pixels are read.

    A tile larger than :data:`READ_BLOCK_PX` at its level is read in blocks, each averaged down by the whole part
    of its reduction first (a partial last block is padded with white), then resized like any other. A tile the
    slide cannot give (a damaged source tile under it) is added to ``damaged`` with its error and left out, where
    that list is given: one bad tile of tens of thousands costs its own sample, not its slide's; else it raises.
    Tiles of a plan in sRGB (``plan.srgb``) are converted once at their stored size.
    """
    icc = usable_profile(reader, True)[0] if plan.srgb else None  # the profile the plan converted with
    if plan.srgb and icc is None:
        raise SlideError("its colour profile, used when it was planned, cannot be used now")
    lut = srgb_lut(icc) if icc else None
    ds = reader.level_downsamples[plan.level]
    read_px = round(plan.size0 / ds)
    out_px = store_size or tile_size
    k = max(1, read_px // out_px)
    for tile in plan.tiles:
        try:
            if read_px > READ_BLOCK_PX:
                rgb = read_reduced(reader, tile.x, tile.y, plan.level, read_px, read_px, k)
            else:
                rgb = reader.read_region(tile.x, tile.y, plan.level, read_px, read_px)
        except SlideError as exc:
            if damaged is None:
                raise
            damaged.append((tile, exc))
            continue
        if rgb.shape[0] != out_px:
            rgb = cv2.resize(rgb, (out_px, out_px), interpolation=cv2.INTER_AREA)
        yield tile, lookup(rgb, lut) if lut is not None else rgb


def damaged_note(damaged: list[tuple[Tile, SlideError]], planned: int, region: int, most: int = 5) -> str:
    """The warning a slide's ``region`` with tiles it could not read carries: how many of its ``planned``, where
    (level-0 x, y; the first ``most``) and the first one's error."""
    where = ", ".join(f"({t.x}, {t.y})" for t, _ in damaged[:most]) + (", ..." if len(damaged) > most else "")
    return (
        f"region {region}: {len(damaged)} of its {planned} tile(s) could not be read (damaged) and were left out "
        f"(crossed out on the preview), at {where}: {damaged[0][1]}"
    )
