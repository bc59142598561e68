"""Hounsfield units and CT display windows (pure)."""

from __future__ import annotations

import numpy as np

# (center, width) in HU; the RSNA paper stacks brain, subdural and soft tissue as RGB.
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "soft": (40.0, 380.0),
    "bone": (600.0, 2800.0),
}
DEFAULT_WINDOWS = ("brain", "subdural", "soft")


def to_hu(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored pixel values to Hounsfield units: ``pixels * slope + intercept`` as float32."""
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map HU in ``[center - width/2, center + width/2]`` linearly to uint8 0..255, clipping outside."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    lo = center - width / 2.0
    scaled = (hu - lo) * (255.0 / width)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def window_stack(hu: np.ndarray, names: tuple[str, ...] = DEFAULT_WINDOWS) -> np.ndarray:
    """Stack named windows of ``hu[H, W]`` as channels: ``uint8[H, W, len(names)]``."""
    unknown = [n for n in names if n not in WINDOWS]
    if unknown:
        raise ValueError(f"unknown window(s) {unknown}; known: {sorted(WINDOWS)}")
    return np.stack([window(hu, *WINDOWS[n]) for n in names], axis=-1)
