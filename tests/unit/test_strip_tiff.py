"""TIFFs stored in strips, which OpenSlide does not read: Tessera reads them itself (level 0), region for region as
the array written, with their µm/px; what it cannot read is refused saying why."""

import json

import numpy as np
import pytest
import tifffile

from ingest.config import WsiIngestConfig
from ingest.plan import plan_wsi
from ingest.slides import OpenSlideReader, SlideError, open_slide
from ingest.strip_tiff import StripTiffReader
from ingest.synthetic import slide_array
from ingest.units import plan_slide, wsi_samples
from ingest.wsi import block_mean, read_mask_image
from shards.schema import decode_image

LEVEL0 = slide_array(1500, "LAA", np.random.default_rng(4))  # 1500: strips and tiles end short of the edge


def _strips(path, compression=None, rows=None, array=LEVEL0, **kw):
    tifffile.imwrite(path, array, compression=compression, rowsperstrip=rows, resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER", metadata=None, **kw)  # fmt: skip
    return str(path)


@pytest.mark.parametrize(
    ("compression", "rows", "order"), [(None, None, "<"), ("zlib", 64, "<"), ("lzw", 7, ">"), (None, 100, ">")]
)
def test_regions_read_from_strips_equal_the_image(tmp_path, compression, rows, order):
    path = _strips(tmp_path / "s.tif", compression, rows, byteorder=order)
    with pytest.raises(SlideError):
        OpenSlideReader(path)
    reader = open_slide(path)
    assert isinstance(reader, StripTiffReader)
    assert (reader.level_dimensions, reader.level_downsamples, reader.mpp) == ([(1500, 1500)], [1.0], 0.5)
    for x, y, w, h in [(0, 0, 256, 256), (1300, 1400, 300, 300), (-20, 700, 64, 64), (333, 17, 600, 600)]:
        expected = np.full((h, w, 3), 255, np.uint8)
        sx, sy = max(x, 0), max(y, 0)
        part = LEVEL0[sy : y + h, sx : x + w]
        expected[sy - y : sy - y + part.shape[0], sx - x : sx - x + part.shape[1]] = part
        assert np.array_equal(reader.read_region(x, y, 0, w, h), expected), (x, y)
    reader.close()


def test_its_mask_image_is_read_in_one_pass_as_blocks_would_give_it(tmp_path, monkeypatch):
    import ingest.wsi as wsi

    monkeypatch.setattr(wsi, "MASK_MAX_PX", 512)  # 1500 px: averaged over 3 x 3
    reader = open_slide(_strips(tmp_path / "s.tif", "zlib", 16))
    thumb, downsample = read_mask_image(reader, 0)
    assert downsample == 3 and np.array_equal(thumb, block_mean(LEVEL0, 3))
    reader.close()


def test_a_slide_in_strips_is_ingested_tile_for_tile(tmp_path):
    (tmp_path / "slides").mkdir()
    path = _strips(tmp_path / "slides" / "s.tif", "zlib", 32)
    cfg = WsiIngestConfig(sources=[path], out=str(tmp_path / "o"), tile_size=256, format="png", split="train=1.0")
    [unit] = plan_wsi(cfg, b"k").units
    works, warnings = plan_slide(unit, cfg)
    samples = [s for w in works for s in wsi_samples(w, cfg)]
    assert samples and warnings == []
    for sample in samples:
        x, y = (int(v) for v in sample["__key__"].rsplit("_", 2)[1:])
        assert np.array_equal(decode_image(sample["png"]), LEVEL0[y : y + 256, x : x + 256])
    assert json.loads(samples[0]["json"])["mpp"] == 0.5


def test_grey_and_rgba_strips_read_as_rgb(tmp_path):
    grey = LEVEL0[:, :, 1]
    reader = open_slide(_strips(tmp_path / "g.tif", "zlib", 50, grey, photometric="minisblack"))
    assert np.array_equal(reader.read_region(10, 10, 0, 40, 40), np.repeat(grey[10:50, 10:50, None], 3, axis=2))
    rgba = np.dstack([LEVEL0, np.full(LEVEL0.shape[:2], 255, np.uint8)])
    reader = open_slide(_strips(tmp_path / "a.tif", "zlib", 50, rgba, photometric="rgb", extrasamples=[2]))
    assert np.array_equal(reader.read_region(10, 10, 0, 40, 40), LEVEL0[10:50, 10:50])


def test_what_it_cannot_read_is_refused_saying_why(tmp_path):
    deep = tmp_path / "deep.tif"
    tifffile.imwrite(deep, LEVEL0.astype(np.uint16) * 200, compression="zlib", rowsperstrip=64)
    with pytest.raises(SlideError, match=r"a TIFF in strips of uint16 samples, 3 a pixel, which Tessera does not read"):
        open_slide(str(deep))
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(LEVEL0, 2, 0), photometric="rgb", planarconfig="separate", rowsperstrip=64)
    with pytest.raises(SlideError, match="with its colours stored in separate planes"):
        open_slide(str(planar))


def test_a_jpeg_strip_cut_short_or_with_a_marker_amid_its_scan_is_damaged_and_the_others_read_on(tmp_path):
    """libjpeg-turbo decodes such a strip into wrong rows without a word (ingest.jpeg_scan), and one whose scan
    ends early, its end marker in place, with a warning only (ingest.jpeg_decode)."""
    intact = _strips(tmp_path / "intact.tif", "jpeg", 64)
    with tifffile.TiffFile(intact) as tif:
        page = tif.pages[0]
        spans = [(page.dataoffsets[i], page.databytecounts[i]) for i in (5, 9, 2)]
    data = bytearray((tmp_path / "intact.tif").read_bytes())
    (offset, count), (cut, cut_count), (early, early_count) = spans
    data[offset + count // 2 : offset + count // 2 + 2] = b"\xff\xd3"  # a restart marker where the scan has none
    data[cut + cut_count - 2 : cut + cut_count] = b"\0\0"  # its end marker lost
    half = early + early_count // 2  # the scan ended at half, its end marker after it, the rest of its space zero
    data[half : early + early_count] = b"\xff\xd9" + bytes(early + early_count - half - 2)
    (tmp_path / "damaged.tif").write_bytes(bytes(data))
    reader, good = open_slide(str(tmp_path / "damaged.tif")), open_slide(intact)
    warned = "Corrupt JPEG data: premature end of data segment"  # an error here, as OpenSlide makes it
    for strip, why in ((5, warned), (9, "Premature end of JPEG file"), (2, warned)):
        with pytest.raises(SlideError, match=f"strip {strip} could not be decoded: {why}"):
            reader.read_region(100, strip * 64 + 10, 0, 256, 32)
    for y in (0, 64, 4 * 64, 6 * 64, 10 * 64):  # the strips around them, as from the intact copy
        assert np.array_equal(reader.read_region(0, y, 0, 1500, 64), good.read_region(0, y, 0, 1500, 64)), y
    reader.close()
    good.close()


def _pyramid(path, how: str, compression=None, levels=(1, 2, 4), **kw) -> str:
    """LEVEL0 and its reductions (every 2nd and 4th pixel) in strips: as pages marked reduced, or as SubIFDs."""
    with tifffile.TiffWriter(path) as tif:
        for i, step in enumerate(levels):
            extra = {"subifds": len(levels) - 1} if how == "subifds" and i == 0 else {}
            extra |= {"subfiletype": 1} if i else {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
            level = kw.get(f"level{i}", LEVEL0[::step, ::step])
            tif.write(level, compression=compression, rowsperstrip=64, metadata=None, **extra)
    return str(path)


@pytest.mark.parametrize(("how", "compression"), [("pages", None), ("subifds", "zlib"), ("pages", "jpeg")])
def test_a_pyramid_in_strips_reads_its_reduced_images_as_levels(tmp_path, how, compression):
    reader = open_slide(_pyramid(tmp_path / "p.tif", how, compression))
    assert isinstance(reader, StripTiffReader)
    assert reader.level_dimensions == [(1500, 1500), (750, 750), (375, 375)]
    assert reader.level_downsamples == [1.0, 2.0, 4.0] and reader.mpp == 0.5
    with tifffile.TiffFile(tmp_path / "p.tif") as tif:  # the levels as written (and, for JPEG, decoded)
        written = [level.asarray() for level in tif.series[0].levels]
    for level, step in ((1, 2), (2, 4)):
        x0, y0 = 290 * step, 100 * step  # level-0 pixels
        expected = written[level][100 : 100 + 64, 290 : 290 + 80]
        assert np.array_equal(reader.read_region(x0, y0, level, 80, 64), expected), level
        width = written[level].shape[1]
        edge = reader.read_region((width - 10) * step, 0, level, 64, 8)  # past the level's edge: white
        assert np.array_equal(edge[:, :10], written[level][:8, width - 10 :]) and (edge[:, 10:] == 255).all()
    assert np.array_equal(reader.read_level(2), written[2])
    reader.close()


def test_its_mask_and_an_mpp_are_read_from_the_reduced_levels(tmp_path, monkeypatch):
    import ingest.wsi as wsi

    monkeypatch.setattr(wsi, "MASK_MAX_PX", 400)  # level 2 (375 px) read whole, level 1 (750 px) averaged 2 x 2
    reader = open_slide(_pyramid(tmp_path / "p.tif", "pages", "zlib"))
    thumb, downsample = read_mask_image(reader, 2)
    assert downsample == 4 and np.array_equal(thumb, LEVEL0[::4, ::4])
    thumb, downsample = read_mask_image(reader, 1)  # 750 px: in one pass down level 1's strips, 2 x 2
    assert downsample == 4 and np.array_equal(thumb, block_mean(LEVEL0[::2, ::2], 2))
    reader.close()
    (tmp_path / "slides").mkdir()
    path = _pyramid(tmp_path / "slides" / "p.tif", "pages", "zlib")
    cfg = WsiIngestConfig(sources=[path], out=str(tmp_path / "o"), tile_size=128, format="png", split="train=1.0",
                          mpp=1.0)  # fmt: skip
    [unit] = plan_wsi(cfg, b"k").units
    works, warnings = plan_slide(unit, cfg)
    samples = [s for w in works for s in wsi_samples(w, cfg)]
    assert samples and warnings == []
    for sample in samples:  # 1 µm/px: level 1 read as it is, each tile there where its metadata says
        meta = json.loads(sample["json"])
        assert (meta["level"], meta["mpp"]) == (1, 1.0)
        x, y = meta["x"] // 2, meta["y"] // 2
        assert np.array_equal(decode_image(sample["png"]), LEVEL0[::2, ::2][y : y + 128, x : x + 128])


def test_a_reduced_image_stored_otherwise_is_passed_over(tmp_path):
    grey = LEVEL0[::2, ::2, 0]  # level 1 grey where level 0 is RGB: not one of its levels
    reader = open_slide(_pyramid(tmp_path / "p.tif", "pages", "zlib", level1=grey))
    assert reader.level_dimensions == [(1500, 1500), (375, 375)] and reader.level_downsamples == [1.0, 4.0]
    assert np.array_equal(reader.read_region(0, 0, 1, 375, 375), LEVEL0[::4, ::4])
    with pytest.raises(SlideError, match=r"this TIFF in strips has 2 level\(s\), not level 2"):
        reader.read_region(0, 0, 2, 8, 8)
    reader.close()
