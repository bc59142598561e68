"""Slide previews: thumbnail, tissue-mask outline and kept tiles, so a person can check the tiling at a glance."""

from __future__ import annotations

import cv2
import numpy as np

from ingest.tiling import Tile
from ingest.tissue import inner_boundary

MAX_SIDE = 1024


def preview_png(thumb: np.ndarray, mask: np.ndarray, mask_downsample: float, tiles: list[Tile]) -> bytes:
    """PNG of ``thumb[H, W, 3]`` (the mask's level) with the mask outline in green and kept tiles in blue.

    ``mask_downsample`` is level-0 pixels per thumbnail pixel; tile boxes are level-0. Large thumbnails are
    shrunk to at most 1024 px on the longest side.
    """
    if thumb.shape[:2] != mask.shape:
        raise ValueError(f"thumbnail {thumb.shape[:2]} and mask {mask.shape} differ in size")
    scale = min(1.0, MAX_SIDE / max(mask.shape))
    img = np.ascontiguousarray(thumb[:, :, :3])
    m = mask
    if scale < 1.0:
        size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        m = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    img = img.copy()
    img[inner_boundary(m)] = (0, 200, 0)
    f = scale / mask_downsample
    for t in tiles:
        x0, y0 = round(t.x * f), round(t.y * f)
        x1, y1 = round((t.x + t.size0) * f) - 1, round((t.y + t.size0) * f) - 1
        cv2.rectangle(img, (x0, y0), (max(x0, x1), max(y0, y1)), (30, 80, 230), 1)
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img[:, :, ::-1]))
    if not ok:
        raise ValueError("could not encode the preview")
    return buf.tobytes()
