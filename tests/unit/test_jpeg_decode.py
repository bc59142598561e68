"""The direct path's strict JPEG decoding (:mod:`ingest.jpeg_decode`): a TIFF page's streams decode to tifffile's
pixels in the colour space the page names, with its shared tables, and each libjpeg-turbo warning is an error."""

from types import SimpleNamespace

import imagecodecs
import numpy as np
import pytest

from ingest.jpeg_decode import StrictJpeg
from ingest.synthetic import slide_array

IMAGE = slide_array(256, "CE", np.random.default_rng(1))[:64, :128]


def _segments(stream: bytes) -> list[bytes]:
    """The segments before the scan (each with its marker), then the rest from the scan's marker on."""
    out, pos = [stream[:2]], 2
    while stream[pos + 1] != 0xDA:
        size = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        out.append(stream[pos : pos + 2 + size])
        pos += 2 + size
    return [*out, stream[pos:]]


def _bare(stream: bytes, ids: bytes) -> bytes:
    """``stream`` without its JFIF and Adobe segments, its components named ``ids``: nothing in it says its colour
    space, as in a TIFF whose photometric interpretation does."""
    kept = [s for s in _segments(stream) if s[:2] not in (b"\xff\xe0", b"\xff\xee")]
    for i, s in enumerate(kept):
        named = bytearray(s)
        if s[1] == 0xC0:  # the frame: per component its id, sampling and table, from byte 10
            named[10], named[13], named[16] = ids
        elif s[1] == 0xDA:  # the scan: per component its id and tables, from byte 5
            named[5], named[7], named[9] = ids
        kept[i] = bytes(named)
    return b"".join(kept)


def _off(decoded: np.ndarray) -> float:
    """Mean difference from the image encoded: a few levels of JPEG's loss, tens in the wrong colour space."""
    return float(np.abs(decoded.astype(int) - IMAGE).mean())


def test_a_page_decodes_in_the_colour_space_its_photometric_interpretation_names_as_tifffile_decodes_it():
    # RGB samples, the components named 1, 2, 3: libjpeg alone would take them for YCbCr
    rgb = _bare(imagecodecs.jpeg8_encode(IMAGE, level=95, outcolorspace="rgb"), b"\x01\x02\x03")
    tifffile_rgb = imagecodecs.jpeg8_decode(rgb, colorspace="RGB", outcolorspace="RGB")  # tifffile's, photometric 2
    assert np.array_equal(StrictJpeg(None, 2).decode(rgb), tifffile_rgb)
    assert _off(tifffile_rgb) < 6 and _off(imagecodecs.jpeg8_decode(rgb)) > 20  # what the stream alone says
    # YCbCr samples, the components named R, G, B: libjpeg alone would take them for RGB
    ycc = _bare(imagecodecs.jpeg8_encode(IMAGE, level=95), b"RGB")
    tifffile_ycc = imagecodecs.jpeg8_decode(ycc, colorspace="YCBCR", outcolorspace="RGB")  # photometric 6
    assert np.array_equal(StrictJpeg(None, 6).decode(ycc), tifffile_ycc)
    assert _off(tifffile_ycc) < 6 and _off(imagecodecs.jpeg8_decode(ycc)) > 20
    # a stream's own JFIF segment says YCbCr whatever the page says, to libjpeg through tifffile as here
    jfif = imagecodecs.jpeg8_encode(IMAGE, level=95)
    assert np.array_equal(StrictJpeg(None, 2).decode(jfif), imagecodecs.jpeg8_decode(jfif))
    grey = imagecodecs.jpeg8_encode(np.ascontiguousarray(IMAGE[..., 1]), level=95)
    assert np.array_equal(StrictJpeg(None, 1).decode(grey)[..., 0], imagecodecs.jpeg8_decode(grey))


def test_a_pages_shared_tables_complete_each_tiles_stream():
    """Aperio's tiles hold no tables: the page's JPEGTables (SOI, the tables, EOI) do."""
    full = imagecodecs.jpeg8_encode(IMAGE, level=90)
    parts = _segments(full)
    shared = [s for s in parts[1:-1] if s[:2] in (b"\xff\xdb", b"\xff\xc4")]  # quantisation and Huffman tables
    tables = b"\xff\xd8" + b"".join(shared) + b"\xff\xd9"
    tile = b"".join(s for s in parts if s not in shared)
    assert np.array_equal(StrictJpeg(tables, 6).decode(tile), imagecodecs.jpeg8_decode(full))
    with pytest.raises(ValueError):
        StrictJpeg(None, 6).decode(tile)  # no tables: libjpeg-turbo cannot decode it
    with pytest.raises(ValueError, match="not a JPEG stream of tables"):
        StrictJpeg(tables[2:], 6)


def test_each_warning_of_libjpeg_turbo_is_an_error():
    full = imagecodecs.jpeg8_encode(IMAGE, level=90)
    scan = full.index(b"\xff\xda") + 14  # past the scan's header
    half = (scan + len(full)) // 2
    cut = full[:half] + b"\xff\xd9"  # the scan ends early, its end marker in place
    assert imagecodecs.jpeg8_decode(cut).shape == IMAGE.shape  # decoded without a word: its lower part grey
    with pytest.raises(ValueError, match="premature end of data segment"):
        StrictJpeg(None, 6).decode(cut)
    over = full[:-2] + bytes(range(1, 41)) + b"\xff\xd9"  # bytes after the last block
    with pytest.raises(ValueError, match="extraneous bytes before marker 0xd9"):
        StrictJpeg(None, 6).decode(over)
    with pytest.raises(ValueError, match="does not start with SOI"):
        StrictJpeg(None, 6).decode(bytes(100))
    assert np.array_equal(StrictJpeg(None, 6).decode(full), imagecodecs.jpeg8_decode(full))


@pytest.mark.parametrize(
    "page, decodes",
    [
        (dict(), True),
        (dict(compression=6), False),  # old-style JPEG: tifffile's
        (dict(photometric=5, samplesperpixel=4), False),  # CMYK
        (dict(photometric=1), False),  # grey named, three samples stored
        (dict(bitspersample=12), False),
        (dict(jpegtables=b"\x00\x01"), False),  # tables that are no stream
        (dict(jpegheader=b"\xff\xd8"), False),  # NDPI's: one header for every strip
    ],
)
def test_pages_it_does_not_decode_as_tifffile_does_are_left_to_tifffile(page, decodes):
    base = dict(compression=7, photometric=6, samplesperpixel=3, bitspersample=8, jpegtables=None, jpegheader=None)
    assert (StrictJpeg.of(SimpleNamespace(**(base | page))) is not None) == decodes


def test_an_image_file_is_left_to_opencv_where_it_would_decode_otherwise():
    """:func:`ingest.jpeg_decode.decode_file` decodes an image file's plain JPEG (``ingest.images.decode_rgb``);
    OpenCV turns one by its EXIF orientation and converts CMYK, and reads what is not a JPEG."""
    import io

    import cv2
    from PIL import Image

    from ingest.jpeg_decode import decode_file

    def saved(image: Image.Image, fmt: str = "JPEG", **options) -> bytes:
        buf = io.BytesIO()
        image.save(buf, fmt, **options)
        return buf.getvalue()

    plain = Image.fromarray(IMAGE)
    assert np.array_equal(decode_file(saved(plain)), imagecodecs.jpeg8_decode(saved(plain)))
    upright = Image.Exif()
    upright[0x0112] = 1
    assert decode_file(saved(plain, exif=upright.tobytes())) is not None
    turned = Image.Exif()
    turned[0x0112] = 6
    assert decode_file(saved(plain, exif=turned.tobytes())) is None
    assert decode_file(saved(plain.convert("CMYK"))) is None
    assert decode_file(cv2.imencode(".png", IMAGE)[1].tobytes()) is None
    assert decode_file(b"\xff\xd8\xff\xe0 not really a jpeg") is None  # OpenCV says it cannot decode it


def _streams() -> dict[str, bytes]:
    """Whole JPEG streams of every kind :func:`ingest.jpeg_decode.ends_early` checks: lossless at 8 to 16 bits with
    each predictor, 12-bit lossy, RGB, and an 8-bit one with restart markers (Pillow writes them)."""
    import io

    from PIL import Image

    grey = IMAGE[..., 0].astype(np.uint16) * 16 + np.arange(128, dtype=np.uint16)  # 12 bits
    out = {f"lossless {bits}-bit predictor {p}": imagecodecs.jpeg8_encode(
        (grey >> (12 - bits) if bits <= 12 else grey << (bits - 12)).astype(np.uint8 if bits == 8 else np.uint16),
        lossless=True, predictor=p, bitspersample=bits,
    ) for bits in (8, 12, 16) for p in range(1, 8)}  # fmt: skip
    out["lossy 12-bit"] = imagecodecs.jpeg8_encode(grey, level=90, bitspersample=12)
    out["lossless RGB"] = imagecodecs.jpeg8_encode(IMAGE, lossless=True)
    buf = io.BytesIO()
    Image.fromarray(IMAGE).save(buf, "JPEG", restart_marker_blocks=5)
    out["restart markers"] = buf.getvalue()
    return out


def test_a_scan_that_ends_early_is_told_at_any_precision_and_a_whole_one_is_not():
    """Each stream cut at ten places in its scan, with its end marker put back or not, ends early; whole, it does
    not, with 0xFF fill bytes before its end marker or a DICOM frame's even-length pad after it."""
    from ingest.jpeg_decode import EOI, ends_early

    for name, stream in _streams().items():
        assert stream.count(b"\xff\xdd") == (name == "restart markers")  # the restart interval's segment
        assert not ends_early(stream), name
        assert not ends_early(stream[:-2] + b"\xff\xff" + EOI + b"\x00"), name
        scan = stream.rindex(b"\xff\xda")
        for at in np.linspace(scan + 20, len(stream) - 6, 10).astype(int):  # the last byte may be padding
            assert ends_early(stream[:at] + EOI), (name, at)
            assert ends_early(stream[:at]), (name, at)
    assert not ends_early(b"\xff\xd8 not a jpeg" + EOI)  # undecodable: left to its own decoder


def test_a_jpeg_ls_stream_cut_short_is_refused_and_a_whole_one_is_not():
    """:func:`ingest.jpeg_decode.check_jpegls`: lossless and near-lossless, 8 to 16 bits, grey and RGB; each cut at
    ten places, its end marker put back, raises CharLS's words; what is not JPEG-LS passes. (Cut without its end
    marker, CharLS may take seconds to refuse a stream, pydicom's first plugin alike: not repeated here.)"""
    from ingest.jpeg_decode import EOI, check_jpegls

    grey = IMAGE[..., 0].astype(np.uint16) * 16 + np.arange(128, dtype=np.uint16)
    streams = [imagecodecs.jpegls_encode(a, level=near) for near in (0, 3)
               for a in (grey.astype(np.uint8), grey, grey << 4, IMAGE)]  # fmt: skip
    for stream in streams:
        check_jpegls(stream)
        check_jpegls(stream + b"\x00")  # a DICOM frame's even-length pad
        for at in np.linspace(20, len(stream) - 3, 10).astype(int):
            with pytest.raises(ValueError, match=r"JPEG-LS stream|more input data was expected"):
                check_jpegls(stream[:at] + EOI)
    check_jpegls(b"\xff\xd8 not a JPEG-LS stream" + EOI)
