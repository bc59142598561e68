"""Slide heatmaps: a model's tile probabilities painted over the slide's preview, one panel per class.

A table of tile calls says little about where on a slide a class is called; a pathologist checks that at a glance
on the picture. Each panel colours the preview's pixels under the tiles by the mean probability of the tiles that
cover them (tiles overlap when ingest's stride is below the tile size); the rest of the slide shows as it is.
"""

from __future__ import annotations

import io

import cv2
import numpy as np

from training.predictions import header_of

HEADER = 22  # px above each panel, for its title
BAR = 14  # px below the panels, for the colour scale
OPACITY = 0.65  # of the colour over the preview


def mean_cover(shape: tuple[int, int], boxes: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean[H, W], covered[H, W])``: each pixel's mean of ``values[N]`` over the ``boxes[N, 4]`` (``x0, y0,
    x1, y1``, end exclusive, in pixels) that cover it, and whether any does."""
    total, count = np.zeros(shape, np.float64), np.zeros(shape, np.int32)
    for (x0, y0, x1, y1), v in zip(boxes, values, strict=True):
        total[y0:y1, x0:x1] += v
        count[y0:y1, x0:x1] += 1
    covered = count > 0
    return np.divide(total, count, out=np.zeros(shape), where=covered), covered


def preview_boxes(tiles: np.ndarray, scale: float, shape: tuple[int, int]) -> np.ndarray:
    """``int[N, 4]`` boxes on a preview of ``shape`` (H, W) of the level-0 tiles ``tiles[N, 3]`` (``x, y, size0``)
    at ``scale`` preview px per level-0 px, as ingest's preview outlines them; at least one pixel each."""
    x, y, size = (tiles[:, i].astype(np.float64) for i in range(3))
    x0, y0 = np.round(x * scale), np.round(y * scale)
    x1, y1 = np.maximum(np.round((x + size) * scale), x0 + 1), np.maximum(np.round((y + size) * scale), y0 + 1)
    boxes = np.stack([x0, y0, x1, y1], axis=1)
    return np.clip(boxes, 0, [shape[1], shape[0], shape[1], shape[0]]).astype(np.int64)


def tiles_by_slide(table: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str], bool]:
    """A sample prediction table's tiles per slide, ``{slide: (tiles[N, 3] (x, y, size0), probs[N, C])}`` in the
    order the slides first appear, its class (or label) names, and whether they are exclusive classes (a
    multi-class table); nothing where its samples are not tiles of slides. Parsed by column (pandas): a table of
    a cohort's millions of tiles takes a fraction of the memory and time of a dict per row."""
    header = header_of(table)
    if not {"slide", "x", "y", "size0"} <= set(header):
        return {}, [], False
    classes = [c.removeprefix("p_") for c in header if c.startswith("p_")]
    places, probs = ["x", "y", "size0"], [f"p_{c}" for c in classes]
    frame = _columns(table, ["slide", *places, *probs])
    out = {
        str(slide): (rows[places].to_numpy(np.int64), rows[probs].to_numpy(np.float64))
        for slide, rows in frame.groupby("slide", sort=False, observed=True)
    }
    return out, classes, "predicted" in header


def slides_of(table: str) -> list[str]:
    """The slides a sample table names, in the order they first appear; none where it has no slide column."""
    if "slide" not in header_of(table):
        return []
    return [str(slide) for slide in _columns(table, ["slide"])["slide"].unique() if slide != ""]


def labels_by_slide(table: str) -> dict[str, str]:
    """Each slide's true label in a labelled multi-class sample table (its ``label`` column); none without one."""
    header = header_of(table)
    if not {"slide", "label"} <= set(header):
        return {}
    frame = _columns(table, ["slide", "label"])
    frame = frame[(frame["slide"] != "") & (frame["label"] != "")].drop_duplicates("slide", keep="last")
    return dict(zip(frame["slide"], frame["label"], strict=True))


def _columns(table: str, names: list[str]):
    """The ``names`` columns of CSV ``table`` as a DataFrame: names and labels as text however they look (a
    pseudonym of digits, a slide called NA), numbers as Python's ``float`` reads them."""
    import pandas as pd

    dtype = {n: "category" for n in names if n in ("slide", "label")}  # a few distinct values, each once
    exact = {"keep_default_na": False, "float_precision": "round_trip"}
    return pd.read_csv(io.BytesIO(table.encode()), usecols=names, dtype=dtype, **exact)  # StringIO: 4 B a char


def panels_of(classes: list[str], exclusive: bool = True) -> list[int]:
    """The classes drawn: of two exclusive ones the second (the first's probability is its complement), else
    every one."""
    return [1] if exclusive and len(classes) == 2 else list(range(len(classes)))


def heatmap(
    preview: np.ndarray,
    tiles: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    scale: float,
    title: str,
    exclusive: bool = True,
) -> np.ndarray:
    """``uint8[H', W', 3]`` BGR: ``preview[H, W, 3]`` (BGR) beside a panel per class of :func:`panels_of`, each
    the probability of ``probs[N, C]`` at the ``tiles[N, 3]`` (level-0 ``x, y, size0``) in viridis, 0 to 1 on
    the bar below; ``title`` and each panel's class above."""
    h, w = preview.shape[:2]
    boxes = preview_boxes(tiles, scale, (h, w))
    panels = [preview]
    for k in panels_of(classes, exclusive):
        mean, covered = mean_cover((h, w), boxes, probs[:, k])
        colour = cv2.applyColorMap(np.round(mean * 255).astype(np.uint8), cv2.COLORMAP_VIRIDIS)
        panel = preview.copy()
        blend = OPACITY * colour[covered] + (1 - OPACITY) * preview[covered]
        panel[covered] = np.round(blend).astype(np.uint8)
        panels.append(panel)
    gap = np.full((h, 4, 3), 255, np.uint8)
    body = np.hstack([p for panel in panels for p in (panel, gap)][:-1])
    out = np.full((HEADER + h + BAR, body.shape[1], 3), 255, np.uint8)
    out[HEADER : HEADER + h] = body
    names = [title] + [f"p({classes[k]})" for k in panels_of(classes, exclusive)]
    for i, name in enumerate(names):
        out[:HEADER, i * (w + 4) : i * (w + 4) + w] = caption(name, w)
    ramp = np.linspace(0, 255, max(1, out.shape[1] - 40)).astype(np.uint8)[None, :]
    out[HEADER + h + 3 : HEADER + h + BAR - 1, 20:-20] = cv2.applyColorMap(ramp, cv2.COLORMAP_VIRIDIS)
    for text, x in (("0", 6), ("1", out.shape[1] - 16)):
        cv2.putText(out, text, (x, HEADER + h + BAR - 2), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1)
    return out


def caption(text: str, width: int) -> np.ndarray:
    """``uint8[HEADER, width, 3]``: ``text`` on white above a panel ``width`` px wide, in a smaller font where it
    would not fit (down to 0.3 of OpenCV's simplex) and cut at the panel's edge, never running into the next."""
    strip = np.full((HEADER, width, 3), 255, np.uint8)
    (w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
    scale = max(0.3, 0.45 * min(1.0, (width - 4) / max(w, 1)))
    cv2.putText(strip, text, (2, HEADER - 6), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1)
    return strip


def heatmap_png(preview_png: bytes, *args, **kwargs) -> bytes:
    """PNG bytes of :func:`heatmap` (its other arguments) over the preview PNG ``preview_png``."""
    preview = cv2.imdecode(np.frombuffer(preview_png, np.uint8), cv2.IMREAD_COLOR)
    if preview is None:
        raise ValueError("the slide's preview is not an image")
    ok, buf = cv2.imencode(".png", heatmap(preview, *args, **kwargs))
    if not ok:
        raise ValueError("could not encode the heatmap as PNG")
    return buf.tobytes()
