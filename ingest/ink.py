"""Pen marks on a slide (pure functions on a low-resolution RGB level).

A pathologist rings the region of interest in marker on the glass. The ink is as saturated as stained tissue, so a
mask on saturation takes it for tissue, and its tiles teach a model the colour of a pen, which can differ by
centre (and so go with the label). Each ink is told from H&E by hue, saturation and value (OpenCV's HSV: hue
0-179). Hematoxylin is violet-blue (hue about 125-150) and eosin pink. Green is never stain, and black is darker
than any stained tissue at a thumbnail's scale. Blue ink is bluer than hematoxylin and more saturated. Red ink
is the hue and saturation of red cells, so ``red`` takes a red-cell-rich clot (paper 000's CE) for ink: use it only
on tissue without them.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ingest.tissue import remove_small_objects


@dataclass(frozen=True)
class Ink:
    """Pixels whose hue lies in ``[hue_lo, hue_hi]`` (wrapping past 179 when ``hue_lo > hue_hi``) and whose
    saturation and value lie within the bounds given are this ink."""

    hue_lo: int = 0
    hue_hi: int = 179
    sat_min: int = 0
    val_min: int = 0
    val_max: int = 255


INKS = {
    "green": Ink(35, 95, sat_min=60),
    "blue": Ink(100, 123, sat_min=140),
    "black": Ink(val_max=60),
    "red": Ink(170, 8, sat_min=130, val_min=60),
}
# Ink's edge, blended with the glass or the tissue under it, is fainter than its stroke: the mask is grown by this
# many pixels so that the edge is not left as a rim of "tissue".
GROW_PX = 2
# Ink objects of this many mask pixels or fewer are stain precipitate or dust, not a stroke.
MIN_OBJECT_PX = 16


def ink_mask(rgb: np.ndarray, inks: list[str] | tuple[str, ...]) -> np.ndarray:
    """Boolean mask of ``rgb[H, W, 3]`` uint8 pixels of any of ``inks`` (names in :data:`INKS`), grown by
    :data:`GROW_PX`."""
    hsv = cv2.cvtColor(np.ascontiguousarray(rgb[:, :, :3]), cv2.COLOR_RGB2HSV)
    h, s, v = hsv[:, :, 0], hsv[:, :, 1], hsv[:, :, 2]
    found = np.zeros(h.shape, bool)
    for name in inks:
        ink = INKS[name]
        hue = (
            (h >= ink.hue_lo) & (h <= ink.hue_hi) if ink.hue_lo <= ink.hue_hi else (h >= ink.hue_lo) | (h <= ink.hue_hi)
        )
        found |= hue & (s >= ink.sat_min) & (v >= ink.val_min) & (v <= ink.val_max)
    found = remove_small_objects(found, MIN_OBJECT_PX)
    if not found.any():
        return found
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * GROW_PX + 1, 2 * GROW_PX + 1))
    return cv2.dilate(found.astype(np.uint8), kernel).astype(bool)


def without_ink(rgb: np.ndarray, ink: np.ndarray) -> np.ndarray:
    """``rgb`` with the ``ink`` pixels made white (glass): the tissue mask's Otsu threshold is then drawn between
    tissue and glass, not pushed up by the ink's saturation until faint tissue falls under it."""
    clean = rgb[:, :, :3].copy()
    clean[ink] = 255
    return clean
