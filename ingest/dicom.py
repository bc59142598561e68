"""DICOM reading: find files by content, group series, decode and render slices; only training fields leave here."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, TypeVar

import numpy as np

from ingest import progress
from ingest.series import order_slices
from ingest.windowing import DEFAULT_WINDOWS, colour_rgb, grey, padding_mask, unwrap_12bit, windowed, wrapped_12bit
from shards import storage, transfers
from shards.local_files import local_copy


class DicomError(RuntimeError):
    """A DICOM file or series could not be used; the message gives the reason (no identifiers)."""


@dataclass
class SliceHeader:
    """The fields training needs from one slice's header (identities stay raw here, pseudonymised later).

    A multi-frame file gives one header per frame, ``frame`` being its index in the file.
    """

    path: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    modality: str
    position: list[float] | None
    orientation: list[float] | None
    instance: int | None
    frame: int | None = None
    burned_in: bool = False
    # a frame's (slope, intercept) to HU (its functional groups', else the file's): multi-frame CT and enhanced images
    rescale: tuple[float, float] | None = None
    wrapped: bool = False  # 12-bit values wrapped under an unsigned header (RSNA's fault), read as signed

    @property
    def instance_name(self) -> str:
        """What names the slice outside Tessera: its SOP Instance UID (the RSNA competition's image ID), with its
        frame's index in a multi-frame file; its file where the header has no UID."""
        uid = self.sop_uid or self.path
        return uid if self.frame is None else f"{uid} frame {self.frame}"


@dataclass
class Series:
    """One series: its slice headers in anatomical order, plus ordering warnings, and the files that repeat a
    slice another file holds (``copies``: same SOP instance and frame), left out."""

    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    slices: list[SliceHeader]
    warnings: list[str] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)


WRAPPED = "12-bit values stored wrapped under an unsigned header (RSNA's known fault), read as signed"


def _first_of_each_instance(items: list[SliceHeader]) -> tuple[list[SliceHeader], list[str]]:
    """``items`` without the later headers of a SOP instance (and frame) already seen, and the files of those:
    an export that holds a slice twice (two folders, a re-sent transfer) gives one sample of it."""
    seen: set[tuple[str, int | None]] = set()
    kept, copies = [], []
    for h in items:
        if h.sop_uid and (h.sop_uid, h.frame) in seen:
            copies.append(h.path)
            continue
        seen.add((h.sop_uid, h.frame))
        kept.append(h)
    return kept, copies


def _floats(value) -> list[float] | None:
    """A multi-valued number (a position, an orientation), or None where it is absent or not numbers."""
    try:
        return [float(v) for v in value] if value is not None else None
    except (TypeError, ValueError):  # one value where several belong, or text: as if not given
        return None


def _int(value) -> int | None:
    """An integer (an instance number), or None where it is absent or not one (``'1A'``: its order comes from the
    slice's position then)."""
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _frame_geometry(ds, n: int) -> tuple[list[list[float] | None], list[float] | None]:
    """Per-frame positions and the orientation of an enhanced multi-frame image (functional groups)."""
    positions: list[list[float] | None] = [None] * n
    orientation = None
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and "PlaneOrientationSequence" in shared[0]:
        orientation = _floats(shared[0].PlaneOrientationSequence[0].get("ImageOrientationPatient"))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    for i, item in enumerate(per_frame[:n]):
        if "PlanePositionSequence" in item:
            positions[i] = _floats(item.PlanePositionSequence[0].get("ImagePositionPatient"))
        if orientation is None and "PlaneOrientationSequence" in item:
            orientation = _floats(item.PlaneOrientationSequence[0].get("ImageOrientationPatient"))
    return positions, orientation


T = TypeVar("T")
HEADER_THREADS = 16
HEADER_BAR_FILES = 2048  # a header pass of fewer files takes seconds at most: no bar

# The Pixel Data tag (7FE0,0010) as little- and big-endian bytes: a file prefix holding it holds the whole header.
PIXEL_DATA_TAGS = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")


def header_in_prefix(prefix: bytes, complete: bool) -> bool:
    """Whether the first bytes of a file are enough to read its header: the whole file, or the pixel data starts
    in them. (A false positive, the tag's bytes inside an earlier value, fails to parse and falls back.)"""
    return complete or any(tag in prefix for tag in PIXEL_DATA_TAGS)


def read_header(
    location: str,
    parse: Callable[[BinaryIO | str], T],
    prefix_bytes: int,
    usable: Callable[[T], bool] = lambda _: True,
) -> T:
    """``parse`` of a DICOM file's header. From ``s3://``, one ranged GET of the first ``prefix_bytes`` usually
    holds it, so the pixels are not downloaded to read a header; when it does not (``parse`` fails or gives
    nothing ``usable``), the whole file is read."""
    if location.startswith("s3://"):
        prefix = storage.get_bytes(location, length=prefix_bytes)
        if header_in_prefix(prefix, complete=len(prefix) < prefix_bytes):
            with contextlib.suppress(Exception):  # a header longer than the prefix: the whole file below
                result = parse(io.BytesIO(prefix))
                if usable(result):
                    return result
    with local_copy(location) as path:
        return parse(path)


FILES_PER_PROCESS = 2048  # local files a header process is started for: below that its start costs more


def header_processes(files: int) -> int:
    """How many processes parse ``files`` local headers: one per :data:`FILES_PER_PROCESS` files, at most one per
    core this process may run on."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, files // FILES_PER_PROCESS))


def _read_each(read: Callable[[str], T], locations: list[str], threads: int = 1, bar=None) -> list[T]:
    """``read`` of each location in order, on ``threads`` (their wait counted once); each counted on ``bar`` (the
    driver's) as it comes."""
    if threads > 1:
        counted = (lambda _: bar.update(1)) if bar is not None else None
        return transfers.concurrently(read, locations, threads, "tessera-header", each=counted)
    out = []
    for loc in locations:
        out.append(read(loc))
        if bar is not None:
            bar.update(1)
    return out


def _read_run(read: Callable[[str], T], locations: list[str], threads: int) -> tuple[list[T], transfers.Transfers]:
    """:func:`_read_each` in a header process, with what it moved (for the driver to count as its own)."""
    return _read_each(read, locations, threads), transfers.take()


def map_headers(read: Callable[[str], T], locations: list[str], processes: int | None = None) -> list[T]:
    """``read`` of every location, in order (so a plan does not depend on timing). Object-store reads overlap on
    threads. Header parsing is GIL-bound (locally, on 16 threads it took 1.15 ms a file against 0.57 ms
    serially), and so is each request's own work in boto3, so a large cohort (RSNA's 752k slices) is parsed by
    ``processes`` (default :func:`header_processes`) processes, each given runs of files (from the object store,
    each on its threads)."""
    threads = HEADER_THREADS if any(loc.startswith("s3://") for loc in locations) else 1
    processes = header_processes(len(locations)) if processes is None else processes
    with progress.bar(len(locations), "reading headers", "file", least=HEADER_BAR_FILES) as bar:
        if processes < 2:
            return _read_each(read, locations, threads, bar)
        # loky's processes (joblib's): not forked from a driver that may hold Ray's threads, and started without
        # running the caller's script again (one without a __main__ guard works); stopped when done, not kept idle
        from joblib.externals.loky import ProcessPoolExecutor

        step = -(-len(locations) // (processes * 8))
        runs = [locations[i : i + step] for i in range(0, len(locations), step)]
        parts = []
        # the processes' transfers are the driver's (its line), their waits one: the driver's wait on the pool
        waited = transfers.waiting() if threads > 1 else contextlib.nullcontext()
        with ProcessPoolExecutor(processes) as pool, waited:
            for part, moved in pool.map(_read_run, [read] * len(runs), runs, [threads] * len(runs)):
                parts.append(part)
                transfers.add(replace(moved, waited=0.0))
                bar.update(len(part))
    return [header for part in parts for header in part]


def read_headers(path: str | Path | BinaryIO, name: str | None = None) -> tuple[list[SliceHeader], str | None]:
    """Headers of ``path``'s slices without reading pixel data, or ``([], reason)`` when it is not usable.

    ``path`` may be an open binary file (e.g. the first bytes of an object-store file), recorded as ``name``.
    The reason separates files that are not DICOM from DICOM objects without an image (RT plan, SR, ...).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path if hasattr(path, "read") else str(path), stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError):
        return [], "not a DICOM file"
    try:
        return _headers(ds, name or str(path))
    except Exception as exc:  # a value no reading of it can use (its type, its form): this file alone, said why
        return [], f"a DICOM header Tessera cannot use: {type(exc).__name__}: {exc}"


def _headers(ds, name: str) -> tuple[list[SliceHeader], str | None]:
    """:func:`read_headers` of the header ``ds`` read from ``name``."""
    modality = str(ds.get("Modality", "")) or "unknown"
    if "SeriesInstanceUID" not in ds:
        return [], f"DICOM without a SeriesInstanceUID (modality {modality})"
    if "Rows" not in ds or "Columns" not in ds:
        return [], f"DICOM object without an image (modality {modality})"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    base = {
        "path": name,
        "patient_id": str(ds.get("PatientID", "")),
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": str(ds.SeriesInstanceUID),
        "sop_uid": str(ds.get("SOPInstanceUID", "")),
        "modality": modality,
        "burned_in": str(ds.get("BurnedInAnnotation", "")).upper() == "YES",
    }
    instance = _int(ds.get("InstanceNumber"))
    ipp, iop = _floats(ds.get("ImagePositionPatient")), _floats(ds.get("ImageOrientationPatient"))
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds

    def wrapped(hu: tuple[float, float]) -> bool:  # RSNA's fault, read with the frame's intercept
        return modality == "CT" and stored_wrapped(ds, hu[1])

    if frames == 1 and not enhanced:
        one = SliceHeader(**base, position=ipp, orientation=iop, instance=instance, wrapped=wrapped(rescale(ds)))
        return [one], None
    positions, orientation = _frame_geometry(ds, frames)
    orientation = orientation or iop
    if frames == 1:  # an enhanced image of one frame (a series of such files): a slice, its geometry in its groups
        position, hu = positions[0] or ipp, rescale(ds, 0)
        one = SliceHeader(
            **base, position=position, orientation=orientation, instance=instance, rescale=hu, wrapped=wrapped(hu)
        )
        return [one], None
    out = []
    for i in range(frames):
        hu = rescale(ds, i) if enhanced or modality == "CT" else None
        where = {"position": positions[i], "orientation": orientation, "instance": i + 1, "frame": i}
        out.append(SliceHeader(**base, **where, rescale=hu, wrapped=hu is not None and wrapped(hu)))
    return out, None


def group_series(headers: Iterable[SliceHeader]) -> list[Series]:
    """Group headers by (study, series) and order each series along its slice normal; a slice held by several
    files is read from the first (in ``headers``' order).

    Mixed orientations within a series are recorded (the first one defines the normal).
    """
    groups: dict[tuple[str, str], list[SliceHeader]] = {}
    for h in headers:
        groups.setdefault((h.study_uid, h.series_uid), []).append(h)
    out = []
    for (study, series), found in sorted(groups.items()):
        items, copies = _first_of_each_instance(found)
        orient = items[0].orientation
        order, warnings = order_slices([h.position for h in items], orient, [h.instance for h in items])
        if orient is not None and any(
            h.orientation is not None and not np.allclose(h.orientation, orient, atol=1e-3) for h in items
        ):
            warnings.append("mixed slice orientations in one series")
        if any(h.wrapped for h in items):
            warnings.append(WRAPPED)
        if len(patients := {h.patient_id for h in items}) > 1:  # a mix-up, or a de-identification per file
            warnings.append(f"slices of {len(patients)} PatientIDs in one series: the first file's is its patient")
        ordered = [items[i] for i in order]
        out.append(Series(items[0].patient_id, study, series, items[0].modality, ordered, warnings, copies))
    return out


def read_frames(path: str):
    """``(dataset, pixels)`` with pixels ``[F, H, W(, 3)]`` in any transfer syntax pydicom's plugins decode."""
    import pydicom

    from ingest.dicom_jpeg import check_frames

    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
        check_frames(ds)  # a JPEG frame's damaged scan, which the decoders fill in (ingest.dicom_jpeg)
    except Exception as exc:
        raise DicomError(f"pixel data could not be decoded: {type(exc).__name__}: {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    colour = int(ds.get("SamplesPerPixel", 1)) > 1
    if frames == 1:
        pixels = pixels[None]
    if pixels.ndim != (4 if colour else 3):
        raise DicomError(f"unexpected pixel array shape {pixels.shape} for {frames} frame(s)")
    return ds, pixels


def rescale(ds, frame: int | None = None) -> tuple[float, float]:
    """``(slope, intercept)`` from stored values to HU of ``frame``. An enhanced multi-frame image (Enhanced CT)
    keeps them in its functional groups, the frame's or else the shared ones, not at the top level, where another
    image keeps them; ``(1, 0)`` where none is given."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    shared = ds.get("SharedFunctionalGroupsSequence") or []
    groups = ([per_frame[frame]] if frame is not None and frame < len(per_frame) else []) + list(shared[:1])
    found = [g.PixelValueTransformationSequence[0] for g in groups if g.get("PixelValueTransformationSequence")]
    source = found[0] if found else ds
    return float(source.get("RescaleSlope", 1) or 1), float(source.get("RescaleIntercept", 0) or 0)


def stored_wrapped(ds, intercept: float) -> bool:
    """Whether the CT image ``ds``, read with ``intercept``, holds 12-bit values wrapped under an unsigned header
    (:func:`~ingest.windowing.wrapped_12bit`)."""
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    return wrapped_12bit(int(ds.get("BitsStored", 0) or 0), signed, intercept)


def render(
    ds, pixels: np.ndarray, windows: tuple[str, ...] = DEFAULT_WINDOWS, hu: tuple[float, float] | None = None
) -> np.ndarray:
    """One frame as ``uint8[H, W, 3]``: CT as stacked HU windows (RSNA's wrapped 12-bit values read as the signed
    ones they are), colour in 8 bits (a palette's through its table), other grey percentile-normalised. ``hu``: the
    frame's ``(slope, intercept)`` where the caller has it (:attr:`SliceHeader.rescale`), else :func:`rescale`."""
    if (rgb := colour_rgb(ds, pixels)) is not None:  # RGB (pydicom converts YBR), or a palette's indices
        return rgb
    if str(ds.get("Modality", "")) == "CT":
        pad_value = ds.get("PixelPaddingValue")
        pad_limit = ds.get("PixelPaddingRangeLimit")
        padding = padding_mask(pixels, pad_value, pad_limit)
        slope, intercept = hu or rescale(ds)
        if stored_wrapped(ds, intercept):  # the padding value is a stored one: its mask above, before this
            pixels = unwrap_12bit(pixels)
        return windowed(pixels, slope, intercept, tuple(windows), padding)
    g = grey(pixels, invert=str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1")
    return np.repeat(g[:, :, None], 3, axis=2)


MODALITY, SHARED_GROUPS, PER_FRAME_GROUPS = 0x00080060, 0x52009229, 0x52009230


def read_frame(path: str, frame: int, per_frame: bool = True):
    """``(dataset, pixels)`` of one frame of a multi-frame file, decoding only that frame. The dataset holds the
    image pixel module, the modality and the functional groups (the per-frame ones if ``per_frame``: building
    them costs milliseconds a frame in a file of hundreds, so a caller that has the frame's rescale leaves them)."""
    import pydicom
    from pydicom.pixels import pixel_array

    from ingest.dicom_jpeg import check_frame

    tags = [MODALITY, SHARED_GROUPS] + ([PER_FRAME_GROUPS] if per_frame else [])
    try:
        ds = pydicom.Dataset()  # pydicom fills in the image pixel module (group 0028) and the tags named here
        pixels = pixel_array(path, index=frame, ds_out=ds, specific_tags=tags)
        check_frame(path, frame, ds.file_meta.get("TransferSyntaxUID", ""))  # a damaged JPEG scan (dicom_jpeg)
    except Exception as exc:
        raise DicomError(f"frame {frame} could not be decoded: {type(exc).__name__}: {exc}") from exc
    return ds, pixels


def slice_rgb(
    path: str,
    windows: tuple[str, ...] = DEFAULT_WINDOWS,
    frame: int | None = None,
    hu: Sequence[float] | None = None,
) -> np.ndarray:
    """One slice (or one frame of a multi-frame file) as ``uint8[H, W, 3]``; ``hu``: the frame's rescale to HU,
    where the header pass read it (:attr:`SliceHeader.rescale`)."""
    if frame is None:
        ds, pixels = read_frames(path)
        pixels, frame = pixels[0], 0
    else:
        ds, pixels = read_frame(path, frame, per_frame=hu is None)
    slope, intercept = hu if hu is not None else rescale(ds, frame)
    return render(ds, pixels, windows, (float(slope), float(intercept)))
