"""DICOM whole-slide images: one slide is a series of files (a pyramid level each, plus label and overview
images), so ``.dcm`` sources are grouped into slides by SeriesInstanceUID before planning.

OpenSlide opens a DICOM slide from any one of its files and finds the others in the same folder; without the
grouping every level file would become a slide of its own and each tile would be ingested once per file. A
slide on ``s3://`` is downloaded with all of its files into one folder (:class:`ingest.source_cache.SourceCache`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ingest.dicom import map_headers, read_header

HEADER_BYTES = 256 << 10  # a WSI header holds an ICC profile of up to a few hundred kB; the frames follow

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
_TAGS = ["SOPClassUID", "SeriesInstanceUID", "ImageType", "TotalPixelMatrixColumns"]


@dataclass
class DicomSlide:
    """One slide: the level-0 file first (the one OpenSlide is given), then the series' other files."""

    name: str
    files: list[str] = field(default_factory=list)


def _header(location: str):
    """The tags grouping needs, from the first bytes of an ``s3://`` object when they hold them."""
    import pydicom

    return read_header(
        location, lambda f: pydicom.dcmread(f, stop_before_pixels=True, specific_tags=_TAGS), HEADER_BYTES
    )


def _pyramid_width(ds) -> int:
    """Width of a pyramid level (ImageType VOLUME), or -1 for a label, overview or thumbnail image."""
    kinds = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return int(ds.get("TotalPixelMatrixColumns") or 0) if "VOLUME" in kinds else -1


def _classify(location: str) -> tuple[str, int, str | None]:
    """``(series UID, pyramid width, None)`` for a DICOM WSI file, or ``("", 0, reason)`` for any other file."""
    try:
        ds = _header(location)
    except Exception as exc:  # not DICOM, truncated: this file alone is refused
        return "", 0, f"unreadable DICOM header: {exc}"
    if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
        return "", 0, f"not a whole-slide DICOM (SOP class {ds.get('SOPClassUID', 'missing')})"
    if not ds.get("SeriesInstanceUID"):
        return "", 0, "whole-slide DICOM without a SeriesInstanceUID"
    return str(ds.SeriesInstanceUID), _pyramid_width(ds), None


def group_dicom_slides(locations: list[str]) -> tuple[list[DicomSlide], dict[str, str]]:
    """Slides made of the DICOM WSI files among ``locations``, and the reason each other file is refused.

    A slide is named for its folder (DICOM files carry UIDs, not slide names), or for its SeriesInstanceUID
    when a folder holds several slides.
    """
    refused: dict[str, str] = {}
    series: dict[str, list[tuple[int, str]]] = {}
    for loc, (uid, width, reason) in zip(locations, map_headers(_classify, locations), strict=True):
        if reason:
            refused[loc] = reason
        else:
            series.setdefault(uid, []).append((width, loc))
    per_folder: dict[str, int] = {}
    for files in series.values():
        for folder in {os.path.dirname(loc) for _, loc in files}:
            per_folder[folder] = per_folder.get(folder, 0) + 1
    slides = []
    for uid, files in series.items():
        files.sort(key=lambda f: (-f[0], f[1]))  # widest pyramid level first
        width, first = files[0]
        if width < 0:
            for _, loc in files:
                refused[loc] = f"DICOM WSI series {uid} has no pyramid level (only label or overview images)"
            continue
        folder = os.path.dirname(first)
        name = os.path.basename(folder) if per_folder[folder] == 1 else uid
        slides.append(DicomSlide(name, [loc for _, loc in files]))
    return sorted(slides, key=lambda s: s.files[0]), refused
