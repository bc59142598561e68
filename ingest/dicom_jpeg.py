"""A DICOM file's 8-bit JPEG frames checked for a damaged scan, which pydicom's decoders fill in without an error.

A JPEG frame whose scan ends before its last block (a transfer or a writer stopped early, its end marker in place)
is decoded by pydicom's plugins (pylibjpeg's libjpeg, Pillow) with the missing rows grey and no word to the caller,
and such a slice was ingested as if whole. Each 8-bit frame (JPEG Baseline, the syntax of ultrasound, secondary
captures and many MR exports, or JPEG Extended) is decoded again by libjpeg-turbo with its warnings of damage as
errors (:func:`ingest.jpeg_decode.check_stream`): the slice fails, naming the frame and libjpeg-turbo's words.
Frames of 12 bits (JPEG Extended's other precision) and lossless JPEG are not checked: simplejpeg reads 8-bit
samples only, and no decoder here reports the damage.
"""

from __future__ import annotations

import struct

# JPEG Baseline (Process 1: 8-bit samples) and JPEG Extended (Processes 2 and 4: 8 or 12 bits)
JPEG_LOSSY = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51")
PIXEL_DATA = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


class DamagedFrame(ValueError):
    """A JPEG frame libjpeg-turbo reads only with a warning of damage; the message names the frame."""


def check_frames(ds) -> None:
    """Raise :class:`DamagedFrame` where an 8-bit lossy JPEG frame of ``ds`` (a dataset with its pixel data) holds a
    damaged scan. Other frames and transfer syntaxes pass."""
    from pydicom.encaps import generate_frames

    if str(ds.file_meta.get("TransferSyntaxUID", "")) in JPEG_LOSSY:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        for i, stream in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            _check(i, stream)


def check_frame(path: str, index: int, syntax: str) -> None:
    """:func:`check_frames` of frame ``index`` alone of the file at ``path`` of transfer ``syntax``, its stream
    read from the file (the frames before it skipped by their offsets). Another syntax's file is not opened."""
    import pydicom
    from pydicom.encaps import get_frame

    if str(syntax) not in JPEG_LOSSY:
        return
    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        head = f.read(12)  # tag, explicit VR "OB", two reserved bytes, undefined length
        if head[:4] != PIXEL_DATA or struct.unpack("<I", head[8:12])[0] != 0xFFFFFFFF:
            return  # not encapsulated where it should be: pydicom's decoder refuses it
        table = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
        extended = table if all(t is not None for t in table) else None
        stream = get_frame(f, index, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1), extended_offsets=extended)
    _check(index, stream)


def _check(index: int, stream: bytes) -> None:
    from ingest.jpeg_decode import check_stream

    try:
        check_stream(stream)
    except ValueError as exc:
        raise DamagedFrame(f"frame {index}: damaged JPEG data: {exc}") from None
