"""Synthetic TIFF slides whose layout and identity live in XML metadata, read by OpenSlide's own backends: Philips
TIFF (an XML ImageDescription with the barcode and the label photo inside), Ventana BIF (XMP scan settings with the
barcode, tile joints that may overlap) and Leica SCN (scanned regions placed on the glass by XML). All carry a label
photo with the patient's name, so that privacy checks have something real to look for; the other vendor formats are
in :mod:`ingest.synthetic_vendor`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ingest.synthetic import SyntheticPatient, label_photo
from ingest.synthetic_vendor import overlapping_tiles, pad_white, side_by_side


def write_philips(
    path: Path,
    level0: np.ndarray,
    patient: SyntheticPatient,
    mpp: float = 0.25,
    levels: int = 3,
    unscanned: frozenset[tuple[int, int]] = frozenset(),
) -> None:
    """A Philips TIFF as OpenSlide reads it: tiled JPEG levels (256 px tiles, each level padded to whole tiles on
    its own, so the levels' sizes are not exact halves and OpenSlide takes the downsamples from the XML),
    ``Software`` "Philips", and an XML ``ImageDescription`` (``DPUfsImport``) that gives each level's pixel spacing
    and holds the label and macro photos as base64 JPEG, with the barcode (the patient's id) beside them. The
    level-0 tiles in ``unscanned`` (column, row) are absent from the file (zero bytes), as in a scan of several
    regions; their area is white at the lower levels, and OpenSlide leaves it transparent at level 0."""
    import base64

    import imagecodecs
    import tifffile

    tile = 256
    canvas = pad_white(level0, tile).copy()
    for tx, ty in unscanned:
        canvas[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile] = 255
    spacing = [f'"{mpp * 2**i / 1000:.9f}" "{mpp * 2**i / 1000:.9f}"' for i in range(levels)]

    def attribute(name: str, value: str) -> str:
        return f'<Attribute Name="{name}">{value}</Attribute>'

    def image(kind: str, *attributes: str) -> str:
        inner = attribute("PIM_DP_IMAGE_TYPE", kind) + "".join(attributes)
        return f'<DataObject ObjectType="DPScannedImage">{inner}</DataObject>'

    representations = "".join(
        f'<DataObject ObjectType="PixelDataRepresentation">{attribute("DICOM_PIXEL_SPACING", sp)}</DataObject>'
        for sp in spacing
    )
    import cv2

    label = cv2.imencode(".jpg", label_photo(f"{patient.name} {patient.patient_id}"))[1].tobytes()
    photo = base64.b64encode(label).decode()
    xml = (
        '<?xml version="1.0" encoding="UTF-8" ?><DataObject ObjectType="DPUfsImport">'
        + attribute("PIM_DP_UFS_BARCODE", base64.b64encode(patient.patient_id.encode()).decode())
        + attribute("DICOM_ACQUISITION_DATETIME", f"{patient.birth_date}093000.000000")
        + '<Attribute Name="PIM_DP_SCANNED_IMAGES"><Array>'
        + image(
            "WSI",
            attribute("DICOM_PIXEL_SPACING", spacing[0]),
            f'<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE"><Array>{representations}</Array></Attribute>',
        )
        + image("LABELIMAGE", attribute("PIM_DP_IMAGE_DATA", photo))
        + image("MACROIMAGE", attribute("PIM_DP_IMAGE_DATA", photo))
        + "</Array></Attribute></DataObject>"
    )
    with tifffile.TiffWriter(path) as tw:
        for i in range(levels):
            pixels = pad_white(canvas[:: 2**i, :: 2**i], tile)  # each level padded on its own, as Philips does
            tiles = [
                b"" if i == 0 and (tx, ty) in unscanned else imagecodecs.jpeg8_encode(block, level=90)
                for ty in range(pixels.shape[0] // tile)
                for tx in range(pixels.shape[1] // tile)
                for block in [pixels[ty * tile : (ty + 1) * tile, tx * tile : (tx + 1) * tile]]
            ]
            tw.write(
                iter(tiles),
                shape=pixels.shape,
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                subfiletype=int(i > 0),  # the levels below 0 are reduced-resolution images
                software="Philips DP v1.0" if i == 0 else None,
                description=xml if i == 0 else None,
                metadata=None,
            )


def write_bif(path: Path, level0: np.ndarray, patient: SyntheticPatient, mpp: float = 0.25, overlap: int = 0) -> None:
    """A Ventana (Roche) BIF as OpenSlide reads it: a label photo first, whose XMP ``iScan`` element carries the scan
    settings and the barcode (the patient's id), then three tiled JPEG levels (256 px tiles). Level 0's XMP
    (``EncodeInfo``) numbers its tiles serpentine from the bottom row and gives each joint between neighbours
    ``overlap`` px: OpenSlide advances tiles by 256 - ``overlap`` px, so with overlaps a level is smaller than its
    TIFF page. Each tile is cut from ``level0`` at the place OpenSlide gives it; a level-``i`` tile holds 2^i x 2^i
    level-0 tiles, downsampled."""
    import imagecodecs
    import tifffile

    tile, levels = 256, 3
    cut = overlapping_tiles(level0, tile, overlap)  # each level-0 tile where OpenSlide draws it
    rows, cols = len(cut), len(cut[0])

    def number(c: int, r: int) -> int:  # 1-based, from the bottom row, every other row right to left
        up = rows - 1 - r
        return up * cols + (c if up % 2 == 0 else cols - 1 - c) + 1

    def joint(direction: str, a: tuple[int, int], b: tuple[int, int], dx: int, dy: int) -> str:
        return (
            f'<TileJointInfo FlagJoined="1" Confidence="100" Direction="{direction}" Tile1="{number(*a)}" '
            f'Tile2="{number(*b)}" OverlapX="{dx}" OverlapY="{dy}"/>'
        )

    joints = [joint("RIGHT", (c, r), (c + 1, r), overlap, 0) for r in range(rows) for c in range(cols - 1)]
    joints += [joint("UP", (c, r), (c, r - 1), 0, overlap) for r in range(1, rows) for c in range(cols)]
    encode = (
        f'<EncodeInfo Ver="2"><SlideStitchInfo><ImageInfo AOIScanned="1" AOIIndex="0" Width="{tile}" '
        f'Height="{tile}" NumRows="{rows}" NumCols="{cols}" Pos-X="0" Pos-Y="0">{"".join(joints)}</ImageInfo>'
        '</SlideStitchInfo><AoiOrigin><AOI0 OriginX="0" OriginY="0"/></AoiOrigin></EncodeInfo>'
    )
    iscan = (
        f'<iScan Z-layers="1" Magnification="40" ScanRes="{mpp}" BarCode1D="{patient.patient_id}" '
        f'ScanDate="{patient.birth_date}"/>'
    )

    def xmp(xml: str) -> list[tuple]:
        return [(700, 1, len(xml), xml.encode(), True)]  # XMLPacket

    with tifffile.TiffWriter(path) as tw:
        label = label_photo(f"{patient.name} {patient.patient_id}")
        tw.write(label, description="Label Image", extratags=xmp(iscan), photometric="rgb", metadata=None)
        for i in range(levels):
            step = 2**i
            across, down = -(-cols // step), -(-rows // step)
            tiles = []
            for ty in range(down):
                for tx in range(across):
                    placed = [
                        (c - tx * step, r - ty * step, cut[r][c])
                        for r in range(ty * step, min((ty + 1) * step, rows))
                        for c in range(tx * step, min((tx + 1) * step, cols))
                    ]
                    tiles.append(imagecodecs.jpeg8_encode(side_by_side(placed, step, tile), level=90))
            tw.write(
                iter(tiles),
                shape=(down * tile, across * tile, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                compression="jpeg",
                photometric="rgb",
                description=f"level={i} mag={40 // step} quality=90",
                extratags=xmp(encode) if i == 0 else [],
                metadata=None,
            )


def write_scn(
    path: Path,
    glass: np.ndarray,
    regions: list[tuple[int, int, int, int]],
    patient: SyntheticPatient,
    mpp: float = 0.5,
    levels: int = 3,
    label_width: int = 256,
) -> None:
    """A Leica SCN as OpenSlide reads it: a BigTIFF whose XML ``ImageDescription`` (namespace
    ``scn/2010/10/01``) places images on the glass in nanometre "clicks". ``glass`` is the whole slide at level 0
    as a perfect camera sees it; only the ``regions`` (level-0 ``x, y, width, height``, multiples of 4^(levels-1)
    px) are scanned, each as a main image with its own pyramid (downsample 4 per level). OpenSlide composites them
    on the glass, which stays transparent elsewhere. A macro photo of the whole glass (as large as the smallest
    level, and its first TIFF directory, as on Leica scanners) shows the label at the left end, with the patient's
    name; the barcode (the patient's id, base64) and a creation date are in the XML."""
    import base64

    import cv2
    import tifffile

    nm = round(mpp * 1000)  # clicks per level-0 pixel
    height, width = glass.shape[:2]
    scale = 4 ** (levels - 1)
    macro = cv2.resize(glass, (width // scale, height // scale), interpolation=cv2.INTER_AREA)
    label = cv2.resize(label_photo(f"{patient.name} {patient.patient_id}"), (label_width // scale, height // scale))
    macro[:, : label.shape[1]] = label
    pages = [(macro, mpp * scale)]  # (pixels, µm per pixel)

    def dimensions(first_ifd: int, sizes: list[tuple[int, int]]) -> str:
        return "".join(
            f'<dimension sizeX="{w}" sizeY="{h}" r="{r}" ifd="{first_ifd + r}"/>' for r, (w, h) in enumerate(sizes)
        )

    def image(
        name: str, ifd: int, sizes: list[tuple[int, int]], view: tuple[int, int, int, int], objective: str
    ) -> str:
        x, y, w, h = (v * nm for v in view)  # where the image lies on the glass, in clicks
        return (
            f'<image name="{name}"><creationDate>{patient.birth_date[:4]}-{patient.birth_date[4:6]}-'
            f'{patient.birth_date[6:]}T09:30:00Z</creationDate><device model="Leica SCN400" version="1.5"/>'
            f'<pixels sizeX="{sizes[0][0]}" sizeY="{sizes[0][1]}">{dimensions(ifd, sizes)}</pixels>'
            f'<view sizeX="{w}" sizeY="{h}" offsetX="{x}" offsetY="{y}"/>'
            f"<scanSettings><objectiveSettings><objective>{objective}</objective></objectiveSettings>"
            "<illuminationSettings><numericalAperture>0.7</numericalAperture>"
            "<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings></image>"
        )

    images = [image("macro", 0, [macro.shape[1::-1]], (0, 0, width, height), "1.25")]  # the whole glass
    for k, (x, y, w, h) in enumerate(regions):
        if (x | y | w | h) % scale:
            raise ValueError(f"region {k} is not on a {scale} px grid: {(x, y, w, h)}")
        pyramid = [glass[y : y + h, x : x + w][:: 4**i, :: 4**i] for i in range(levels)]
        sizes = [p.shape[1::-1] for p in pyramid]
        images.append(image(f"main {k}", len(pages), sizes, (x, y, w, h), str(round(10 / mpp))))
        pages += [(p, mpp * 4**i) for i, p in enumerate(pyramid)]
    xml = (
        '<?xml version="1.0" encoding="utf-8"?><scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
        f'<collection name="{patient.patient_id}" sizeX="{width * nm}" sizeY="{height * nm}">'
        f"<barcode>{base64.b64encode(patient.patient_id.encode()).decode()}</barcode>{''.join(images)}</collection></scn>"
    )
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, (pixels, page_mpp) in enumerate(pages):
            res = 1e4 / page_mpp  # pixels per centimetre: OpenSlide's MPP comes from level 0's first image
            tw.write(
                pixels,
                tile=(16, 16) if i == 0 else (256, 256),  # the macro is tiled too: OpenSlide wants directory 0 tiled
                compression="jpeg",
                photometric="rgb",
                description=xml if i == 0 else None,
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                metadata=None,
            )
