"""The direct tiled-TIFF path returns OpenSlide's pixels exactly, falls back when it cannot, and bounds its cache."""

from pathlib import Path

import numpy as np
import pytest

from ingest.slides import OpenSlideReader
from ingest.synthetic import slide_array, write_pyramid_tiff
from ingest.tiff_tiles import TiffTiles, _TileCache


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiff") / "s.tif"
    write_pyramid_tiff(path, slide_array(1000, "CE", np.random.default_rng(3)))  # levels 1000 and 500 px
    return str(path)


def test_direct_reads_equal_openslide_everywhere(slide):
    fast, ref = OpenSlideReader(slide), OpenSlideReader(slide, fast=False)
    assert fast.direct_levels == [0, 1] and ref.direct_levels == []
    rng = np.random.default_rng(0)
    # Tile-aligned, straddling, edge-overhanging and wholly outside windows, at both levels.
    boxes = [(0, 0, 0, 256, 256), (250, 250, 0, 600, 600), (900, 700, 0, 300, 400), (1200, 0, 0, 50, 50)]
    boxes += [(int(x), int(y), 0, 97, 131) for x, y in rng.integers(0, 1000, (20, 2))]
    boxes += [(2 * int(x), 2 * int(y), 1, 150, 120) for x, y in rng.integers(0, 500, (10, 2))]
    for x, y, level, w, h in boxes:
        assert np.array_equal(fast.read_region(x, y, level, w, h), ref.read_region(x, y, level, w, h)), (x, y, level)
    assert np.array_equal(fast.read_level(1), ref.read_level(1))
    fast.close()
    ref.close()


def test_level_whose_grid_does_not_land_on_pixels_goes_through_openslide(tmp_path):
    path = tmp_path / "odd.tif"
    write_pyramid_tiff(path, slide_array(1001, "LAA", np.random.default_rng(4)))  # level 1 is 501 px: ds 1.998
    fast, ref = OpenSlideReader(str(path)), OpenSlideReader(str(path), fast=False)
    assert 0 in fast.direct_levels
    region = fast.read_region(333, 517, 1, 80, 80)
    assert np.array_equal(region, ref.read_region(333, 517, 1, 80, 80))


def test_probe_mismatch_disables_the_direct_path(slide):
    ref = OpenSlideReader(slide, fast=False)
    wrong = lambda x, y, level, w, h: 255 - ref.read_region(x, y, level, w, h)  # noqa: E731
    assert TiffTiles.open(slide, ref.level_dimensions, ref.level_downsamples, wrong) is None


def test_non_tiff_is_left_to_openslide(tmp_path):
    junk = tmp_path / "x.svs"
    junk.write_bytes(b"not a tiff at all")
    assert TiffTiles.open(str(junk), [(10, 10)], [1.0], lambda *a: None) is None


def test_tile_cache_stays_within_its_byte_budget():
    cache = _TileCache(max_bytes=10_000)
    for i in range(50):
        cache.put((0, i), np.zeros(3000, np.uint8))
        assert cache._bytes <= 10_000
    assert cache.get((0, 49)) is not None and cache.get((0, 0)) is None


def test_a_tile_never_scanned_reads_white_inside_and_at_the_edge(slide):
    ref = OpenSlideReader(slide, fast=False)
    level = TiffTiles.open(slide, ref.level_dimensions, ref.level_downsamples, ref.read_region).levels[0]
    scanned = level._tile
    level._tile = lambda ty, tx: None if (ty, tx) == (1, 1) else scanned(ty, tx)  # as a sparse pyramid's hole
    for x, y in [(200, 200), (900, 700)]:  # inside the image; reaching past its edge
        got, want = level.read(x, y, 300, 400), ref.read_region(x, y, 0, 300, 400)
        hole = np.zeros(want.shape[:2], bool)
        hole[max(256 - y, 0) : max(512 - y, 0), max(256 - x, 0) : max(512 - x, 0)] = True
        assert (got[hole] == 255).all() and np.array_equal(got[~hole], want[~hole])
    ref.close()


def test_a_tiff_in_strips_is_refused_for_what_it_is_and_damage_as_before(tmp_path, slide):
    """OpenSlide reads tiled TIFFs only: one stored in strips (a valid image) was called damaged, or not a slide;
    it is named as what it is, with how to tile it. A slide cut short, and a file that is no TIFF, stay damaged."""
    import tifffile

    from ingest.slides import STRIPPED, SlideError

    tifffile.imwrite(tmp_path / "scan.tif", np.full((64, 64, 3), 200, np.uint8))
    with pytest.raises(SlideError) as refused:
        OpenSlideReader(str(tmp_path / "scan.tif"))
    assert str(refused.value) == STRIPPED  # no file name in it, as in every reason
    (tmp_path / "cut.tif").write_bytes(Path(slide).read_bytes()[:4096])
    (tmp_path / "text.tif").write_text("not a slide")
    for name in ("cut.tif", "text.tif"):
        with pytest.raises(SlideError, match=r"OpenSlide does not recognise the file \(damaged, or not a slide\)"):
            OpenSlideReader(str(tmp_path / name))


def test_a_big_endian_tiff_is_refused_for_what_it_is(tmp_path):
    """OpenSlide 4.0 reads a classic TIFF's first directory offset as 8 bytes and keeps the low 4 (for NDPI), which
    in big-endian order are the directory's own bytes: every such slide was "damaged, or not a slide". The same
    pyramid little-endian, and big-endian BigTIFF, open."""
    import tifffile

    from ingest.slides import BIG_ENDIAN, SlideError

    level0 = slide_array(512, "CE", np.random.default_rng(5))
    for name, order, big in (("mm.tif", ">", False), ("ii.tif", "<", False), ("mm-big.tif", ">", True)):
        with tifffile.TiffWriter(tmp_path / name, byteorder=order, bigtiff=big) as tw:
            tw.write(level0, tile=(256, 256), compression="jpeg", photometric="rgb", metadata=None)
            tw.write(level0[::2, ::2], tile=(256, 256), compression="jpeg", photometric="rgb", subfiletype=1)
    with pytest.raises(SlideError) as refused:
        OpenSlideReader(str(tmp_path / "mm.tif"))
    assert str(refused.value) == BIG_ENDIAN
    for name in ("ii.tif", "mm-big.tif"):
        reader = OpenSlideReader(str(tmp_path / name))
        assert reader.level_dimensions == [(512, 512), (256, 256)]
        reader.close()
