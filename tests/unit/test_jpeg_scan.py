"""The markers amid a JPEG tile's scan (ingest.jpeg_scan), on streams Pillow's libjpeg writes, spoiled by hand."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from ingest.jpeg_scan import PageScans, scan_is_clean

RESTART = re.compile(rb"\xff[\xd0-\xd7]")


def _jpeg(shape=(130, 250, 3), **options) -> bytes:
    """A noisy image (every byte value in its scan, stuffed 0xFF among them) as Pillow writes it (4:2:0 at 90)."""
    pixels = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90, **options)
    return out.getvalue()


def _scan_start(data: bytes) -> int:
    at = data.index(b"\xff\xda")
    return at + 2 + int.from_bytes(data[at + 2 : at + 4], "big")


@pytest.mark.parametrize(
    "options, restarts",
    [
        ({}, 0),
        ({"restart_marker_blocks": 3}, 47),  # 16 x 9 MCUs of 16 px (4:2:0), one interval per 3: 48 intervals
        ({"restart_marker_rows": 1}, 8),  # an interval per MCU row: 9 rows
        ({"restart_marker_blocks": 7, "subsampling": 0}, 77),  # 4:4:4, MCUs of 8 px: 32 x 17 = 544, 78 intervals
    ],
)
def test_a_whole_stream_is_clean_with_its_restart_markers_in_order(options, restarts):
    data = _jpeg(**options)
    assert len(RESTART.findall(data, _scan_start(data))) == restarts
    assert b"\xff\x00" in data[_scan_start(data) :]  # stuffed bytes, which are data
    assert scan_is_clean(data)


def test_a_grey_stream_counts_its_restarts_by_blocks():
    data = _jpeg((40, 70), restart_marker_blocks=4)  # 9 x 5 blocks of 8 px: 45, 12 intervals
    assert len(RESTART.findall(data, _scan_start(data))) == 11 and scan_is_clean(data)


def test_a_marker_amid_the_scan_is_not_clean():
    data = bytearray(_jpeg())
    middle = (_scan_start(data) + len(data)) // 2
    for marker in (b"\xff\xd3", b"\xff\xc4", b"\xff\xd9", b"\xff\x10"):
        spoiled = data[:middle] + marker + data[middle + 2 :]
        assert not scan_is_clean(bytes(spoiled)), marker
    wiped = data[:middle] + b"\xff" * 40 + data[middle + 40 :]  # erased as flash erases, a data byte after
    assert not scan_is_clean(bytes(wiped))


def test_a_restart_marker_lost_doubled_or_out_of_order_is_not_clean():
    data = _jpeg(restart_marker_blocks=3)
    found = [m.start() for m in RESTART.finditer(data, _scan_start(data))]
    at = found[10]
    assert not scan_is_clean(data[:at] + b"\x00\x00" + data[at + 2 :])  # one lost (zeroed)
    last = found[-1]  # lost, the others stay in order: only their count tells
    assert not scan_is_clean(data[:last] + b"\x00\x00" + data[last + 2 :])
    assert not scan_is_clean(data[:at] + b"\xff\xd3" + data[at + 2 :])  # RST3 where RST2 belongs
    assert not scan_is_clean(data[:at] + data[at : at + 2] * 2 + data[at + 2 :])  # one more
    assert scan_is_clean(data[:at] + b"\xff\xff" + data[at:])  # fill bytes before a marker are allowed


def test_the_restart_interval_may_come_from_the_pages_shared_tables():
    data = _jpeg(restart_marker_blocks=3)
    at = data.index(b"\xff\xdd")  # DRI: its marker, length 4, the interval
    tables = b"\xff\xd8" + data[at : at + 6] + b"\xff\xd9"
    without = data[:at] + data[at + 6 :]
    assert scan_is_clean(without, tables)
    assert not scan_is_clean(without)  # restart markers in a stream with no interval: not clean


def test_a_stream_it_does_not_read_is_left_to_openslide():
    assert not scan_is_clean(_jpeg(progressive=True))  # several scans
    data = _jpeg()
    assert not scan_is_clean(data[:-2])  # no end
    assert not scan_is_clean(data[:-2] + b"\0" * 5)  # no end, zeros after
    assert scan_is_clean(data + b"\0" * 5)  # zeros after its end: passed over, as libjpeg does
    assert not scan_is_clean(data[2:])  # no start
    assert not scan_is_clean(data[:200] + b"\xff\xd9")  # its header cut short
    assert not scan_is_clean(b"\xff\xd8\xff\xd9")  # no frame, no scan


def test_a_pages_tiles_share_the_parse_of_a_header_alike_and_another_is_parsed_anew():
    plain, restarted = _jpeg(), _jpeg(restart_marker_blocks=3)
    middle = (_scan_start(plain) + len(plain)) // 2
    stray = plain[:middle] + b"\xff\xd3" + plain[middle + 2 :]
    scans = PageScans(None)
    # a stream with restart markers after one without: its header (DRI) differs, so it is read, not taken as alike
    tiles = (plain, stray, restarted, plain, restarted[:-2])
    assert [scans.clean(d) for d in tiles] == [scan_is_clean(d) for d in tiles] == [True, False, True, True, False]
