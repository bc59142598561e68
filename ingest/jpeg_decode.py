"""Strict JPEG decoding: libjpeg-turbo (through simplejpeg) with its warnings as errors, for a TIFF page's tiles and
strips (each warning, as OpenSlide, the reader of record, takes them) and for image files (those of a damaged scan).

libjpeg-turbo decodes a damaged stream whose markers are all in place without an error: a scan that ends before
its last block (a writer stopped early; the rest of the stream's space left zero) is filled with grey, a lost sync
leaves bytes over. It says so only in a warning, which imagecodecs (tifffile's decoder) passes over, so that the
direct read path stored such a tile where OpenSlide refuses it ("Corrupt JPEG data: premature end of data
segment"). Here the warning raises, and the caller leaves the tile to OpenSlide, which reads it or says why.
OpenCV, decoding an image folder's JPEGs, prints the warning where no caller sees it: such an image is refused.
DICOM frames (:mod:`ingest.dicom_jpeg`) of more than 8 bits, which simplejpeg does not read, are checked for a scan
that ends early by :func:`ends_early`, and JPEG-LS frames by CharLS (:func:`check_jpegls`).
"""

from __future__ import annotations

import numpy as np

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
# APP14 "Adobe" segment, less its last byte: the colour transform, 0 for RGB, 1 for YCbCr
ADOBE = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00"
# TIFF photometric interpretation: (JPEG colour transform, decoded colour space), as tifffile decodes each
PHOTOMETRIC = {1: (None, "GRAY"), 2: (0, "RGB"), 6: (1, "RGB")}


class StrictJpeg:
    """The JPEG streams of one TIFF page (compression 7), each completed with the page's shared tables and told its
    colour space as tifffile tells libjpeg-turbo: the photometric interpretation sets it, unless the stream's own
    JFIF segment says YCbCr (libjpeg reads JFIF before Adobe)."""

    def __init__(self, tables: bytes | None, photometric: int) -> None:
        transform, self._space = PHOTOMETRIC[photometric]
        if tables and not (tables.startswith(SOI) and tables.endswith(EOI)):
            raise ValueError("the page's JPEG tables are not a JPEG stream of tables")
        self._head = SOI + (b"" if transform is None else ADOBE + bytes([transform])) + (tables or SOI + EOI)[2:-2]

    @classmethod
    def of(cls, page) -> StrictJpeg | None:
        """The page's decoder, or None where the page is not one it decodes as tifffile does (another compression
        or colour space, samples of more than 8 bits, tables that are not a stream): tifffile's decoder serves it."""
        samples = {1: 1, 2: 3, 6: 3}.get(int(page.photometric))
        if page.compression != 7 or samples != page.samplesperpixel or page.bitspersample != 8 or page.jpegheader:
            return None
        try:
            return cls(page.jpegtables, int(page.photometric))
        except ValueError:
            return None

    def decode(self, data: bytes) -> np.ndarray:
        """``uint8[height, width, samples]`` of one tile's or strip's stream (SOI ... EOI); ValueError with
        libjpeg-turbo's message for a stream it reads only with a warning, or not at all."""
        import simplejpeg

        if not data.startswith(SOI):
            raise ValueError("not a JPEG stream: it does not start with SOI")
        return simplejpeg.decode_jpeg(self._head + data[2:], colorspace=self._space, strict=True)


# libjpeg-turbo's warnings of a damaged scan, after which it decodes on: the blocks it could not read grey (a scan
# ended early, a file cut short), or out of sync (a bad code, a restart marker out of order). Its other warnings
# (bytes over after the last block, as careless writers leave them; an unknown JFIF revision) leave the pixels whole.
DAMAGE = (
    "Corrupt JPEG data: premature end of data segment",
    "Corrupt JPEG data: bad Huffman code",
    "Corrupt JPEG data: bad arithmetic code",
    "Corrupt JPEG data: found marker",
    "Premature end of JPEG file",
)
ORIENTATION = 0x0112  # EXIF's orientation tag
SPACES = ("Gray", "YCbCr", "RGB")  # the colour spaces decoded here (not CMYK)


def decode_file(data: bytes) -> np.ndarray | None:
    """An image file's JPEG as ``uint8[H, W, 3]`` RGB (grey repeated), decoded with the warnings of a damaged scan
    (:data:`DAMAGE`) as errors (ValueError, libjpeg-turbo's message); None for a file this leaves to OpenCV, whose
    pixels are the same where both decode: not a JPEG, one turned by its EXIF orientation, one in CMYK or of 12
    bits, one with another warning."""
    import simplejpeg

    if not data.startswith(SOI + b"\xff"):
        return None
    try:
        space = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError:
        return None
    if space not in SPACES or _turned(data):
        return None
    rgb = _decoded(data, space)
    if rgb is None:
        return None
    return np.repeat(rgb, 3, axis=2) if space == "Gray" else rgb


def check_stream(data: bytes) -> bool:
    """Raise ValueError (libjpeg-turbo's message) where the 8-bit JPEG stream ``data`` holds a damaged scan
    (:data:`DAMAGE`), which other decoders fill in without an error; its pixels are decoded and left. Returns
    whether it checked the stream: one this does not decode (not 8-bit, CMYK, not a JPEG) passes unchecked."""
    import simplejpeg

    try:
        space = simplejpeg.decode_jpeg_header(data)[2]
    except ValueError as exc:
        if str(exc).startswith(DAMAGE):
            raise
        return False
    return space in SPACES and _decoded(data, space) is not None


# Put before a stream's end marker by :func:`ends_early`: bytes that are not a marker (no 0xFF), and not zeros,
# which libjpeg-turbo takes for the data a scan lacks.
FILLER = b"\x5a" * 16


def ends_early(data: bytes) -> bool:
    """Whether the scan of the JPEG stream ``data`` ends before its last block, at any precision and lossless too,
    where :func:`check_stream` reads 8 bits only. libjpeg-turbo 3 (through imagecodecs, which drops the warning that
    would say so) decodes the stream as it is and with :data:`FILLER` before its end marker: a whole scan leaves
    those bytes unread, one that ends early decodes them as its missing blocks, and its pixels change. Both decodes
    come from one decoder, so its rounding (a lossy IDCT's) cannot differ. False for a stream it does not decode."""
    import imagecodecs

    end = data.rfind(EOI)
    if end < 0 or data[end + 2 :].strip(b"\x00"):  # cut with its end marker: the filler goes last
        end = len(data)
    body = data[:end].rstrip(b"\xff")  # 0xFF fill bytes may precede a marker; the filler goes before them
    try:
        as_is = imagecodecs.jpeg8_decode(data)
    except Exception:
        return False
    try:
        filled = imagecodecs.jpeg8_decode(body + FILLER + data[end:])
    except Exception:
        return True  # the filler read as data, and that data went wrong
    return not np.array_equal(as_is, filled)


# CharLS's errors for a JPEG-LS stream cut short or out of step, after its ``... returned``
DAMAGE_LS = (
    "Invalid JPEG-LS stream, the encoded bit stream contains a general structural problem",
    "The source buffer is too small, more input data was expected",
    "Invalid JPEG-LS stream: segment size of a marker segment is invalid",
)


def check_jpegls(data: bytes) -> None:
    """Raise ValueError (CharLS's words) where the JPEG-LS stream ``data`` is cut short or out of step. CharLS
    (through imagecodecs) refuses it, and so does pydicom's first plugin (pyjpegls, CharLS too), but pydicom then
    asks its next (pylibjpeg's libjpeg), which decodes it into wrong rows without a word. CharLS's other errors
    pass: pydicom's plugins answer for those."""
    import imagecodecs

    try:
        imagecodecs.jpegls_decode(data)
    except Exception as exc:
        why = str(exc).split(" returned ", 1)[-1]
        if why.startswith(DAMAGE_LS):
            raise ValueError(why) from None


def _decoded(data: bytes, space: str) -> np.ndarray | None:
    """``data`` of colour ``space`` (one of :data:`SPACES`) decoded by libjpeg-turbo, grey or RGB, the warnings of
    a damaged scan raised (ValueError); None where it reads the stream only with another warning, or not at all."""
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(data, colorspace="GRAY" if space == "Gray" else "RGB", strict=True)
    except ValueError as exc:
        if str(exc).startswith(DAMAGE):
            raise
        return None


def _turned(data: bytes) -> bool:
    """Whether the file's EXIF orientation turns or mirrors it (OpenCV applies it)."""
    import io
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():  # a large picture's header is read, not its pixels
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                return im.getexif().get(ORIENTATION, 1) != 1
    except Exception:
        return True  # a header Pillow does not read (or one it refuses as too large): OpenCV decides
