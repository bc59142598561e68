"""Slide previews: thumbnail, tissue-mask outline and kept tiles (and, in red, those a background model dropped;
crossed out in orange, those that could not be read), so a person can check the tiling at a glance."""

from __future__ import annotations

import cv2
import numpy as np

from ingest.tiling import Tile
from ingest.tissue import inner_boundary

MAX_SIDE = 1024
UNREAD = (0, 140, 255)  # BGR: orange, for what could not be read (damaged)


def preview_png(
    thumb: np.ndarray,
    mask: np.ndarray,
    mask_downsample: float,
    tiles: list[Tile],
    ink: np.ndarray | None = None,
    unread: list[tuple[int, int, int, int]] = (),
) -> bytes:
    """PNG of ``thumb[H, W, 3]`` (the mask's level) with the mask outline in green, kept tiles in blue, the
    outline of pen marks found (``ink``, :mod:`ingest.ink`) in magenta, and the parts of ``thumb`` that could not
    be read (``unread``: x, y, w, h; damaged, taken as background) crossed out in orange.

    ``mask_downsample`` is level-0 pixels per thumbnail pixel; tile boxes are level-0. Large thumbnails are
    shrunk to at most 1024 px on the longest side.
    """
    if thumb.shape[:2] != mask.shape:
        raise ValueError(f"thumbnail {thumb.shape[:2]} and mask {mask.shape} differ in size")
    scale = min(1.0, MAX_SIDE / max(mask.shape))
    f = preview_scale(mask.shape, mask_downsample)
    img = np.ascontiguousarray(thumb[:, :, :3])
    m, pen = mask, ink if ink is not None else np.zeros(mask.shape, bool)
    if scale < 1.0:
        size = (max(1, round(mask.shape[1] * scale)), max(1, round(mask.shape[0] * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        m = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        pen = cv2.resize(pen.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    img = img.copy()
    img[inner_boundary(m)] = (0, 200, 0)
    img[inner_boundary(pen)] = (230, 0, 230)
    _boxes(img, [(t.x, t.y) for t in tiles], tiles[0].size0 if tiles else 0, f, (30, 80, 230))
    for x, y, w, h in unread:  # RGB here
        _cross(img, round(x * scale), round(y * scale), round((x + w) * scale), round((y + h) * scale), UNREAD[::-1])
    return _png(img[:, :, ::-1])


def preview_scale(mask_shape: tuple[int, ...], mask_downsample: float) -> float:
    """Preview pixels per level-0 pixel of a slide whose mask has ``mask_shape``."""
    return min(1.0, MAX_SIDE / max(mask_shape[:2])) / mask_downsample


def mark_tiles(
    png: bytes, size0: int, scale: float, dropped: list[tuple[int, int]] = (), damaged: list[tuple[int, int]] = ()
) -> bytes:
    """The preview ``png`` with tiles at level-0 ``(x, y)`` (``size0`` px, ``scale`` from :func:`preview_scale`)
    marked over their blue: ``dropped`` (by the background model) outlined in red, ``damaged`` (could not be read,
    left out) outlined and crossed out in orange, so the holes in a slide's samples show where they are."""
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("the preview is not a PNG")
    _boxes(img, list(dropped), size0, scale, (0, 0, 230))  # BGR, as decoded
    for x, y in damaged:
        _cross(img, round(x * scale), round(y * scale), round((x + size0) * scale), round((y + size0) * scale), UNREAD)
    return _png(img)


def _boxes(img: np.ndarray, tiles: list[tuple[int, int]], size0: int, f: float, colour: tuple[int, int, int]) -> None:
    for x, y in tiles:
        x0, y0 = round(x * f), round(y * f)
        x1, y1 = round((x + size0) * f) - 1, round((y + size0) * f) - 1
        cv2.rectangle(img, (x0, y0), (max(x0, x1), max(y0, y1)), colour, 1)


def _cross(img: np.ndarray, x0: int, y0: int, x_end: int, y_end: int, colour: tuple[int, int, int]) -> None:
    """The box from ``(x0, y0)`` up to ``(x_end, y_end)`` (exclusive) outlined and crossed out."""
    x1, y1 = max(x0, x_end - 1), max(y0, y_end - 1)
    cv2.rectangle(img, (x0, y0), (x1, y1), colour, 1)
    cv2.line(img, (x0, y0), (x1, y1), colour, 1)
    cv2.line(img, (x0, y1), (x1, y0), colour, 1)


def _png(bgr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError("could not encode the preview")
    return buf.tobytes()
