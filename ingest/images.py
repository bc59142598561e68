"""Plain image files (pure): decoding to RGB, bounding boxes (YOLO txt or CSV), crops, and per-slice label
tables of slice-image datasets such as CT-ICH (PhysioNet; paper 002)."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass

import cv2
import numpy as np

from ingest.labels import RSNA_SUBTYPES
from ingest.windowing import grey

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class ImageError(ValueError):
    """An image file that cannot be decoded (the reason, not the file name: callers record pseudonyms)."""


def decode_rgb(data: bytes) -> np.ndarray:
    """Encoded bytes to ``uint8[H, W, 3]`` RGB as a viewer shows them: turned by their EXIF orientation (boxes
    are drawn on the image so shown), grey repeated, alpha dropped, CMYK converted, 16-bit percentile-normalised
    (a colour one's channels alike, its colours kept).
    A JPEG whose scan is damaged (:func:`ingest.jpeg_decode.decode_file`) is an :class:`ImageError` saying how.
    """
    from ingest.jpeg_decode import decode_file

    try:  # a JPEG whose scan is damaged is refused, where OpenCV decodes it with grey blocks and a printed warning
        rgb = decode_file(data)
    except ValueError as exc:
        raise ImageError(f"damaged JPEG data: {exc}") from None
    if rgb is not None:
        return rgb
    # ANYDEPTH|ANYCOLOR: 16-bit kept and the orientation applied (IMREAD_UNCHANGED ignores it, and hands CMYK
    # over as four channels)
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    if arr is None:
        raise ImageError(f"not a decodable image ({len(data)} bytes)")
    if arr.dtype != np.uint8:  # 16-bit PNG/TIFF (MR exports, a colour camera's): no physical scale, so percentiles,
        arr = grey(arr)  # one pair for all of a colour image's channels (it was made grey before: images rendering 3)
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


TIFF = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, either byte order


def stack_notes(data: bytes) -> list[str]:
    """A note where the file ``data`` holds several full-resolution images (a TIFF stack of slices, channels or
    views): :func:`decode_rgb` reads its first page alone, and the others would be left out without a word. Pages
    marked reduced-resolution (pyramid levels, thumbnails) are not counted; other formats hold one image."""
    if data[:4] not in TIFF:
        return []
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            full = sum(1 for page in tif.pages if not page.is_reduced)
    except Exception:  # a TIFF tifffile does not read: OpenCV's decoding answers for it
        return []
    if full < 2:
        return []
    return [f"a TIFF of {full} images (pages): its first is the sample, the other {full - 1} are left out"]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in normalised ``[0, 1]`` image coordinates (independent of any resize)."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str | None = None

    def as_list(self) -> list:
        return [round(self.x0, 6), round(self.y0, 6), round(self.x1, 6), round(self.y1, 6), self.label]


def yolo_boxes(text: str, source: str = "boxes") -> list[Box]:
    """Parse a YOLO label file: ``class cx cy w h`` per line, normalised; a bad line names ``source``."""
    boxes = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            cls, cx, cy, w, h = parts[0], *map(float, parts[1:5])
        except (ValueError, IndexError):
            raise ValueError(f"{source}: line {n} is not 'class cx cy w h'") from None
        if len(parts) != 5 or not all(0.0 <= v <= 1.0 for v in (cx, cy, w, h)):
            raise ValueError(f"{source}: line {n} is not 'class cx cy w h' with values in [0, 1]")
        boxes.append(Box(max(cx - w / 2, 0.0), max(cy - h / 2, 0.0), min(cx + w / 2, 1.0), min(cy + h / 2, 1.0), cls))
    return boxes


BOX_COLUMNS = ("image", "x_min", "y_min", "x_max", "y_max")


def csv_boxes(text: str, source: str = "boxes") -> dict[str, list[tuple[float, float, float, float, str | None]]]:
    """Parse ``image,x_min,y_min,x_max,y_max[,label]`` (pixels) into image stem -> pixel boxes.

    Pixels are normalised later, once the image's size is known (:func:`normalise`).
    """
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    missing = [c for c in BOX_COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{source}: box CSV lacks column(s) {missing}; expected {','.join(BOX_COLUMNS)}[,label]")
    out: dict[str, list] = {}
    for n, row in enumerate(reader, start=2):
        try:
            x0, y0, x1, y1 = (float(row[c]) for c in BOX_COLUMNS[1:])
        except (TypeError, ValueError):
            raise ValueError(f"{source}: line {n} has a non-numeric coordinate") from None
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{source}: line {n}: x_max/y_max must exceed x_min/y_min")
        name = row["image"].strip().rsplit("/", 1)[-1].split(".", 1)[0]
        out.setdefault(name, []).append((x0, y0, x1, y1, (row.get("label") or "").strip() or None))
    return out


def normalise(pixel_boxes, width: int, height: int) -> list[Box]:
    """Pixel boxes of an image ``width`` x ``height`` to normalised :class:`Box` es, clipped to the image."""
    return [
        Box(max(x0 / width, 0.0), max(y0 / height, 0.0), min(x1 / width, 1.0), min(y1 / height, 1.0), label)
        for x0, y0, x1, y1, label in pixel_boxes
    ]


def crop_bounds(box: Box, w: int, h: int, margin: float = 0.1) -> tuple[int, int, int, int]:
    """Whole-pixel ``(x0, y0, x1, y1)`` of ``box`` grown by ``margin`` of its size on each side, clipped to a
    ``w`` x ``h`` image."""
    bw, bh = (box.x1 - box.x0) * w, (box.y1 - box.y0) * h
    x0 = int(np.floor(max(box.x0 * w - margin * bw, 0)))
    y0 = int(np.floor(max(box.y0 * h - margin * bh, 0)))
    x1 = int(np.ceil(min(box.x1 * w + margin * bw, w)))
    y1 = int(np.ceil(min(box.y1 * h + margin * bh, h)))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty crop for box {box.as_list()} in a {w}x{h} image")
    return x0, y0, x1, y1


def crop(rgb: np.ndarray, box: Box, margin: float = 0.1) -> np.ndarray:
    """The region of ``box`` grown by ``margin`` of its size on each side, clipped to the image (the
    detect -> crop step of paper 004, with boxes from annotations or a detector)."""
    x0, y0, x1, y1 = crop_bounds(box, *rgb.shape[1::-1], margin)
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


_SLICE_RE = re.compile(r"^\d+$")


def slice_number(stem: str) -> int | None:
    """The slice number of a slice image named by it (``12.jpg``); None for other files (``12_HGE_Seg.jpg``)."""
    return int(stem) if _SLICE_RE.match(stem) else None


# CT-ICH (hemorrhage_diagnosis.csv) subtype columns, in the RSNA vector's order after ``any``.
CT_ICH_COLUMNS = {
    "epidural": "Epidural",
    "intraparenchymal": "Intraparenchymal",
    "intraventricular": "Intraventricular",
    "subarachnoid": "Subarachnoid",
    "subdural": "Subdural",
}


def is_slice_table(text: str) -> bool:
    """True for a per-slice table: CT-ICH (``PatientNumber,SliceNumber,...``) or ``patient,slice,label``."""
    head = {c.strip().lower() for c in text.lstrip("\ufeff").split("\n", 1)[0].split(",")}
    return {"patientnumber", "slicenumber"} <= head or {"patient", "slice", "label"} <= head


def read_slice_table(text: str, source: str = "labels") -> tuple[dict[tuple[str, int], list[int]], bool]:
    """``(patient, slice) -> [any, epidural, intraparenchymal, intraventricular, subarachnoid, subdural]`` and
    whether the table has subtypes.

    CT-ICH: ``any`` is ``1 - No_Hemorrhage``, subtypes from their columns. Generic ``patient,slice,label``:
    ``label`` must be 0 or 1 (it becomes ``any``; subtypes stay 0). Patients are keyed without leading zeros
    so folder ``049`` matches ``49``.
    """
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    cols = {c.strip(): c for c in reader.fieldnames or []}
    ct_ich = "PatientNumber" in cols and "SliceNumber" in cols
    if ct_ich and "No_Hemorrhage" not in cols:
        raise ValueError(f"{source}: CT-ICH table lacks the No_Hemorrhage column")
    out: dict[tuple[str, int], list[int]] = {}
    for n, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
        try:
            if ct_ich:
                key = (patient_key(row["PatientNumber"]), int(row["SliceNumber"]))
                subtypes = [int(row.get(CT_ICH_COLUMNS[s], "0") or 0) for s in RSNA_SUBTYPES[1:]]
                vector = [1 - int(row["No_Hemorrhage"]), *subtypes]
            else:
                key = (patient_key(row["patient"]), int(row["slice"]))
                vector = [int(row["label"])] + [0] * (len(RSNA_SUBTYPES) - 1)
        except (KeyError, ValueError):
            raise ValueError(f"{source}: line {n} has a missing or non-integer patient, slice or label") from None
        if not all(v in (0, 1) for v in vector):
            raise ValueError(f"{source}: line {n}: labels must be 0 or 1")
        if key in out:
            raise ValueError(f"{source}: line {n} repeats patient {key[0]} slice {key[1]}")
        out[key] = vector
    return out, ct_ich


def patient_key(value: str) -> str:
    """A patient folder or table value as a key: numbers lose leading zeros (``049`` == ``49``)."""
    value = value.strip()
    return str(int(value)) if value.isdigit() else value
