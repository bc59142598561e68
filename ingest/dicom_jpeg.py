"""A DICOM file's JPEG frames checked for a damaged scan, which pydicom's decoders fill in without an error.

A JPEG frame whose scan ends before its last block (a transfer or a writer stopped early, its end marker in place)
is decoded by pydicom's plugins (pylibjpeg's libjpeg, Pillow) with the missing rows grey and no word to the caller,
and such a slice was ingested as if whole. Each 8-bit frame (JPEG Baseline, the syntax of ultrasound, secondary
captures and many MR exports, JPEG Extended, or lossless JPEG of 8 bits) is decoded again by libjpeg-turbo with its
warnings of damage as errors (:func:`ingest.jpeg_decode.check_stream`): the slice fails, naming the frame and
libjpeg-turbo's words. A frame of 12 bits (JPEG Extended's other precision) or of lossless JPEG's 9 to 16 (CT and
MR archives), which simplejpeg does not read, is decoded twice by libjpeg-turbo, the second time with bytes before
its end marker that only a scan short of data reads (:func:`ingest.jpeg_decode.ends_early`). A scan of the right
length with a wrong bit in it is mostly told apart by neither. A JPEG-LS frame (lossless or near-lossless) cut
short, which pydicom's first plugin refuses and its next decodes into wrong rows, is decoded again by CharLS, which
refuses it (:func:`ingest.jpeg_decode.check_jpegls`).
"""

from __future__ import annotations

import struct

# JPEG Baseline (Process 1: 8-bit samples), JPEG Extended (Processes 2 and 4: 8 or 12 bits), and lossless JPEG
# (Process 14, its selection value 1 or any): 2 to 16 bits
JPEG = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")
JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")  # lossless, near-lossless
PIXEL_DATA = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


class DamagedFrame(ValueError):
    """A JPEG or JPEG-LS frame whose scan is damaged (libjpeg-turbo's warning, a scan that ends early, CharLS's
    refusal); the message names the frame."""


def check_frames(ds) -> None:
    """Raise :class:`DamagedFrame` where a JPEG or JPEG-LS frame of ``ds`` (a dataset with its pixel data) holds a
    damaged scan. Frames of other transfer syntaxes pass."""
    from pydicom.encaps import generate_frames

    syntax = str(ds.file_meta.get("TransferSyntaxUID", ""))
    if syntax in JPEG + JPEG_LS:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        for i, stream in enumerate(generate_frames(ds.PixelData, number_of_frames=frames)):
            _check(i, stream, syntax)


def check_frame(path: str, index: int, syntax: str) -> None:
    """:func:`check_frames` of frame ``index`` alone of the file at ``path`` of transfer ``syntax``, its stream
    read from the file (the frames before it skipped by their offsets). Another syntax's file is not opened."""
    import pydicom
    from pydicom.encaps import get_frame

    if str(syntax) not in JPEG + JPEG_LS:
        return
    with open(path, "rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        head = f.read(12)  # tag, explicit VR "OB", two reserved bytes, undefined length
        if head[:4] != PIXEL_DATA or struct.unpack("<I", head[8:12])[0] != 0xFFFFFFFF:
            return  # not encapsulated where it should be: pydicom's decoder refuses it
        table = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
        extended = table if all(t is not None for t in table) else None
        stream = get_frame(f, index, number_of_frames=int(ds.get("NumberOfFrames", 1) or 1), extended_offsets=extended)
    _check(index, stream, str(syntax))


def _check(index: int, stream: bytes, syntax: str) -> None:
    from ingest.jpeg_decode import check_jpegls, check_stream, ends_early

    try:
        if syntax in JPEG_LS:
            check_jpegls(stream)
        elif not check_stream(stream) and ends_early(stream):
            raise ValueError("its scan ends before its last block")
    except ValueError as exc:
        raise DamagedFrame(f"frame {index}: damaged JPEG data: {exc}") from None
