"""Tile grids over a slide (pure, static maths; coordinates in level-0 pixels)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ingest.tissue import tissue_fraction


@dataclass(frozen=True)
class Tile:
    """A tile at ``(x, y)`` level-0 pixels covering ``size0`` level-0 pixels square."""

    x: int
    y: int
    size0: int
    tissue: float


def tile_origins(width: int, height: int, size: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Top-left corners of full tiles of ``size`` px every ``stride`` px inside ``width x height``."""
    stride = stride or size
    if size <= 0 or stride <= 0:
        raise ValueError(f"tile size and stride must be positive, got size={size} stride={stride}")
    if width < size or height < size:
        return []
    return [(x, y) for y in range(0, height - size + 1, stride) for x in range(0, width - size + 1, stride)]


def grid_size(width: int, height: int, size: int, stride: int | None = None) -> int:
    """How many tiles :func:`tile_origins` gives, without listing them (a 64k slide's grid, before the mask)."""
    stride = stride or size
    if width < size or height < size:
        return 0
    return ((width - size) // stride + 1) * ((height - size) // stride + 1)


def tissue_tiles(
    mask: np.ndarray,
    mask_downsample: float,
    width0: int,
    height0: int,
    size0: int,
    stride0: int | None,
    threshold: float,
) -> list[Tile]:
    """Tiles of ``size0`` level-0 px whose tissue fraction in ``mask`` is at least ``threshold``.

    Args:
        mask: boolean tissue mask of the whole slide at a low-resolution level.
        mask_downsample: level-0 pixels per mask pixel.
        width0, height0: slide size at level 0.
        size0, stride0: tile size and stride in level-0 pixels.
        threshold: minimum tissue fraction in [0, 1].
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"tissue threshold must be in [0, 1], got {threshold}")
    out = []
    for x, y in tile_origins(width0, height0, size0, stride0):
        d = mask_downsample
        frac = tissue_fraction(mask, x / d, y / d, (x + size0) / d, (y + size0) / d)
        if frac >= threshold and frac > 0:
            out.append(Tile(x, y, size0, round(frac, 4)))
    return out
