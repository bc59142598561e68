"""DICOM reading: find files by content, group series, HU windows; only training fields leave this module."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ingest.series import order_slices
from ingest.windowing import DEFAULT_WINDOWS, to_hu, window_stack


class DicomError(RuntimeError):
    """A DICOM file or series could not be used; the message gives the reason (no identifiers)."""


@dataclass
class SliceHeader:
    """The fields training needs from one file's header (identities stay raw here, pseudonymised later)."""

    path: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    position: list[float] | None
    orientation: list[float] | None
    instance: int | None


@dataclass
class Series:
    """One series: its slice headers in anatomical order, plus ordering warnings."""

    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    slices: list[SliceHeader]
    warnings: list[str] = field(default_factory=list)


def read_header(path: str | Path) -> SliceHeader | None:
    """Header of ``path`` without pixel data, or None when it is not a DICOM image file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError):
        return None
    if "SeriesInstanceUID" not in ds or "Rows" not in ds:
        return None
    ipp = ds.get("ImagePositionPatient")
    iop = ds.get("ImageOrientationPatient")
    inst = ds.get("InstanceNumber")
    return SliceHeader(
        path=str(path),
        patient_id=str(ds.get("PatientID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        position=[float(v) for v in ipp] if ipp is not None else None,
        orientation=[float(v) for v in iop] if iop is not None else None,
        instance=int(inst) if inst is not None else None,
    )


def group_series(headers: Iterable[SliceHeader]) -> list[Series]:
    """Group headers by (study, series) and order each series along its slice normal."""
    groups: dict[tuple[str, str], list[SliceHeader]] = {}
    for h in headers:
        groups.setdefault((h.study_uid, h.series_uid), []).append(h)
    out = []
    for (study, series), items in sorted(groups.items()):
        orient = items[0].orientation
        order, warnings = order_slices([h.position for h in items], orient, [h.instance for h in items])
        ordered = [items[i] for i in order]
        out.append(Series(items[0].patient_id, study, series, items[0].modality, ordered, warnings))
    return out


def slice_rgb(path: str, windows: tuple[str, ...] = DEFAULT_WINDOWS) -> np.ndarray:
    """One CT slice as ``uint8[H, W, 3]`` of stacked HU windows (MR: percentile-normalised grey)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as exc:
        raise DicomError(f"pixel data could not be decoded: {type(exc).__name__}: {exc}") from exc
    if pixels.ndim != 2:
        raise DicomError(f"expected a single-frame slice, got pixel array of shape {pixels.shape}")
    if str(ds.get("Modality", "")) == "CT":
        hu = to_hu(pixels, float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0)))
        return window_stack(hu, windows)
    lo, hi = np.percentile(pixels, [0.5, 99.5])
    grey = np.clip((pixels - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)
