"""The lesion segmented from its box (paper 004's second stage, pure): the classifier sees the lesion alone, its
background set to black. The box prompts a segmenter (:class:`GrabCut`, OpenCV's, no weights; or Segment
Anything, :mod:`ingest.sam`); its mask is reduced to the box's largest component with holes filled."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import cv2
import numpy as np

from ingest.images import Box, crop, crop_bounds

# A mask under this share of its box is no lesion found: the box crop is kept as it is (and says so).
MIN_FRACTION = 0.02
CONTEXT = 0.25  # GrabCut sees the box grown by this share of its size: the pixels outside it are background


class Segmenter(Protocol):
    """Box-prompted segmentation: one ``bool[H, W]`` mask of ``rgb`` per pixel box ``(x0, y0, x1, y1)``."""

    def masks(self, rgb: np.ndarray, rects: list[tuple[int, int, int, int]]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class Lesion:
    """A box's segmentation: ``mask`` (``bool[H, W]`` of the whole image) or None when none was found, and the
    share of the box it covers."""

    mask: np.ndarray | None
    fraction: float


class GrabCut:
    """OpenCV's GrabCut initialised with the box (Rother et al. 2004): colour models of the box's inside and of
    the pixels around it, iterated ``iterations`` times; seeded, so a re-run makes the same mask."""

    def __init__(self, iterations: int = 5) -> None:
        self.iterations = iterations

    def masks(self, rgb: np.ndarray, rects: list[tuple[int, int, int, int]]) -> list[np.ndarray]:
        return [self._one(rgb, rect) for rect in rects]

    def _one(self, rgb: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = rect
        bw, bh = x1 - x0, y1 - y0
        cx0, cy0 = max(x0 - int(CONTEXT * bw) - 2, 0), max(y0 - int(CONTEXT * bh) - 2, 0)
        cx1, cy1 = min(x1 + int(CONTEXT * bw) + 2, w), min(y1 + int(CONTEXT * bh) + 2, h)
        out = np.zeros((h, w), bool)
        if (cx0, cy0, cx1, cy1) == (x0, y0, x1, y1):  # the box is the whole image: nothing to tell background by
            return out
        region = np.ascontiguousarray(rgb[cy0:cy1, cx0:cx1])  # RGB as it is: its colour models ignore channel order
        labels = np.zeros(region.shape[:2], np.uint8)
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)
        try:
            cv2.grabCut(region, labels, (x0 - cx0, y0 - cy0, bw, bh), bgd, fgd, self.iterations, cv2.GC_INIT_WITH_RECT)
        except cv2.error:  # one colour everywhere: no model to fit
            return out
        out[cy0:cy1, cx0:cx1] = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        return out


def box_rect(box: Box, w: int, h: int) -> tuple[int, int, int, int]:
    """``box`` in whole pixels ``(x0, y0, x1, y1)`` of a ``w`` x ``h`` image, at least one pixel each way."""
    x0, y0, x1, y1 = crop_bounds(box, w, h, 0.0)
    return x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)


def keep_lesion(mask: np.ndarray, rect: tuple[int, int, int, int]) -> np.ndarray:
    """``mask`` inside ``rect`` only, reduced to its largest connected component with its holes filled."""
    # imported here: every ingest actor imports this module, and only those that segment need scipy (its import
    # was a quarter of a slide actor's start-up)
    from scipy import ndimage

    x0, y0, x1, y1 = rect
    inside = np.zeros_like(mask, dtype=bool)
    inside[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
    labels, n = ndimage.label(inside)
    if n == 0:
        return inside
    sizes = ndimage.sum_labels(inside, labels, index=np.arange(1, n + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def lesions(rgb: np.ndarray, boxes: list[Box], segmenter: Segmenter) -> list[Lesion]:
    """Each box's lesion in ``rgb`` (``uint8[H, W, 3]``); a mask under :data:`MIN_FRACTION` of its box is none."""
    h, w = rgb.shape[:2]
    rects = [box_rect(b, w, h) for b in boxes]
    found = []
    for rect, raw in zip(rects, segmenter.masks(rgb, rects), strict=True):
        mask = keep_lesion(raw, rect)
        fraction = float(mask.sum()) / ((rect[2] - rect[0]) * (rect[3] - rect[1]))
        found.append(Lesion(mask if fraction >= MIN_FRACTION else None, round(fraction, 4)))
    return found


def cut_out(rgb: np.ndarray, box: Box, margin: float, mask: np.ndarray | None) -> np.ndarray:
    """The crop of ``box`` grown by ``margin`` (:func:`ingest.images.crop`), its pixels outside ``mask`` (cropped
    alike) black; the crop as it is without a mask."""
    region = crop(rgb, box, margin)
    return region if mask is None else np.where(crop(mask, box, margin)[..., None], region, 0).astype(region.dtype)


def denoise(rgb: np.ndarray, median: int, grayscale: bool) -> np.ndarray:
    """Paper 004's preparation: grey (luma, repeated in three channels) and a ``median`` px median filter (0:
    none; odd)."""
    if grayscale:
        rgb = cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    return cv2.medianBlur(rgb, median) if median else rgb


@lru_cache(maxsize=2)
def segmenter(method: str, sam_model: str | None = None, device: str = "cpu") -> Segmenter:
    """The segmenter of ``--segment`` (one per worker process: a SAM checkpoint is loaded once, on ``device``)."""
    if method == "grabcut":
        return GrabCut()
    from ingest.sam import SamSegmenter  # torch and transformers only where SAM is asked for

    return SamSegmenter(sam_model or "", device)
