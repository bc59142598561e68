"""Synthetic slides in vendor formats that OpenSlide reads through its own backends (not as generic TIFF): Aperio
SVS, 3DHISTECH MIRAX, Hamamatsu NDPI, VMS and VMU, and Trestle (Philips TIFF, Ventana BIF and Leica SCN, whose
layout is in XML, are in :mod:`ingest.synthetic_xml_tiff`; Sakura SVSLIDE in :mod:`ingest.synthetic_sakura`). Each
carries the patient's identity where scanners put it (slide name, description, reference), so that privacy checks
have something real to look for.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ingest.synthetic import SyntheticPatient, label_photo


def pad_white(image: np.ndarray, multiple: int) -> np.ndarray:
    """``image`` padded with white at the bottom and right to whole multiples of ``multiple`` px."""
    h, w = (-(-n // multiple) * multiple for n in image.shape[:2])
    return np.pad(image, ((0, h - image.shape[0]), (0, w - image.shape[1]), (0, 0)), constant_values=255)


def side_by_side(cameras: list[tuple[int, int, np.ndarray]], step: int, tile: int) -> np.ndarray:
    """One ``tile`` px image of a level downsampled by ``step``: each ``(column, row, image)`` of ``cameras`` (a
    level-0 image of ``tile`` px, at its place in a block of ``step`` x ``step``) downsampled into its sub-tile,
    white where there is none. MIRAX concatenates its levels this way, and BIF tiles are drawn as such sub-tiles."""
    image = np.full((tile, tile, 3), 255, np.uint8)
    sub = tile // step
    for c, r, camera in cameras:
        image[r * sub : (r + 1) * sub, c * sub : (c + 1) * sub] = camera[::step, ::step]
    return image


def overlapping_tiles(image: np.ndarray, tile: int, overlap: int) -> list[list[np.ndarray]]:
    """``image`` cut into ``tile`` px tiles, ``tiles[row][column]``, each starting ``tile - overlap`` px after its
    left and upper neighbours (so it overlaps them by ``overlap`` px), padded with white: as scanners that stitch
    overlapping camera fields (Ventana, Trestle) store them and OpenSlide places them."""
    advance = tile - overlap
    cols, rows = (max(1, -(-(n - overlap) // advance)) for n in (image.shape[1], image.shape[0]))
    padded = np.full((rows * advance + overlap, cols * advance + overlap, 3), 255, np.uint8)
    padded[: image.shape[0], : image.shape[1]] = image
    return [
        [padded[r * advance : r * advance + tile, c * advance : c * advance + tile] for c in range(cols)]
        for r in range(rows)
    ]


def _restart_jpeg(image: np.ndarray) -> bytes:
    """JPEG (quality 90, no chroma subsampling) with restart markers evenly spaced in each row of 8 px MCUs, at most
    every 16 MCUs: the tiles OpenSlide's Hamamatsu reader cuts a JPEG into."""
    import io

    from PIL import Image

    out = io.BytesIO()
    every = math.gcd(image.shape[1] // 8, 16)
    Image.fromarray(np.ascontiguousarray(image)).save(
        out, "JPEG", quality=90, subsampling=0, restart_marker_blocks=every
    )
    return out.getvalue()


def _mirax_index(slide_id: str, pages: list[list[tuple[int, ...]]], nonhier: list[tuple[int, int, int]]) -> bytes:
    """``Index.dat``: per level a page of (image index, offset, length, data file) records, and the
    non-hierarchical records ((offset, length, data file) each). Version and slide id, then the roots of both
    tables; each table entry points at (0, page)."""
    import struct

    index = bytearray(b"01.02" + slide_id.encode())
    roots = len(index)
    index += bytes(8)

    def put(data: bytes) -> int:
        at = len(index)
        index.extend(data)
        return at

    def entries(records: list[bytes]) -> bytes:
        return b"".join(struct.pack("<i", put(struct.pack("<ii", 0, put(r)))) for r in records)

    level_pages = [struct.pack("<ii", len(r), 0) + b"".join(struct.pack("<iiii", *x) for x in r) for r in pages]
    hier = put(entries(level_pages))  # page: count, next (0: the last), records
    table = put(entries([struct.pack("<7i", 1, 0, 0, 0, *record) for record in nonhier]))
    struct.pack_into("<ii", index, roots, hier, table)
    return bytes(index)


def write_mirax(
    path: Path,
    level0: np.ndarray,
    patient: SyntheticPatient,
    mpp: float = 0.5,
    levels: int = 3,
    overlap: int = 0,
    jitter: int = 0,
    skip: frozenset[tuple[int, int]] = frozenset(),
    seed: int = 0,
) -> dict[tuple[int, int], tuple[int, int]]:
    """A 3DHISTECH MIRAX slide as OpenSlide reads it: ``path`` (``x.mrxs``) and the folder ``x/`` beside it with
    ``Slidedat.ini`` (which names the patient, as scanners' slide names often do), ``Index.dat`` and one data file
    of JPEG camera images, 256 px each; level ``i`` concatenates 2^i x 2^i level-0 images into one.

    By default the camera images lie on a grid without overlaps or a position map. With ``overlap``, ``jitter``
    or ``skip`` they are laid out as a scanner's stage leaves them: neighbours overlap by ``overlap`` px, each is
    displaced by up to ``jitter`` px from its nominal place, the places are in a position map
    (``VIMSLIDE_POSITION_BUFFER``), and the camera positions in ``skip`` (column, row) were not captured, which
    OpenSlide leaves transparent. Every camera image is cut from ``level0`` at its place, so overlaps agree.
    Returns the level-0 place of each captured camera image."""
    import struct

    import imagecodecs

    tile, mapped = 256, bool(overlap or jitter or skip)
    advance = tile - overlap
    nx, ny = (max(1, -(-(n - overlap) // advance)) for n in (level0.shape[1], level0.shape[0]))
    shift = np.random.default_rng(seed).integers(-jitter, jitter + 1, (ny, nx, 2))
    places = {
        (gx, gy): (max(0, gx * advance + int(shift[gy, gx, 0])), max(0, gy * advance + int(shift[gy, gx, 1])))
        for gy in range(ny)
        for gx in range(nx)
    }
    places[0, 0] = (0, 0)  # OpenSlide takes any other position at (0, 0) for one never captured
    canvas = np.full((ny * advance + overlap + jitter, nx * advance + overlap + jitter, 3), 255, np.uint8)
    canvas[: level0.shape[0], : level0.shape[1]] = level0
    folder = path.with_suffix("")
    folder.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")  # OpenSlide goes by the name and the folder beside it
    data, pages = bytearray(), []
    for i in range(levels):
        step, records = 2**i, []
        for gy0 in range(0, ny, step):
            for gx0 in range(0, nx, step):
                cells = [
                    (gx, gy)
                    for gy in range(gy0, min(gy0 + step, ny))
                    for gx in range(gx0, min(gx0 + step, nx))
                    if (gx, gy) not in skip
                ]
                if not cells:
                    continue
                cameras = [
                    (gx - gx0, gy - gy0, canvas[y : y + tile, x : x + tile])
                    for gx, gy in cells
                    for x, y in [places[gx, gy]]
                ]
                jpeg = imagecodecs.jpeg8_encode(side_by_side(cameras, step, tile), level=90)
                records.append((gy0 * nx + gx0, len(data), len(jpeg), 0))
                data += jpeg
        pages.append(records)
    nonhier = []
    if mapped:  # a flag (1: captured), then x and y, per camera position, row by row
        buffer = b"".join(
            struct.pack("<bii", int((gx, gy) not in skip), *places[gx, gy]) for gy in range(ny) for gx in range(nx)
        )
        nonhier.append((len(data), len(buffer), 0))
        data += buffer
    slide_id = uuid.uuid4().hex
    (folder / "Index.dat").write_bytes(_mirax_index(slide_id, pages, nonhier))
    (folder / "Data0000.dat").write_bytes(bytes(data))
    hier = [f"HIER_0_VAL_{i}=ZoomLevel_{i}\nHIER_0_VAL_{i}_SECTION=LAYER_0_LEVEL_{i}_SECTION" for i in range(levels)]
    position_map = (
        "NONHIER_0_NAME=VIMSLIDE_POSITION_BUFFER\nNONHIER_0_COUNT=1\nNONHIER_0_VAL_0=default\n"
        "NONHIER_0_VAL_0_SECTION=NONHIERLAYER_0_SECTION\n"
    )
    sections = [
        f"[LAYER_0_LEVEL_{i}_SECTION]\nOVERLAP_X={overlap / 2**i}\nOVERLAP_Y={overlap / 2**i}\n"
        f"MICROMETER_PER_PIXEL_X={mpp * 2**i}\nMICROMETER_PER_PIXEL_Y={mpp * 2**i}\nIMAGE_FORMAT=JPEG\n"
        f"IMAGE_FILL_COLOR_BGR=16777215\nDIGITIZER_WIDTH={tile}\nDIGITIZER_HEIGHT={tile}\n"
        f"IMAGE_CONCAT_FACTOR={int(i > 0)}"
        for i in range(levels)
    ]
    if mapped:
        sections.append("[NONHIERLAYER_0_SECTION]\nVIMSLIDE_POSITION_DATA_FORMAT_VERSION=257")
    (folder / "Slidedat.ini").write_text(
        f"[GENERAL]\nSLIDE_VERSION=01.02\nSLIDE_ID={slide_id}\nSLIDE_NAME={patient.name} {patient.patient_id}\n"
        f"SLIDE_CREATIONDATETIME={patient.birth_date}\nIMAGENUMBER_X={nx}\nIMAGENUMBER_Y={ny}\n"
        "OBJECTIVE_MAGNIFICATION=20\nCameraImageDivisionsPerSide=1\n"
        f"[HIERARCHICAL]\nHIER_COUNT=1\nHIER_0_NAME=Slide zoom level\nHIER_0_COUNT={levels}\n"
        + "\n".join(hier)
        + f"\nNONHIER_COUNT={len(nonhier)}\n"
        + (position_map if mapped else "")
        + "INDEXFILE=Index.dat\n[DATAFILE]\nFILE_COUNT=1\nFILE_0=Data0000.dat\n"
        + "\n".join(sections)
        + "\n"
    )
    return {cell: place for cell, place in places.items() if cell not in skip}


def write_ndpi(path: Path, level0: np.ndarray, patient: SyntheticPatient, mpp: float = 0.5, levels: int = 3):
    """A Hamamatsu NDPI as OpenSlide reads it: a TIFF whose levels are each one JPEG with restart markers (one
    strip, tagged with the source lens), plus a macro photo of the glass; the description and the reference tag
    name the patient, as a scanner's slide label can."""
    import tifffile

    def ndpi_tags(lens: float) -> list[tuple]:  # format flag, source lens, x/y/z offsets (signed), reference
        offsets = [(tag, 9, 1, 0, True) for tag in (65422, 65423, 65424)]
        return [(65420, 4, 1, 1, True), (65421, 11, 1, lens, True), *offsets, (65427, 2, 0, patient.patient_id, True)]

    level0 = pad_white(level0, 8 * 2 ** (levels - 1))  # every level a whole number of 8 px MCUs
    macro = np.full((128, 384, 3), 240, np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for i, (image, lens) in enumerate(
            [(level0[:: 2**i, :: 2**i], 20.0 / 2**i) for i in range(levels)] + [(macro, -1.0)]
        ):
            res = 1e4 / (mpp * 2**i) if lens > 0 else 100.0  # pixels per centimetre
            tw.write(
                iter([_restart_jpeg(image)]),
                shape=image.shape,
                dtype=np.uint8,
                compression="jpeg",
                photometric="rgb",
                rowsperstrip=image.shape[0],
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                description=f"{patient.name} {patient.birth_date}" if i == 0 else None,
                extratags=ndpi_tags(lens),
                metadata=None,
            )


def _write_key_file_slide(
    path: Path,
    level0: np.ndarray,
    patient: SyntheticPatient,
    mpp: float,
    header: str,
    ext: str,
    encode: Callable[[np.ndarray], bytes],
    map_step: int,
) -> None:
    """A Hamamatsu slide of a key file (``path``, ``header`` opening its group; its reference names the patient)
    and beside it the image and a 1/``map_step`` size map, each one ``ext`` file made by ``encode``, and a macro
    photo. The image is padded to whole multiples of 64 px, which both formats' maps need."""
    from PIL import Image

    image = pad_white(level0, 64)
    h, w = image.shape[:2]
    stem = path.stem
    for name, pixels in [(f"{stem}{ext}", image), (f"{stem}_map{ext}", image[::map_step, ::map_step])]:
        (path.parent / name).write_bytes(encode(pixels))
    Image.fromarray(np.full((128, 384, 3), 240, np.uint8)).save(path.parent / f"{stem}_macro.jpg", "JPEG")
    path.write_text(
        f"{header}ImageFile={stem}{ext}\nMapFile={stem}_map{ext}\nMacroImage={stem}_macro.jpg\n"
        f"PhysicalWidth={round(w * mpp * 1000)}\nPhysicalHeight={round(h * mpp * 1000)}\n"
        f"Reference={patient.patient_id} {patient.name}\n"
    )


def write_vms(path: Path, level0: np.ndarray, patient: SyntheticPatient, mpp: float = 0.5) -> None:
    """A Hamamatsu VMS as OpenSlide reads it: the key file ``path`` (``x.vms``) and beside it the image as one JPEG
    with restart markers (whole 8 px MCUs at full and map size), a map (1/8 size) and a macro photo."""
    header = "[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
    _write_key_file_slide(path, level0, patient, mpp, header, ".jpg", _restart_jpeg, 8)


def _ngr(image: np.ndarray, column_width: int) -> bytes:
    """Hamamatsu's uncompressed NGR image: a 32-byte header ("GN", width, height, column width, data offset) then
    the pixels as 12-bit RGB in little-endian 16-bit words, column by column (each ``column_width`` px wide)."""
    import struct

    h, w = image.shape[:2]
    header = b"GN\0\0" + struct.pack("<3i", w, h, column_width) + b"\0" * 8 + struct.pack("<i", 32) + b"\0" * 4
    words = (image[:, :, :3].astype("<u2") << 4).reshape(h, w // column_width, column_width, 3)
    return header + np.ascontiguousarray(words.transpose(1, 0, 2, 3)).tobytes()


def write_vmu(path: Path, level0: np.ndarray, patient: SyntheticPatient, mpp: float = 0.5) -> None:
    """A Hamamatsu VMU (the uncompressed sibling of VMS) as OpenSlide reads it: the key file ``path`` (``x.vmu``)
    and beside it the image and a 1/4 size map as NGR files of 16 px columns, and a macro photo."""
    header = "[Uncompressed Virtual Microscope Specimen]\nNoLayers=1\nBitsPerPixel=36\nPixelOrder=RGB\n"
    _write_key_file_slide(path, level0, patient, mpp, header, ".ngr", lambda pixels: _ngr(pixels, 16), 4)


def write_trestle(
    path: Path, level0: np.ndarray, patient: SyntheticPatient, mpp: float = 0.5, overlap: int = 16
) -> None:
    """A Trestle (MedMicro) TIFF as OpenSlide reads it: ``Software`` "MedScan", a ``key=value;...`` description
    (objective, background colour, the slide's name: the patient's id) whose ``OverlapsXY`` gives each level's
    overlap between neighbouring 256 px tiles (``overlap`` at level 0, halved per level), the MPP in the resolution
    tags as they are (not pixels per unit), and the macro photo as a JPEG beside it (``x.Full``). Each level is cut
    from ``level0`` downsampled by 2 per level, each tile at the place OpenSlide draws it."""
    import cv2
    import tifffile

    tile, levels = 256, 3
    overlaps = [overlap >> i for i in range(levels)]
    description = (
        f"Background Color=FFFFFF;Objective Power=20;JPEG Quality=90;Slide Name={patient.patient_id};"
        f"OverlapsXY={' '.join(f'{o} {o}' for o in overlaps)}"
    )
    with tifffile.TiffWriter(path) as tw:
        for i, ov in enumerate(overlaps):
            grid = overlapping_tiles(level0[:: 2**i, :: 2**i], tile, ov)
            rows, cols = len(grid), len(grid[0])
            tiles = [t for row in grid for t in row]
            tw.write(
                iter(tiles),
                shape=(rows * tile, cols * tile, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                software="MedScan" if i == 0 else None,
                description=description if i == 0 else None,
                resolution=(mpp * 2**i, mpp * 2**i),
                resolutionunit="NONE",
                metadata=None,
            )
    macro = cv2.cvtColor(label_photo(f"{patient.name} {patient.patient_id}"), cv2.COLOR_RGB2BGR)
    path.with_suffix(".Full").write_bytes(cv2.imencode(".jpg", macro)[1].tobytes())


def write_svs(path: Path, level0: np.ndarray, patient: SyntheticPatient, mpp: float = 0.5, levels: int = 3) -> None:
    """An Aperio SVS as OpenSlide reads it: tiled JPEG levels downsampled by 4 (240 px tiles, as Aperio writes
    them), each with an ``Aperio Image Library`` description whose ``key = value`` fields give the magnification,
    the MPP and the scan's file name, date and user (the patient's name, birth date and id here); then stripped
    images: a thumbnail as the second directory, and the label (a photo with the patient's name, LZW) and macro
    (JPEG) at the end."""
    import tifffile

    h, w = level0.shape[:2]
    fields = (
        f"AppMag = 20|MPP = {mpp:.4f}|Filename = {patient.name}|Date = {patient.birth_date}|Time = 09:30:00|"
        f"User = {patient.patient_id}"
    )

    def description(image: np.ndarray, kind: str) -> str:
        ih, iw = image.shape[:2]
        if kind == "level":
            return (
                f"Aperio Image Library v12.0.15\r\n{w}x{h} [0,0 {w}x{h}] (240x240) -> {iw}x{ih} JPEG/RGB Q=90|{fields}"
            )
        if kind == "thumbnail":
            return f"Aperio Image Library v12.0.15\r\n{w}x{h} -> {iw}x{ih} - |{fields}"
        return f"Aperio Image Library v12.0.15\r\n{kind} {iw}x{ih}"  # label, macro: the name on the second line

    pyramid = [level0[:: 4**i, :: 4**i] for i in range(levels)]
    label = label_photo(f"{patient.name} {patient.patient_id}")
    with tifffile.TiffWriter(path) as tw:
        for i, pixels in enumerate(pyramid):
            tw.write(
                pixels,
                tile=(240, 240),
                compression="jpeg",
                photometric="rgb",
                subfiletype=int(i > 0),
                description=description(pixels, "level"),
                metadata=None,
            )
            if i == 0:  # the thumbnail comes second in an SVS
                thumb = level0[::8, ::8]
                tw.write(
                    thumb,
                    compression="jpeg",
                    photometric="rgb",
                    description=description(thumb, "thumbnail"),
                    metadata=None,
                )
        # OpenSlide 4 tells them apart by NewSubfileType: reduced (label), reduced and macro (9)
        for kind, image, subfiletype in (("label", label, 1), ("macro", label, 9)):
            tw.write(
                image,
                compression="lzw" if kind == "label" else "jpeg",
                photometric="rgb",
                subfiletype=subfiletype,
                description=description(image, kind),
                metadata=None,
            )
