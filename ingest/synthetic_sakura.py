"""A synthetic Sakura SVSLIDE, read by OpenSlide's own ``sakura`` backend: a SQLite database whose tiles are stored as
one greyscale JPEG per colour channel, each under an id naming its level-0 position, downsample, channel and focal
plane, with the slide's record (case id, description, creator) and label, overview and thumbnail photos beside them.
The label photo shows the patient's name and the slide record names the patient, so that privacy checks have
something real to look for.
"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

import numpy as np

from ingest.synthetic import SyntheticPatient, label_photo
from ingest.synthetic_vendor import pad_white

STORE = "SVGigaPixelImageData"  # the table of blobs; OpenSlide finds its name in DataManagerSQLiteConfigXPO

SCHEMA = f"""
CREATE TABLE DataManagerSQLiteConfigXPO (TableName TEXT);
CREATE TABLE {STORE} (id TEXT PRIMARY KEY, data BLOB);
CREATE TABLE SVSlideDataXPO (OID INTEGER PRIMARY KEY, SlideId TEXT, Date TEXT, Description TEXT, Creator TEXT,
    DiagnosisCode TEXT, Keywords TEXT, m_labelScan INTEGER, m_overviewScan INTEGER);
CREATE TABLE SVHRScanDataXPO (OID INTEGER PRIMARY KEY, ParentSlide INTEGER, ScanId TEXT, Date TEXT, Name TEXT,
    Description TEXT, ResolutionMmPerPix REAL, NominalLensMagnification REAL, FocussingMethod TEXT,
    ThumbnailImage BLOB);
CREATE TABLE SVScannedImageDataXPO (OID INTEGER PRIMARY KEY, Image BLOB);
"""


def _jpeg(image: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def write_svslide(
    path: Path,
    level0: np.ndarray,
    patient: SyntheticPatient,
    mpp: float = 0.5,
    levels: int = 3,
    unscanned: frozenset[tuple[int, int]] = frozenset(),
) -> None:
    """A Sakura SVSLIDE as OpenSlide reads it: levels downsampled by powers of two in 256 px tiles of one focal
    plane, each tile three greyscale JPEGs (red, green, blue) stored under ``T;x|y;downsample;channel;plane`` (x, y
    at level 0). Level-0 tiles in ``unscanned`` (column, row) are not in the database, as on a scan that skipped
    empty glass: OpenSlide leaves them transparent, and the lower levels show white there."""
    import cv2

    tile = 256
    canvas = pad_white(level0, tile * 2 ** (levels - 1)).copy()
    for tx, ty in unscanned:
        canvas[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile] = 255
    height, width = level0.shape[:2]
    label = _jpeg(cv2.cvtColor(label_photo(f"{patient.name} {patient.patient_id}"), cv2.COLOR_RGB2BGR))
    thumbnail = _jpeg(cv2.cvtColor(canvas[::16, ::16], cv2.COLOR_RGB2BGR))
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    try:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO DataManagerSQLiteConfigXPO VALUES (?)", (STORE,))
        blobs = [("++MagicBytes", "SVGigaPixelImage"), ("++VersionBytes", "1.0.0")]
        # tile size, level-0 width and height, (unused), focal planes
        blobs.append(("Header", struct.pack("<5I", tile, width, height, 0, 1)))
        for i in range(levels):
            step = 2**i
            pixels = canvas[::step, ::step]
            for row in range(-(-(height // step) // tile)):
                for col in range(-(-(width // step) // tile)):
                    if i == 0 and (col, row) in unscanned:
                        continue
                    block = pixels[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile]
                    for channel in range(3):
                        tile_id = f"T;{col * tile * step}|{row * tile * step};{step};{channel};0"
                        blobs.append((tile_id, _jpeg(np.ascontiguousarray(block[:, :, channel]))))
        db.executemany(f"INSERT INTO {STORE} VALUES (?, ?)", blobs)
        db.executemany("INSERT INTO SVScannedImageDataXPO VALUES (?, ?)", [(1, label), (2, label)])
        db.execute(
            "INSERT INTO SVSlideDataXPO VALUES (1, ?, ?, ?, 'Dr. Pathologist', '', 'clot', 1, 2)",
            (patient.patient_id, patient.birth_date, patient.name),
        )
        db.execute(
            "INSERT INTO SVHRScanDataXPO VALUES (1, 1, 'scan-1', ?, 'HR', '', ?, 20.0, 'auto', ?)",
            (patient.birth_date, mpp / 1000, thumbnail),
        )
        db.commit()
    finally:
        db.close()
