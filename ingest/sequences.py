"""Which slices of a series make one sample (pure): neighbours, the centre block, or T slices along it."""

from __future__ import annotations

import numpy as np


def neighbour_indices(i: int, n: int, k: int) -> list[int]:
    """Slice ``i`` with ``k`` neighbours each side, clamped at the ends (edge slices repeat)."""
    if not 0 <= i < n:
        raise ValueError(f"slice {i} outside a series of {n}")
    return [min(max(i + d, 0), n - 1) for d in range(-k, k + 1)]


def center_indices(n: int, k: int) -> list[int]:
    """The middle slice and ``k`` each side (RSNA paper: 5), clamped for short series."""
    return neighbour_indices((n - 1) // 2, n, k)


def even_indices(n: int, frames: int) -> list[int]:
    """``frames`` slices spread evenly from first to last (nearest slice; short series repeat slices)."""
    if n < 1 or frames < 1:
        raise ValueError("need at least one slice and one frame")
    return [int(v) for v in np.rint(np.linspace(0, n - 1, frames))]
