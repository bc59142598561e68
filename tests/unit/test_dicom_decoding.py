"""Every transfer syntax decodes to the uncompressed pixels; MONOCHROME1, padding, multi-frame and odd files."""

from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)

from ingest.dicom import (
    DicomError,
    header_in_prefix,
    read_frame,
    read_frames,
    read_headers,
    render,
    rescale,
    slice_rgb,
)
from ingest.synthetic import SyntheticPatient, ct_slice_dataset, enhanced_ct_dataset
from ingest.windowing import PADDING_HU, to_hu, window_stack

PATIENT = SyntheticPatient("DOE^JANE", "PID-1", "19700101")


def _ct(size=64, seed=0):
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 2400, (size, size)).astype(np.int16)  # HU -1024..1375
    return stored, ct_slice_dataset(stored, PATIENT, generate_uid(), generate_uid(), 0)


def _encapsulated(ds, frame: bytes, uid, bits: int):
    ds.file_meta.TransferSyntaxUID = uid
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds.PixelRepresentation = 0
    return ds


@pytest.mark.parametrize("uid", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_codecs_pydicom_writes_decode_exactly(tmp_path, uid):
    stored, ds = _ct()
    ds.compress(uid)
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    _, pixels = read_frames(str(tmp_path / "x.dcm"))
    assert np.array_equal(pixels[0], stored)


def test_jpeg_lossless_and_deflated_decode_exactly(tmp_path):
    stored, ds = _ct()
    unsigned = stored.astype(np.uint16)
    ds = _encapsulated(ds, imagecodecs.ljpeg_encode(unsigned), JPEGLosslessSV1, 12)
    ds.save_as(tmp_path / "ljpeg.dcm", enforce_file_format=True)
    assert np.array_equal(read_frames(str(tmp_path / "ljpeg.dcm"))[1][0], unsigned)
    stored, ds = _ct(seed=1)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(tmp_path / "dfl.dcm", enforce_file_format=True)
    assert np.array_equal(read_frames(str(tmp_path / "dfl.dcm"))[1][0], stored)


@pytest.mark.parametrize(("uid", "bits"), [(JPEGBaseline8Bit, 8), (JPEGExtended12Bit, 12)])
def test_lossy_jpeg_decodes_as_libjpeg_does(tmp_path, uid, bits):
    stored, ds = _ct()
    pixels = (stored // 16).astype(np.uint8) if bits == 8 else stored.astype(np.uint16)
    data = imagecodecs.jpeg8_encode(pixels, level=95, bitspersample=bits)
    ds = _encapsulated(ds, data, uid, bits)
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.save_as(tmp_path / "lossy.dcm", enforce_file_format=True)
    got = read_frames(str(tmp_path / "lossy.dcm"))[1][0]
    # Lossy decoders may differ by one level in the IDCT; pydicom's plugin agrees with libjpeg-turbo to that.
    assert np.abs(got.astype(int) - imagecodecs.jpeg8_decode(data).astype(int)).max() <= 1
    assert np.abs(got.astype(int) - pixels).mean() < 0.02 * 2**bits  # and close to the original (noise, q95)


def _cut(stream: bytes) -> bytes:
    """``stream`` with its scan ended half-way, its end marker in place (a writer stopped early)."""
    scan = stream.index(b"\xff\xda") + 14  # past the scan's header
    return stream[: (scan + len(stream)) // 2] + b"\xff\xd9"


def test_a_jpeg_frame_whose_scan_ends_early_fails_its_slice_where_pydicom_decodes_it(tmp_path):
    """pydicom's plugins decode a JPEG Baseline frame whose scan stops half-way (its end marker in place) with the
    rest grey, without a word: the slice is refused naming the frame and libjpeg-turbo's warning, whole file or
    frame by frame; the file's other frames are read. 8-bit frames under JPEG Extended's syntax too."""
    stored, ds = _ct()
    frames = [imagecodecs.jpeg8_encode(((stored + 100 * i) // 16).astype(np.uint8), level=90) for i in range(3)]
    single = _encapsulated(ds, _cut(frames[0]), JPEGBaseline8Bit, 8)
    single.BitsAllocated = 8
    single.save_as(tmp_path / "cut.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "cut.dcm").pixel_array.shape == stored.shape  # decoded, half grey
    damaged = "frame 0: damaged JPEG data: Corrupt JPEG data: premature end of data segment"
    with pytest.raises(DicomError, match=damaged):
        read_frames(str(tmp_path / "cut.dcm"))
    with pytest.raises(DicomError, match=damaged):
        slice_rgb(str(tmp_path / "cut.dcm"))
    # a file of three frames, the second cut: that frame fails alone, read by itself or with the file
    multi = _encapsulated(_ct()[1], frames[0], JPEGBaseline8Bit, 8)
    multi.BitsAllocated, multi.NumberOfFrames = 8, 3
    multi.PixelData = encapsulate([frames[0], _cut(frames[1]), frames[2]])
    multi.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    whole = pydicom.dcmread(tmp_path / "multi.dcm").pixel_array
    for i in (0, 2):
        assert np.array_equal(read_frame(str(tmp_path / "multi.dcm"), i)[1], whole[i])
    with pytest.raises(DicomError, match="frame 1: damaged JPEG data: Corrupt JPEG data: premature end"):
        read_frame(str(tmp_path / "multi.dcm"), 1)
    with pytest.raises(DicomError, match="frame 1: damaged JPEG data"):
        read_frames(str(tmp_path / "multi.dcm"))
    # an 8-bit frame under JPEG Extended's syntax is checked alike
    extended = _encapsulated(_ct()[1], _cut(frames[2]), JPEGExtended12Bit, 8)
    extended.BitsAllocated = 8
    extended.save_as(tmp_path / "extended.dcm", enforce_file_format=True)
    with pytest.raises(DicomError, match=damaged):
        read_frames(str(tmp_path / "extended.dcm"))
    # the intact file passes
    multi.PixelData = encapsulate(frames)
    multi.save_as(tmp_path / "whole.dcm", enforce_file_format=True)
    assert read_frames(str(tmp_path / "whole.dcm"))[1].shape == (3, *stored.shape)


@pytest.mark.parametrize(
    ("uid", "encode", "exact"),
    [(JPEGExtended12Bit, dict(level=90), False), (JPEGLosslessSV1, dict(lossless=True), True),
     (JPEGLossless, dict(lossless=True, predictor=7), True), (JPEGLSLossless, dict(level=0), True),
     (JPEGLSNearLossless, dict(level=2), False)],
)  # fmt: skip
def test_a_12_bit_lossless_or_jpeg_ls_frame_cut_short_fails_its_slice(tmp_path, uid, encode, exact):
    """Frames simplejpeg does not read (12-bit JPEG Extended, lossless JPEG of a CT's 12 bits) are checked by
    decoding them again with bytes before their end marker (``ingest.jpeg_decode.ends_early``), JPEG-LS frames by
    CharLS's current decoder (``check_jpegls``): a cut frame fails its slice, read whole or frame by frame, where
    pydicom decodes it without a word."""
    stored, ds = _ct()
    codec = imagecodecs.jpegls_encode if uid in (JPEGLSLossless, JPEGLSNearLossless) else imagecodecs.jpeg8_encode
    options = encode if codec is imagecodecs.jpegls_encode else encode | {"bitspersample": 12}
    frames = [codec((stored + 100 * i).astype(np.uint16), **options) for i in range(3)]
    multi = _encapsulated(ds, frames[0], uid, 12)
    multi.NumberOfFrames = 3
    multi.PixelData = encapsulate([frames[0], _cut(frames[1]), frames[2]])
    multi.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "multi.dcm").pixel_array.shape == (3, *stored.shape)  # decoded, no word
    damaged = "frame 1: damaged JPEG data: " + ("Invalid JPEG-LS stream" if codec is imagecodecs.jpegls_encode
                                                else "its scan ends before its last block")  # fmt: skip
    with pytest.raises(DicomError, match=damaged):
        read_frames(str(tmp_path / "multi.dcm"))
    with pytest.raises(DicomError, match=damaged):
        read_frame(str(tmp_path / "multi.dcm"), 1)
    for i in (0, 2):
        pixels = read_frame(str(tmp_path / "multi.dcm"), i)[1]
        assert np.array_equal(pixels, stored + 100 * i) if exact else np.abs(pixels - stored - 100 * i).max() < 64


@pytest.mark.parametrize("uid", [JPEG2000Lossless, HTJ2KLossless, RLELossless])
def test_a_frame_cut_short_fails_its_slice_in_the_other_compressed_syntaxes(tmp_path, uid):
    """JPEG 2000, HTJ2K and RLE frames cut short (a JPEG 2000 code stream may be cut at a layer's end by design)
    are refused by pydicom's decoders themselves: kept so, as a newer decoder might read them leniently."""
    stored, ds = _ct()
    unsigned = stored.astype(np.uint16)
    frames = [imagecodecs.htj2k_encode(unsigned + i, reversible=True) for i in range(2)] if uid == HTJ2KLossless else []
    if not frames:
        for i in range(2):
            one = _ct()[1]
            one.PixelRepresentation, one.PixelData = 0, (unsigned + i).tobytes()
            one.compress(uid)
            frames.append(next(generate_frames(one.PixelData, number_of_frames=1)))
    multi = _encapsulated(ds, frames[0], uid, 16)
    multi.NumberOfFrames = 2
    multi.PixelData = encapsulate([frames[0], frames[1][: len(frames[1]) // 2]])
    multi.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    assert np.array_equal(read_frame(str(tmp_path / "multi.dcm"), 0)[1], unsigned)
    with pytest.raises(DicomError, match="frame 1 could not be decoded"):
        read_frame(str(tmp_path / "multi.dcm"), 1)
    with pytest.raises(DicomError, match="pixel data could not be decoded"):
        read_frames(str(tmp_path / "multi.dcm"))


@pytest.mark.parametrize(
    "name",
    ["SC_rgb_jpeg_gdcm.dcm", "JPGExtended.dcm", "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm",
     "SC_rgb_jls_lossy_line.dcm", "SC_rgb_jls_lossy_sample.dcm"],
)  # fmt: skip
def test_other_writers_lossless_12_bit_and_jpeg_ls_files_pass_the_check(name):
    """Files pydicom ships, written by other software (GDCM's lossless RGB, a 12-bit JPEG Extended CT, near-lossless
    JPEG-LS of 8 and 16 bits, grey and RGB; ``MR_small_jpeg_ls_lossless.dcm`` above): whole, they pass, with the
    pixels pydicom decodes."""
    path = get_testdata_file(name)
    assert np.array_equal(read_frames(path)[1][0], pydicom.dcmread(path).pixel_array)


@pytest.mark.parametrize(
    "name",
    ["MR_small_bigendian.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm", "MR_small_jp2klossless.dcm",
     "MR_small_jpeg_ls_lossless.dcm", "MR_small_expb.dcm"],
)  # fmt: skip
def test_files_shipped_with_pydicom_match_the_uncompressed_original(name):
    reference = read_frames(get_testdata_file("MR_small.dcm"))[1]
    assert np.array_equal(read_frames(get_testdata_file(name))[1], reference)


def test_a_palette_colour_image_is_shown_through_its_colour_table(tmp_path):
    """An ultrasound frame of PALETTE COLOR (pydicom's example, 16-bit table entries) was rendered as grey
    indices; it is its table's colours, scaled to 8 bits, read whole or frame by frame."""
    from pydicom.pixels import apply_color_lut

    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "PALETTE COLOR" and ds.pixel_array.ndim == 2
    rgb = slice_rgb(path)
    assert np.array_equal(rgb, (apply_color_lut(ds.pixel_array, ds) >> 8).astype(np.uint8))
    assert not np.array_equal(rgb[..., 0], rgb[..., 2])  # colours, not grey
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData + bytes(255 - np.frombuffer(ds.PixelData, np.uint8))
    ds.save_as(tmp_path / "two.dcm")
    second = (apply_color_lut(pydicom.dcmread(tmp_path / "two.dcm").pixel_array[1], ds) >> 8).astype(np.uint8)
    assert np.array_equal(slice_rgb(str(tmp_path / "two.dcm"), frame=1), second)


def test_a_16_bit_colour_image_keeps_its_top_8_bits(tmp_path):
    """RGB of 16 stored bits (pydicom's example, given a ramp) was cast to 8 bits, keeping each value's lowest
    byte: a ramp became a sawtooth. Its top byte is kept; 8-bit colour is as it was."""
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle_16bit.dcm"))
    ds.decompress()
    ramp = np.broadcast_to(np.linspace(0, 65535, ds.Columns).astype(np.uint16)[None, :, None], (ds.Rows, ds.Columns, 3))
    ds.PixelData = np.ascontiguousarray(ramp).tobytes()
    ds.save_as(tmp_path / "rgb16.dcm")
    assert np.array_equal(slice_rgb(str(tmp_path / "rgb16.dcm")), (ramp >> 8).astype(np.uint8))
    eight = get_testdata_file("SC_rgb_rle.dcm")
    assert np.array_equal(slice_rgb(eight), pydicom.dcmread(eight).pixel_array)


def test_hu_windows_are_exact_and_padding_is_air(tmp_path):
    stored = np.array([[0, 1024, 1064, 1104], [1144, 3424, 2000, 30]], np.int16)  # HU -1024, 0, 40, 80, 120...
    ds = ct_slice_dataset(stored, PATIENT, generate_uid(), generate_uid(), 0)
    rgb = render(ds, stored)
    assert np.array_equal(rgb, window_stack(to_hu(stored, 1, -1024)))
    # 40 HU: brain 40/80 -> 127.5, subdural 80/200 -> 76.5, soft 40/380 -> 127.5 (rounded half to even)
    assert rgb[0, 2].tolist() == [128, 76, 128]
    ds.PixelPaddingValue = 30
    padded = render(ds, stored)
    assert padded[1, 3].tolist() == window_stack(np.full((1, 1), PADDING_HU, np.float32))[0, 0].tolist() == [0, 0, 0]
    assert np.array_equal(padded[0], rgb[0])


def test_a_slice_stored_wrapped_as_rsnas_renders_as_it_does_stored_right(tmp_path):
    """An RSNA slice whose header calls its 12-bit two's complement values unsigned (intercept 0): its header says
    so, and it renders as the same slice stored right, air black, where read as the header says air is bone."""
    stored, right = _ct()
    wrapped = ct_slice_dataset(stored, PATIENT, generate_uid(), generate_uid(), 0, wrapped=True)
    right.save_as(tmp_path / "right.dcm", enforce_file_format=True)
    wrapped.save_as(tmp_path / "wrapped.dcm", enforce_file_format=True)
    assert [h.wrapped for h in read_headers(tmp_path / "right.dcm")[0]] == [False]
    assert [h.wrapped for h in read_headers(tmp_path / "wrapped.dcm")[0]] == [True]
    rgb = slice_rgb(str(tmp_path / "wrapped.dcm"))
    assert np.array_equal(rgb, slice_rgb(str(tmp_path / "right.dcm")))
    air = stored < 24  # below -1000 HU
    raw = pydicom.dcmread(tmp_path / "wrapped.dcm").pixel_array
    assert air.any() and (rgb[air] == 0).all() and (window_stack(to_hu(raw, 1, 0))[air] == 255).all()


def test_an_enhanced_ct_file_of_wrapped_values_is_read_frame_by_frame_as_stored_right(tmp_path):
    """The fault in a multi-frame file: each frame's header says so from its functional groups' intercept, and
    each frame, decoded alone (its pixel module only), renders as the file stored right renders it."""
    volume = np.random.default_rng(1).integers(0, 2400, (3, 16, 16)).astype(np.int16)
    right = enhanced_ct_dataset(volume, PATIENT, generate_uid(), generate_uid())
    right.save_as(tmp_path / "right.dcm", enforce_file_format=True)
    wrapped = enhanced_ct_dataset(volume, PATIENT, generate_uid(), generate_uid())
    wrapped.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleIntercept = 0
    wrapped.BitsStored, wrapped.HighBit, wrapped.PixelRepresentation = 12, 11, 0
    wrapped.PixelData = ((volume.astype(np.int32) - 1024) & 0xFFF).astype(np.uint16).tobytes()
    wrapped.save_as(tmp_path / "wrapped.dcm", enforce_file_format=True)
    headers, _ = read_headers(tmp_path / "wrapped.dcm")
    assert [h.wrapped for h in headers] == [True] * 3
    assert not any(h.wrapped for h in read_headers(tmp_path / "right.dcm")[0])
    for h in headers:
        got = slice_rgb(str(tmp_path / "wrapped.dcm"), frame=h.frame, hu=h.rescale)
        assert np.array_equal(got, slice_rgb(str(tmp_path / "right.dcm"), frame=h.frame, hu=(1.0, -1024.0)))


def test_monochrome1_is_inverted_so_bright_means_high_signal():
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    pixels = ds.pixel_array
    normal = render(ds, pixels)
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(render(ds, pixels), 255 - normal)


def test_multi_frame_file_gives_one_header_and_one_image_per_frame(tmp_path):
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    headers, reason = read_headers(path)
    assert reason is None and [h.frame for h in headers] == [0, 1]
    _, frames = read_frames(path)
    assert frames.shape[0] == 2
    assert np.array_equal(slice_rgb(path, frame=1), frames[1])


def test_truncated_and_non_image_files_are_reasons_not_crashes(tmp_path):
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    assert read_headers(str(junk)) == ([], "not a DICOM file")
    assert read_headers(get_testdata_file("rtplan.dcm"))[1] == "DICOM object without an image (modality RTPLAN)"
    headers, _ = read_headers(get_testdata_file("MR_truncated.dcm"))
    assert headers, "a truncated file still has a header; its pixels fail when read"
    from ingest.dicom import DicomError

    with pytest.raises(DicomError, match="pixel data could not be decoded"):
        slice_rgb(get_testdata_file("MR_truncated.dcm"))


def test_a_header_value_of_the_wrong_form_costs_its_file_at_most(tmp_path):
    """pydicom's test files hold a frame count of ``'1A'``: that file is skipped with the reason (it stopped the
    whole run's planning before). An instance number of that form only loses the slice its number: it is
    ordered by its position."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's own, on the invalid value
        headers, reason = read_headers(get_testdata_file("badVR.dcm"))
        assert headers == [] and reason == (
            "a DICOM header Tessera cannot use: ValueError: invalid literal for int() with base 10: '1A'"
        )
        _, ds = _ct()
        ds.InstanceNumber = 9
        ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
        data = (tmp_path / "odd.dcm").read_bytes()
        element = b"\x20\x00\x13\x00IS\x02\x00"  # (0020,0013) InstanceNumber, explicit VR little endian
        (tmp_path / "odd.dcm").write_bytes(data.replace(element + b"9 ", element + b"1A"))  # pydicom writes none such
        (header,), reason = read_headers(tmp_path / "odd.dcm")
    assert reason is None and header.instance is None and header.position == [0.0, 0.0, 0.0]


def test_header_read_from_a_file_prefix_or_the_whole_file(tmp_path, monkeypatch):
    """An object-store header pass reads the first bytes only when they hold the whole header; a header larger
    than the prefix (here a 100 kB private value) falls back to the whole file. Both give the same header."""
    import ingest.plan as plan
    from shards import storage

    small, large = tmp_path / "small.dcm", tmp_path / "large.dcm"
    _ct(64)[1].save_as(small, enforce_file_format=True)
    ds = _ct(64)[1]
    ds.add_new(0x00091010, "OB", b"\0" * 100_000)  # a private blob before the pixels
    ds.save_as(large, enforce_file_format=True)
    prefix = large.read_bytes()[: plan.HEADER_BYTES]
    assert not header_in_prefix(prefix, complete=False)
    whole_small = small.read_bytes()
    assert header_in_prefix(whole_small[:4096], complete=False)  # the pixel data starts within 4 kB

    reads: list[int | None] = []

    def fake_get(url, length=None):
        reads.append(length)
        data = (small if "small" in url else large).read_bytes()
        return data[:length] if length else data

    monkeypatch.setattr(storage, "get_bytes", fake_get)
    monkeypatch.setattr(storage, "get_file", lambda url, local: Path(local).write_bytes(fake_get(url)) and local)
    for name in ("small", "large"):
        found, reason = plan.source_headers(f"s3://b/{name}.dcm")
        direct, _ = read_headers(tmp_path / f"{name}.dcm")
        assert reason is None and found[0].path == f"s3://b/{name}.dcm"
        assert found[0].sop_uid == direct[0].sop_uid and found[0].position == direct[0].position
    assert reads == [plan.HEADER_BYTES, plan.HEADER_BYTES, None]  # only the large header needed the whole file


def test_an_enhanced_ct_frame_is_windowed_in_hu_from_its_functional_groups(tmp_path):
    """Enhanced CT keeps the rescale to HU in its functional groups (a frame's own before the shared ones), not at
    the top level: each frame renders as the same slice stored as a single-frame CT does, with the rescale the
    header pass read (as ingest renders it) or read with the frame."""
    rng = np.random.default_rng(4)
    volume = rng.integers(0, 2400, (3, 32, 32)).astype(np.int16)
    ds = enhanced_ct_dataset(volume, PATIENT, generate_uid(), generate_uid())
    own = pydicom.Dataset()
    own.RescaleIntercept, own.RescaleSlope = -2048, 2  # frame 1's own: HU = 2 * stored - 2048
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = [own]
    path = str(tmp_path / "enhanced.dcm")
    ds.save_as(path, enforce_file_format=True)
    headers, reason = read_headers(path)
    assert reason is None and [h.frame for h in headers] == [0, 1, 2]
    assert [h.position for h in headers] == [[0.0, 0.0, 5.0 * k] for k in range(3)]
    assert [h.rescale for h in headers] == [(1.0, -1024.0), (2.0, -2048.0), (1.0, -1024.0)]
    for k in range(3):
        single = ct_slice_dataset(volume[k], PATIENT, generate_uid(), generate_uid(), k)
        single.RescaleSlope, single.RescaleIntercept = headers[k].rescale
        expected = render(single, volume[k])
        assert np.array_equal(slice_rgb(path, frame=k, hu=headers[k].rescale), expected) and expected.std() > 0
        assert np.array_equal(slice_rgb(path, frame=k), expected)
    assert rescale(ct_slice_dataset(volume[0], PATIENT, "1.2", "1.3", 0)) == (1.0, -1024.0)  # top level
    assert read_headers(get_testdata_file("SC_rgb_rle_2frame.dcm"))[0][0].rescale is None  # no functional groups


def test_a_multi_frame_ct_without_functional_groups_is_windowed_with_its_files_rescale(tmp_path):
    """A multi-frame CT of the older kind (rescale at the top level, no functional groups): each frame in HU
    windows, not as grey MR; the header pass records the rescale per frame (so a series ingested before is told
    apart by its fingerprint)."""
    rng = np.random.default_rng(6)
    volume = rng.integers(0, 2400, (3, 16, 16)).astype(np.int16)
    ds = ct_slice_dataset(volume[0], PATIENT, generate_uid(), generate_uid(), 0)
    ds.NumberOfFrames, ds.PixelData = 3, volume.tobytes()
    path = str(tmp_path / "legacy.dcm")
    ds.save_as(path, enforce_file_format=True)
    headers, _ = read_headers(path)
    assert [h.rescale for h in headers] == [(1.0, -1024.0)] * 3 and [h.frame for h in headers] == [0, 1, 2]
    for k in range(3):
        expected = render(ct_slice_dataset(volume[k], PATIENT, "1.2", "1.3", k), volume[k])
        assert np.array_equal(slice_rgb(path, frame=k, hu=headers[k].rescale), expected)
        assert np.array_equal(slice_rgb(path, frame=k), expected) and expected.std() > 0
    mr, _ = read_headers(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    assert {h.rescale for h in mr} == {None}  # not CT: nothing to record
