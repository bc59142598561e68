"""The sample schema: keys and components of a shard sample.

A sample is a dict with ``__key__`` and one entry per component extension (webdataset convention):
``jpg``/``png`` encoded image bytes, ``cls`` an ASCII integer label, ``json`` metadata.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,90}$")
IMAGE_EXTS = ("jpg", "png")


def check_key(key: str) -> str:
    """Return ``key`` if usable as a WebDataset key (no dots or slashes, fits a USTAR name), else raise."""
    if not KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: use 1-90 characters of [A-Za-z0-9_-]")
    return key


def encode_image(rgb: np.ndarray, fmt: str = "jpg", quality: int = 90, flat: bool = False) -> bytes:
    """Encode ``rgb[H, W, 3]`` uint8 as JPEG or PNG bytes.

    ``flat`` is for images with large constant areas (windowed CT/MR slices, saturated at 0 or 255): PNG then
    skips its per-row prediction filters, which on such images costs twice the time and gives larger files
    (a 512 x 512 CT slice: 5 ms and 150 KB instead of 12 ms and 221 KB). Photographs and tissue keep the filters.
    """
    import cv2

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # SIMD; a reversed-axis copy costs more than the JPEG encode
    if fmt == "jpg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    elif fmt == "png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1]
        if flat:
            params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]
        ok, buf = cv2.imencode(".png", bgr, params)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    if not ok:
        raise ValueError(f"could not encode image as {fmt}")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG bytes to ``rgb[H, W, 3]`` uint8."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def make_sample(
    key: str, image: bytes | list[bytes], fmt: str, label: int | None, meta: dict[str, Any]
) -> dict[str, Any]:
    """Build a sample dict; the label is stored as ``.cls`` only when known.

    One image is ``<fmt>``; several (a slice sequence) are ``000.<fmt>``, ``001.<fmt>``... so a DALI reader lists
    them by extension and stacks them.
    """
    sample: dict[str, Any] = {"__key__": check_key(key), "json": json.dumps(meta, sort_keys=True)}
    images = image if isinstance(image, list) else [image]
    if len(images) == 1:
        sample[fmt] = images[0]
    else:
        sample.update({f"{j:03d}.{fmt}": img for j, img in enumerate(images)})
    if label is not None:
        sample["cls"] = str(int(label))
    return sample


def to_bytes(value: Any) -> bytes:
    """Serialise a component value: bytes as is, str as UTF-8, anything else as JSON."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value, sort_keys=True).encode()
