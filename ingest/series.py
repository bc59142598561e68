"""Series geometry: order slices along the slice normal (pure)."""

from __future__ import annotations

import numpy as np


def slice_normal(orientation: list[float]) -> np.ndarray:
    """Unit normal of ``ImageOrientationPatient`` (row cosines x column cosines)."""
    if len(orientation) != 6:
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {len(orientation)}")
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    n = np.cross(row, col)
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise ValueError("ImageOrientationPatient row and column vectors are parallel")
    return n / norm


def order_slices(
    positions: list[list[float] | None], orientation: list[float] | None, instance_numbers: list[int | None]
) -> tuple[list[int], list[str]]:
    """Indices that sort slices along the normal, and warnings.

    Falls back to ``InstanceNumber`` (with a warning) when a position or the orientation is missing.
    Warns on duplicate positions and on uneven spacing (more than 10 % from the median).
    """
    n = len(positions)
    if orientation is None or any(p is None for p in positions):
        inst = [i if i is not None else 0 for i in instance_numbers]
        return sorted(range(n), key=lambda k: (inst[k], k)), ["no slice positions; ordered by InstanceNumber"]
    normal = slice_normal(orientation)
    dist = np.array([float(np.dot(normal, np.asarray(p, float))) for p in positions])
    order = sorted(range(n), key=lambda k: (dist[k], k))
    warnings: list[str] = []
    gaps = np.diff(dist[order])
    if n > 1 and np.any(np.abs(gaps) < 1e-4):
        warnings.append("duplicate slice positions")
    nz = gaps[np.abs(gaps) >= 1e-4]
    if nz.size > 1:
        med = float(np.median(nz))
        if np.any(np.abs(nz - med) > 0.1 * abs(med)):
            warnings.append("uneven slice spacing (gaps or missing slices)")
    return order, warnings
