"""The sample schema: keys and components of a shard sample.

A sample is a dict with ``__key__`` and one entry per component extension (webdataset convention):
``jpg``/``png`` encoded image bytes, ``cls`` an ASCII integer label, ``json`` metadata.
"""

from __future__ import annotations

import io
import json
import re
import struct
import zlib
from typing import Any

import numpy as np

KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,90}$")
IMAGE_EXTS = ("jpg", "png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Samples whose width of specimen (their ``width_um``) differs from a model's training samples' by more than this
# many times either way are of another scale: ingest and evaluation warn of them alike.
SCALE_TOLERANCE = 1.25


def scale_ratio(reference_um: float | None, um: float | None) -> float | None:
    """``um / reference_um`` where the two widths of specimen (µm) differ by more than :data:`SCALE_TOLERANCE`
    times; None where they agree or either is unknown."""
    if not reference_um or not um or 1 / SCALE_TOLERANCE <= um / reference_um <= SCALE_TOLERANCE:
        return None
    return um / reference_um


def site_order(sites) -> list[str]:
    """The distinct sites (centres) named among ``sites`` (None: of none), in their order as numbers: "2" before
    "11". Input records and samples carry their site as the label table wrote it (``center_id``)."""
    return sorted({s for s in sites if s}, key=lambda s: (len(s), s))


def check_key(key: str) -> str:
    """Return ``key`` if usable as a WebDataset key (no dots or slashes, fits a USTAR name), else raise."""
    if not KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: use 1-90 characters of [A-Za-z0-9_-]")
    return key


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_unfiltered(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG without row filters, its pixels compressed by libdeflate at level 1.

    For flat images (windowed CT/MR slices): a 512 x 512 slice takes 2.8 ms and 133 kB here against 5.6 ms and
    155 kB through OpenCV's zlib with filters off, and 12.7 ms and 227 kB with them on. The container is the
    standard's minimum: signature, IHDR, one IDAT holding a zlib stream of rows each led by filter byte 0, IEND.
    """
    import imagecodecs

    h, w = rgb.shape[:2]
    rows = np.zeros((h, 1 + 3 * w), np.uint8)
    rows[:, 1:] = rgb.reshape(h, 3 * w)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8-bit truecolour, deflate, no interlace
    pixels = imagecodecs.deflate_encode(rows.tobytes(), level=1)  # zlib-wrapped, as PNG requires
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels) + _png_chunk(b"IEND", b"")


def encode_image(rgb: np.ndarray, fmt: str = "jpg", quality: int = 90, flat: bool = False) -> bytes:
    """Encode ``rgb[H, W, 3]`` uint8 as JPEG or PNG bytes.

    ``flat`` is for images with large constant areas (windowed CT/MR slices, saturated at 0 or 255): PNG then
    skips its per-row prediction filters, which on such images cost twice the time and give larger files, and
    compresses with libdeflate (:func:`png_unfiltered`). Photographs and tissue keep the filters.
    """
    import cv2
    import imagecodecs

    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if fmt == "jpg":
        # libjpeg-turbo straight from RGB: the same bytes as OpenCV's encoder, without its BGR conversion
        return imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb), level=quality)
    if fmt != "png":
        raise ValueError(f"unknown image format {fmt!r}")
    if flat:
        return png_unfiltered(np.ascontiguousarray(rgb))
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)  # SIMD; a reversed-axis copy costs more than the PNG encode
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
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


def class_label(cls: bytes | None) -> int:
    """A ``.cls`` member's integer label; -1 when there is none (or it is not an integer)."""
    try:
        return int(cls) if cls is not None else -1
    except ValueError:
        return -1
