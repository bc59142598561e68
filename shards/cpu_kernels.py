"""OpenCV kernels that DALI's CPU-mode pipelines call (``fn.python_function``, a batch at a time) in place of DALI's
own.

DALI's CPU kernels for these two steps are several times slower than OpenCV's (one core, 256 px RGB): a linear
rotation 1.54 ms against 0.37, and halving a 512 px tile 0.8 ms against under 0.1. On the loader benchmark's
pipeline (paper 000's augmentations, 512 px tiles to 256) a sample took 4.9 ms of a core with DALI's kernels and
4.0 with these. A GPU pipeline keeps DALI's GPU operators. The results are OpenCV's exactly: the area resize
ingest stores tiles with, and the linear rotation with replicated edges the DALI version was tested against.

DALI calls a ``python_function`` on one of its threads, however many the pipeline has: called per sample, these
steps would run one sample at a time, a ceiling on a many-core machine whatever its thread count. So the
pipelines call the ``*_batch`` forms once per batch, and they spread the samples over a pool of the pipeline's
thread count (OpenCV releases the GIL while it computes).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

import cv2
import numpy as np


@cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """A pool of ``threads`` for the process's pipelines of that many threads, kept for its life."""
    return ThreadPoolExecutor(threads, thread_name_prefix="tessera-opencv")


def each(kernel, threads: int, *batches: list) -> list[np.ndarray]:
    """``kernel`` over the batches' samples (one argument from each), in order; on ``threads`` threads."""
    if threads <= 1 or len(batches[0]) <= 1:
        return [kernel(*sample) for sample in zip(*batches, strict=True)]
    return list(_pool(threads).map(kernel, *batches))


def resized(image: np.ndarray, size: int) -> np.ndarray:
    """``uint8[H, W, C]`` to ``[size, size, C]`` by OpenCV's area filter: each output pixel the mean of the input
    it covers when shrinking (2x2 averages at exactly half), linear when enlarging; as ingest's ``--store-size``."""
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA).reshape(size, size, image.shape[2])


def rotated(image: np.ndarray, degrees: np.ndarray) -> np.ndarray:
    """``image`` (``[H, W, C]``, or ``[F, H, W, C]``: every frame alike) turned ``degrees`` anticlockwise about
    its centre, sampled linearly, with the edge pixels replicated outside it (no black corners)."""
    h, w = image.shape[-3:-1]
    turn = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), float(degrees), 1.0)

    def one(frame: np.ndarray) -> np.ndarray:
        out = cv2.warpAffine(frame, turn, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        return out.reshape(frame.shape)  # OpenCV drops a single channel's axis

    return one(image) if image.ndim == 3 else np.stack([one(f) for f in image])


def resized_batch(images: list[np.ndarray], size: int, threads: int) -> list[np.ndarray]:
    """:func:`resized` of each image of a batch, on ``threads`` threads."""
    return each(partial(resized, size=size), threads, images)


def rotated_batch(images: list[np.ndarray], degrees: list[np.ndarray], threads: int) -> list[np.ndarray]:
    """:func:`rotated` of each image of a batch by its angle, on ``threads`` threads."""
    return each(rotated, threads, images, degrees)
