"""A detector's augmentations that move pixels, moving its boxes with them: zoom and rotation about the image's
centre, then flips, as the classifiers' DALI pipeline applies them (:func:`shards.dali.augment`: zoom below 1
shrinks the image into a black frame, rotation is anticlockwise with the edge pixels replicated). Done in torch on
the loaded batch, on its device, since DALI's loaders carry the boxes as metadata, not as tensors.

A rotated box becomes the box enclosing its turned corners (loose by up to a factor of 2 in area at 45°, as in
Ultralytics' augmentation); a box left mostly out of view is dropped, as Ultralytics drops it."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from training.config import AugmentConfig

MIN_SIDE = 2.0  # px: a box narrower than this after the move is dropped
MIN_SHARE = 0.1  # and one with less than this share of its moved area in view


def placement(size: int, degrees: float, zoom: float) -> np.ndarray:
    """The 2x3 map of input pixel coordinates (corners at 0 and ``size``) to output ones: scaled by ``zoom`` and
    turned ``degrees`` anticlockwise on screen (y pointing down), both about the centre."""
    a, c = math.radians(degrees), size / 2
    turn = zoom * np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    return np.hstack([turn, (np.array([c, c]) - turn @ [c, c])[:, None]])


def moved_boxes(boxes: torch.Tensor, matrix: np.ndarray, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``boxes`` ``[K, 4]`` (x0, y0, x1, y1 in pixels) through ``matrix``: each the box enclosing its moved corners,
    clipped to the image; with the mask of those kept (at least :data:`MIN_SIDE` px a side, and
    :data:`MIN_SHARE` of the moved box in view)."""
    if not len(boxes):
        return boxes, torch.zeros(0, dtype=torch.bool, device=boxes.device)
    m = torch.as_tensor(matrix, dtype=boxes.dtype, device=boxes.device)
    x0, y0, x1, y1 = boxes.unbind(1)
    corners = torch.stack([torch.stack(p, 1) for p in ((x0, y0), (x1, y0), (x0, y1), (x1, y1))], 1)  # [K, 4, 2]
    turned = corners @ m[:, :2].T + m[:, 2]
    whole = torch.cat([turned.amin(1), turned.amax(1)], 1)
    clipped = whole.clamp(0, size)
    w, h = clipped[:, 2] - clipped[:, 0], clipped[:, 3] - clipped[:, 1]
    area = (whole[:, 2] - whole[:, 0]) * (whole[:, 3] - whole[:, 1])
    keep = (w >= MIN_SIDE) & (h >= MIN_SIDE) & (w * h >= MIN_SHARE * area)
    return clipped, keep


def warped(image: torch.Tensor, matrix: np.ndarray, black: torch.Tensor, frame: bool) -> torch.Tensor:
    """``image`` ``[C, S, S]`` resampled (bilinear) through ``matrix``; outside the input, ``black`` where
    ``frame`` (a zoom out's black frame), else the edge pixels replicated (the classifiers' rotation)."""
    size, src = image.shape[-1], image.float()  # in float32 whatever the batch's type (bf16 on a GPU)
    full = np.vstack([matrix, [0, 0, 1]])
    back = np.linalg.inv(full)[:2]  # output pixel -> input pixel; square, so the same in normalised coordinates
    theta = torch.tensor(np.hstack([back[:, :2], (back[:, :2] @ [1, 1] + back[:, 2] / (size / 2) - 1)[:, None]]))
    grid = F.affine_grid(theta[None].to(src), [1, *image.shape], align_corners=False)
    shift = black.to(src).view(-1, 1, 1) if frame else 0.0
    out = F.grid_sample((src - shift)[None], grid, "bilinear", "zeros" if frame else "border", align_corners=False)
    return (out[0] + shift).to(image.dtype)


def moved(
    x: torch.Tensor, tgts: list[dict], aug: AugmentConfig, rng: np.random.Generator, black: torch.Tensor
) -> tuple[torch.Tensor, list[dict]]:
    """``x`` ``[N, C, S, S]`` and its targets, each sample zoomed, rotated and flipped on its shares of ``aug``
    (its draws from ``rng``, the same again when an epoch is redone); ``black`` is black as normalised in ``x``.
    A box that leaves the image goes, with its label."""
    size = x.shape[-1]
    x = x.clone()
    for i, t in enumerate(tgts):
        zoom = rng.uniform(*aug.zoom) if rng.random() < aug.zoom_p else 1.0
        degrees = rng.uniform(*aug.rotate_degrees) if rng.random() < aug.rotate_p else 0.0
        b, labels = t["boxes"], t["labels"]
        if zoom != 1.0 or degrees != 0.0:
            matrix = placement(size, degrees, zoom)
            x[i] = warped(x[i], matrix, black, frame=zoom < 1)
            b, keep = moved_boxes(b, matrix, size)
            b, labels = b[keep], labels[keep]
        if rng.random() < aug.hflip:
            x[i] = x[i].flip(-1)
            b = torch.stack([size - b[:, 2], b[:, 1], size - b[:, 0], b[:, 3]], 1) if len(b) else b
        if rng.random() < aug.vflip:
            x[i] = x[i].flip(-2)
            b = torch.stack([b[:, 0], size - b[:, 3], b[:, 2], size - b[:, 1]], 1) if len(b) else b
        t["boxes"], t["labels"] = b, labels
    return x, tgts
