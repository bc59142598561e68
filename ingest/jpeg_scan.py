"""The markers inside a JPEG tile's scan (pure). libjpeg-turbo through tifffile, decoding a tile for the direct read
path (:mod:`ingest.tiff_tiles`) of a page that :mod:`ingest.jpeg_decode` does not decode, passes over a stray marker
or a lost restart marker with a warning no caller sees, and decodes the damaged tile into wrong pixels; OpenSlide,
the reader of record, makes each such warning an error. A tile whose scan holds a marker it should not is left to
OpenSlide, which reads it or says why."""

from __future__ import annotations

import math
import re

EOI, SOS, DRI = 0xD9, 0xDA, 0xDD
RST0 = 0xD0
MARKER = re.compile(rb"\xff[^\x00\xff]")
BASELINE = (0xC0, 0xC1)  # SOF0, SOF1: one scan of Huffman-coded blocks, the layout slide scanners write


def scan_is_clean(data: bytes, tables: bytes | None = None) -> bool:
    """Whether the JPEG stream ``data`` (SOI ... EOI) is one baseline scan whose entropy-coded bytes hold no marker
    but its restart markers, in order (RST0, RST1 ... RST7, RST0) and as many as its restart interval makes.
    ``tables``: the TIFF page's shared JPEG tables, which may hold the restart interval. False too for a stream this
    does not read (progressive, several scans, a header cut short): those are left to OpenSlide as well."""
    found = layout(data, tables)
    return found is not None and markers_ok(data, found)


class PageScans:
    """:func:`scan_is_clean` for the tiles of one TIFF page, whose headers are alike: a header is parsed once, the
    next tile's compared with it (a third of the check's time on a 256 px tile)."""

    def __init__(self, tables: bytes | None) -> None:
        self._tables, self._prefix, self._layout = tables, b"", None

    def clean(self, data: bytes) -> bool | None:
        """:func:`scan_is_clean`'s answer, or None for a stream whose header it does not read (:func:`layout`)."""
        if not (self._prefix and data.startswith(self._prefix)):
            self._layout = layout(data, self._tables)
            self._prefix = data[: self._layout[0]] if self._layout else b""
        return None if self._layout is None else markers_ok(data, self._layout)


def layout(data: bytes, tables: bytes | None = None) -> tuple[int, int | None] | None:
    """Where ``data``'s entropy-coded bytes start, and how many restart markers they must hold (None: any number,
    in order); None for a stream :func:`scan_is_clean` does not read."""
    header = _header(data, (_header(tables, {}) or {}) if tables else {})
    if header is None or "scan" not in header or "frame" not in header:
        return None
    interval = header.get("interval", 0)
    return header["scan"], 0 if not interval else _restarts(header["frame"], header["components"], interval)


def markers_ok(data: bytes, found: tuple[int, int | None]) -> bool:
    """Whether the scan of ``data`` (at ``found``, of :func:`layout`) holds its restart markers and no other."""
    end = len(data)
    if data[-2:] != b"\xff\xd9":  # zeros after the end (a writer aligning its strips) are passed over, as libjpeg does
        end = len(data.rstrip(b"\0"))
    if data[:2] != b"\xff\xd8" or data[end - 2 : end] != b"\xff\xd9":
        return False
    start, expected = found
    # a 0xFF followed by 0x00 is a stuffed data byte, by 0xFF a fill byte before a marker; anything else a marker
    restarts = [m[1] - RST0 for m in MARKER.findall(data, start, end - 2)]
    if not restarts:
        return not expected
    if any(not 0 <= r <= 7 for r in restarts):
        return False  # a marker that is not a restart: the scan ends, or libjpeg warns, there
    if expected is not None and len(restarts) != expected:
        return False
    return all(r == i % 8 for i, r in enumerate(restarts))


def _header(data: bytes, found: dict) -> dict | None:
    """The segments before the scan: the frame's size and sampling (``frame``), the restart interval (``interval``)
    and where the entropy-coded bytes start (``scan``); None for a frame that is not baseline or a segment cut short."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == EOI:
            return found
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or len(body) != length - 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame (C4: DHT, C8: JPG, CC: DAC)
            if marker not in BASELINE or len(body) < 6:
                return None
            height, width, count = int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
            sampling = [(body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count) if 8 + 3 * i < len(body)]
            found |= {"frame": (width, height, sampling)}
        elif marker == DRI and len(body) >= 2:
            found |= {"interval": int.from_bytes(body[:2], "big")}
        elif marker == SOS:
            return found | {"scan": pos + 2 + length, "components": body[0] if body else 0}
        pos += 2 + length
    return found


def _restarts(frame: tuple[int, int, list[tuple[int, int]]], components: int, interval: int) -> int | None:
    """How many restart markers a scan of ``components`` of ``frame`` holds at ``interval`` MCUs: one between each
    two intervals. None where the frame does not say (a height given after the scan, a component of one)."""
    width, height, sampling = frame
    if not height or not width or not sampling:
        return None
    hmax, vmax = max(h for h, _ in sampling), max(v for _, v in sampling)
    if components > 1:  # interleaved: an MCU covers 8 hmax x 8 vmax pixels
        mcus = math.ceil(width / (8 * hmax)) * math.ceil(height / (8 * vmax))
    elif len(sampling) == 1:  # one component alone: an MCU is one 8 x 8 block
        mcus = math.ceil(width / 8) * math.ceil(height / 8)
    else:
        return None  # one component of several in its own scan: not a baseline tile's layout
    return math.ceil(mcus / interval) - 1
