"""Stain augmentation in HED space (Tellez et al., 2018 and 2019): each image's haematoxylin, eosin and DAB amounts
scaled and shifted by a random amount, as another laboratory's staining would have them.

Colour jitter in RGB or HSV (paper 000's) moves hue and saturation in ways no stain does; HED jitter moves each
stain's amount, which is what differs between centres (Tellez et al. 2019 found colour augmentation, HED or HSV,
what made models generalise to other centres, and stain normalisation to add little on top of it).

Pixels become optical densities (``-ln((I + 1) / 256)``), are unmixed by Ruifrok and Johnston's matrix
(scikit-image's ``hed_from_rgb``), each stain becomes ``alpha * s + beta`` with ``alpha`` in
``[1 - sigma, 1 + sigma]`` and ``beta`` in ``[-sigma, sigma]``, and they are mixed back. Stain amounts are in
scikit-image's units (its ``rgb2hed``), so ``sigma`` is the papers' (0.05 "HED-light", 0.2 "HED-strong").
Unmixing, jitter and mixing are one 3 x 3 map of the densities plus a shift, with a map per sample (a sequence's
frames share theirs): on a GPU one DALI ``coord_transform`` between DALI's log and exp; in DALI's CPU mode OpenCV's
(:func:`hed_jittered_fast`, through ``fn.python_function``: batches of 256 px images on 2 threads took 4.0-4.2 ms
an image by DALI's arithmetic, 0.7-0.85 by OpenCV's; ``benchmarks/stain_jitter.py``). Unlike scikit-image's
round trip, amounts below zero are not clipped in between: the map stays linear, and with ``alpha`` 1 and ``beta``
0 an image comes back as it was.
"""

from __future__ import annotations

import cv2
import numpy as np

OD_UNIT = float(-np.log(1e-6))  # scikit-image's rgb2hed divides natural-log densities by this: its stain units
_DENSITY = (-np.log((np.arange(256) + 1.0) / 256.0)).astype(np.float32)  # each 8-bit value's density


# Ruifrok and Johnston's stain vectors (rows: haematoxylin, eosin, DAB; columns: R, G, B densities), as scikit-image's
# rgb_from_hed has them (tests/unit/test_stain.py checks both against it), and their inverse, which unmixes.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def _matrices() -> tuple[np.ndarray, np.ndarray]:
    return HED_FROM_RGB, RGB_FROM_HED


def density_map(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(M, T)``: the jitter as a map of an RGB density column vector, ``od' = M @ od + T``."""
    unmix, mix = _matrices()
    return mix.T @ np.diag(alpha) @ unmix.T, mix.T @ (np.asarray(beta) * OD_UNIT)


def hed_jittered(rgb: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """``rgb[..., 3]`` (uint8) with its stains scaled by ``alpha`` and shifted by ``beta`` (three each: H, E, DAB),
    rounded to uint8: the reference the DALI graph is tested against."""
    m, t = density_map(alpha, beta)
    od = -np.log((rgb.astype(np.float64) + 1.0) / 256.0)
    out = 256.0 * np.exp(-(od @ m.T + t)) - 1.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def hed_jittered_fast(rgb: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """:func:`hed_jittered` in float32 by OpenCV (densities from a table, the map by ``cv2.transform``, rounded
    and saturated by ``cv2.addWeighted``): within 1 of it."""
    m, t = density_map(alpha, beta)
    od = _DENSITY[rgb].reshape(-1, 1, 3)
    mixed = cv2.transform(od, np.hstack([m, t[:, None]]).astype(np.float32))
    light = cv2.exp(-mixed)
    return cv2.addWeighted(light, 256.0, light, 0.0, -1.0, dtype=cv2.CV_8U).reshape(rgb.shape)


def hed_jittered_batch(images: list, alphas: list, betas: list, threads: int) -> list[np.ndarray]:
    """:func:`hed_jittered_fast` of each image of a batch with its draws, on ``threads`` threads (DALI's CPU
    mode, :mod:`shards.cpu_kernels`)."""
    from shards.cpu_kernels import each

    return each(hed_jittered_fast, threads, images, alphas, betas)


def hed_draws(sigma: float):
    """DALI nodes of each sample's ``alpha`` in ``[1 - sigma, 1 + sigma]`` and ``beta`` in ``[-sigma, sigma]``,
    three each (a stain each)."""
    from nvidia.dali import fn

    return (
        fn.random.uniform(range=[1.0 - sigma, 1.0 + sigma], shape=[3]),
        fn.random.uniform(range=[-sigma, sigma], shape=[3]),
    )


def hed_jitter(images, alpha, beta):
    """DALI graph: ``images`` (uint8, channels last; a batch, or sequences) through :func:`hed_jittered` with each
    sample's ``alpha`` and ``beta`` (DALI nodes of 3 floats). The map is built from constant per-stain terms
    (``M = sum_i alpha_i * outer(mix_i, unmix_i)``), since DALI multiplies per-sample scalars, not matrices."""
    from nvidia.dali import fn, types
    from nvidia.dali import math as dmath

    unmix, mix = _matrices()
    terms = [types.Constant(np.outer(mix[i], unmix[:, i]).astype(np.float32)) for i in range(3)]
    shifts = [types.Constant((mix[i] * OD_UNIT).astype(np.float32)) for i in range(3)]
    m = alpha[0] * terms[0] + alpha[1] * terms[1] + alpha[2] * terms[2]
    t = beta[0] * shifts[0] + beta[1] * shifts[1] + beta[2] * shifts[2]
    od = -dmath.log((fn.cast(images, dtype=types.FLOAT) + 1.0) / 256.0)
    out = 256.0 * dmath.exp(-fn.coord_transform(od, M=m, T=t)) - 1.0
    return fn.cast(dmath.clamp(out, 0.0, 255.0), dtype=types.UINT8)  # rounds, as the reference


def stain_jittered(images, sigma: float, gpu: bool, layout: str, threads: int):
    """DALI graph: ``images`` with each sample's stains jittered by draws of :func:`hed_draws` (``sigma`` 0:
    as they are); on a GPU by :func:`hed_jitter`, in CPU mode by :func:`hed_jittered_batch`."""
    from functools import partial

    from nvidia.dali import fn

    if sigma <= 0:
        return images
    alpha, beta = hed_draws(sigma)
    if gpu:
        return hed_jitter(images, alpha, beta)
    jitter = partial(hed_jittered_batch, threads=threads)
    return fn.python_function(images, alpha, beta, function=jitter, batch_processing=True, output_layouts=layout)
