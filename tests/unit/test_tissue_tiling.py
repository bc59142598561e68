import cv2
import numpy as np
import pytest

from ingest import wsi
from ingest.slides import ArraySlideReader
from ingest.tiling import tile_origins, tissue_tiles
from ingest.tissue import colourless, inner_boundary, remove_small_objects, tissue_fraction, tissue_mask
from ingest.wsi import block_mean, choose_level, plan_tiles, read_mask_image, read_tiles


def test_tissue_fraction_on_hand_made_mask():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # top-left quarter
    assert tissue_fraction(mask, 0, 0, 4, 4) == pytest.approx(0.25)
    assert tissue_fraction(mask, 0, 0, 2, 2) == pytest.approx(1.0)
    assert tissue_fraction(mask, 2, 2, 4, 4) == pytest.approx(0.0)
    # half a mask pixel covered counts by area: box [1.5, 2.5) x [0, 1) covers 0.5 px of tissue
    assert tissue_fraction(mask, 1.5, 0, 2.5, 1) == pytest.approx(0.5)
    # a box hanging off the slide counts the outside as background
    assert tissue_fraction(mask, -2, -2, 2, 2) == pytest.approx(0.25)
    assert tissue_fraction(mask, 10, 10, 12, 12) == 0.0


def test_tissue_mask_finds_stained_region_and_ignores_specks():
    img = np.full((64, 64, 3), 240, np.uint8)
    img[16:48, 16:48] = (190, 70, 120)
    img[2, 2] = (190, 70, 120)  # a speck of dust
    mask = tissue_mask(img, min_object_px=8)
    assert mask[16:48, 16:48].all()
    assert not mask[2, 2]
    assert mask.sum() == 32 * 32


def test_holes_up_to_the_size_are_filled_and_larger_ones_kept():
    img = np.full((64, 64, 3), 240, np.uint8)
    img[8:56, 8:56] = (190, 70, 120)
    img[12:14, 12:14] = 240  # a 4 px tear
    img[30:40, 30:40] = 240  # a 100 px gap
    mask = tissue_mask(img, min_object_px=8, min_hole_px=16)
    assert mask[12:14, 12:14].all() and not mask[30:40, 30:40].any()
    assert mask.sum() == 48 * 48 - 100


@pytest.mark.parametrize("seed", range(4))
def test_opencv_morphology_equals_scikit_image(seed):
    """The OpenCV versions give scikit-image's exact results (4-connectivity; edges are not boundaries)."""
    from skimage.morphology import remove_small_holes
    from skimage.morphology import remove_small_objects as sk_remove
    from skimage.segmentation import find_boundaries

    mask = np.random.default_rng(seed).random((60, 70)) < 0.45 + 0.05 * seed
    for size in (0, 1, 5, 30):
        assert np.array_equal(remove_small_objects(mask, size), sk_remove(mask, max_size=size))
        assert np.array_equal(~remove_small_objects(~mask, size), remove_small_holes(mask, max_size=size))
    assert np.array_equal(inner_boundary(mask), find_boundaries(mask, mode="inner"))


def test_otsu_mask_matches_scikit_image_on_a_synthetic_slide():
    from skimage.filters import threshold_otsu

    from ingest.synthetic import slide_array

    thumb = slide_array(512, "CE", np.random.default_rng(4))
    sat = cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[:, :, 1].astype(np.float32) / 255
    reference = sat > threshold_otsu(sat)  # before the speck and hole removal
    ours = tissue_mask(thumb, min_object_px=0, min_hole_px=0)
    assert 0.1 < ours.mean() < 0.9
    assert (ours != reference).mean() < 1e-3  # the two Otsu histograms bin the same levels a hair apart


def test_blank_slide_has_no_tissue():
    assert not tissue_mask(np.full((32, 32, 3), 245, np.uint8)).any()


def test_tile_origins_and_bad_arguments():
    assert tile_origins(10, 5, 5) == [(0, 0), (5, 0)]
    assert tile_origins(10, 5, 5, stride=5) == [(0, 0), (5, 0)]
    assert tile_origins(4, 4, 5) == []
    with pytest.raises(ValueError, match="positive"):
        tile_origins(10, 10, 0)


def test_tissue_tiles_threshold():
    mask = np.zeros((4, 4), bool)
    mask[0, :3] = True  # row 0, 3 of 4 pixels
    tiles = tissue_tiles(mask, mask_downsample=4, width0=16, height0=16, size0=8, stride0=None, threshold=0.3)
    # tile (0,0) covers mask [0,2)x[0,2): 2 of 4 px = 0.5; tile (8,0): 1 of 4 = 0.25 < 0.3
    assert [(t.x, t.y, t.tissue) for t in tiles] == [(0, 0, 0.5)]
    with pytest.raises(ValueError):
        tissue_tiles(mask, 4, 16, 16, 8, None, 1.5)


def test_choose_level_by_downsample():
    ds = [1.0, 4.0, 16.0]
    assert choose_level(ds, 1.0) == 0
    assert choose_level(ds, 2.0) == 0  # read level 0 and resize down
    assert choose_level(ds, 4.0) == 1
    assert choose_level(ds, 8.0) == 1
    assert choose_level(ds, 100.0) == 2


def _slide(size=512):
    img = np.full((size, size, 3), 240, np.uint8)
    img[128:384, 128:384] = (180, 60, 120)
    img[128:384, 128:384, 1] = np.arange(256, dtype=np.uint8)[None, :] // 4 + 40  # texture
    return img


def test_stored_tile_equals_read_region_at_recorded_place():
    reader = ArraySlideReader(_slide(), levels=3, mpp=0.25)
    plan = plan_tiles(reader, tile_size=64, mpp=None, stride=None, threshold=0.3)
    assert plan.tiles, "the tissue square must yield tiles"
    for tile, rgb in read_tiles(reader, plan, 64, None):
        assert np.array_equal(rgb, reader.read_region(tile.x, tile.y, 0, 64, 64))


def test_background_tiles_are_never_read_at_full_resolution():
    reader = ArraySlideReader(_slide(), levels=3, mpp=0.25)
    plan = plan_tiles(reader, tile_size=64, mpp=None, stride=None, threshold=0.3)
    reader.reads.clear()
    list(read_tiles(reader, plan, 64, None))
    kept = {(t.x, t.y) for t in plan.tiles}
    assert {(x, y) for x, y, *_ in reader.reads} == kept
    assert all(128 - 64 < x < 384 and 128 - 64 < y < 384 for x, y in kept)


def test_block_mean_averages_each_block_with_white_beyond_the_edge():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 10, 3), dtype=np.uint8)
    padded = np.full((9, 12, 3), 255.0)
    padded[:7, :10] = rgb
    expected = padded.reshape(3, 3, 4, 3, 3).mean(axis=(1, 3))
    out = block_mean(rgb, 3)
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8
    assert np.abs(out - expected).max() <= 0.5 + 1e-9  # rounded to the nearest level


@pytest.mark.parametrize("level", [0, 1])
def test_a_mask_level_too_large_to_read_whole_is_read_in_bounded_blocks(monkeypatch, level):
    """A slide without a small enough level (here: a mask image capped at 64 px) is never read whole: blocks of at
    most READ_BLOCK_PX level pixels a side, each read once, averaged into the same image as the whole level."""
    monkeypatch.setattr(wsi, "MASK_MAX_PX", 64)
    monkeypatch.setattr(wsi, "READ_BLOCK_PX", 100)
    reader = ArraySlideReader(_slide(), levels=2, mpp=0.25)
    whole = reader.read_level(level)
    thumb, downsample = read_mask_image(reader, level)
    k = 512 // 2**level // 64
    assert downsample == 2**level * k
    assert np.array_equal(thumb, block_mean(whole, k))
    assert all(w <= 100 and h <= 100 and lv == level for _, _, lv, w, h in reader.reads)
    assert sum(w * h for *_, w, h in reader.reads) == whole.shape[0] * whole.shape[1]  # each pixel read once


def test_a_slide_without_a_pyramid_keeps_the_tiles_a_whole_level_mask_keeps(monkeypatch):
    reader = ArraySlideReader(_slide(), levels=1, mpp=0.25)
    whole = plan_tiles(reader, tile_size=64, mpp=None, stride=None, threshold=0.3)
    monkeypatch.setattr(wsi, "MASK_MAX_PX", 64)
    blocks = plan_tiles(reader, tile_size=64, mpp=None, stride=None, threshold=0.3)
    assert whole.mask_downsample == 1 and blocks.mask_downsample == 8 and blocks.thumb.shape == (64, 64, 3)
    assert [(t.x, t.y) for t in blocks.tiles] == [(t.x, t.y) for t in whole.tiles]
    assert len(whole.tiles) == 16  # the 256 px tissue square in 64 px tiles


def test_a_tile_far_coarser_than_its_level_is_read_in_bounded_blocks(monkeypatch):
    """4x coarser than level 0 with no level there: a 256 px square per 64 px tile, read in blocks of at most
    READ_BLOCK_PX and averaged on the way, close to resizing the whole square at once."""
    monkeypatch.setattr(wsi, "READ_BLOCK_PX", 100)
    img = np.full((1024, 1024, 3), 240, np.uint8)
    img[256:768, 256:768] = (180, 60, 120)
    img[256:768, 256:768, 1] = (np.arange(512)[None, :] // 8 + 40).astype(np.uint8)  # texture, 40-103
    reader = ArraySlideReader(img, levels=1, mpp=0.25)
    plan = plan_tiles(reader, tile_size=64, mpp=1.0, stride=None, threshold=0.3)
    assert plan.level == 0 and plan.size0 == 256 and len(plan.tiles) == 4
    reader.reads.clear()
    tiles = list(read_tiles(reader, plan, 64, None))
    assert all(w <= 100 and h <= 100 for *_, w, h in reader.reads)
    for tile, rgb in tiles:
        whole = cv2.resize(reader.read_region(tile.x, tile.y, 0, 256, 256), (64, 64), interpolation=cv2.INTER_AREA)
        assert rgb.shape == (64, 64, 3) and np.abs(rgb.astype(int) - whole).max() <= 1


def test_mpp_selects_level_and_resizes():
    reader = ArraySlideReader(_slide(), levels=3, mpp=0.25)
    plan = plan_tiles(reader, tile_size=32, mpp=1.0, stride=None, threshold=0.3)  # 4x downsample
    assert plan.level == 2 and plan.size0 == 128
    tiles = list(read_tiles(reader, plan, 32, None))
    assert tiles and all(rgb.shape == (32, 32, 3) for _, rgb in tiles)


def test_missing_mpp_is_level_zero_with_warning():
    reader = ArraySlideReader(_slide(), levels=2, mpp=None)
    plan = plan_tiles(reader, tile_size=64, mpp=0.5, stride=None, threshold=0.3)
    assert plan.level == 0 and plan.warnings == ["slide has no MPP metadata; tiled at level 0"]


def test_a_scan_coarser_than_asked_is_tiled_at_level_0_and_said():
    """Never upsampled; its tiles show more specimen than a finer scan's, which a model of one scale would miss
    unsaid. A scan within 10 % of the request (0.2525 µm/px for 0.25) is the request."""
    reader = ArraySlideReader(_slide(), levels=2, mpp=0.5)
    plan = plan_tiles(reader, tile_size=64, mpp=0.25, stride=None, threshold=0.3)
    assert plan.level == 0 and plan.size0 == 64
    said = "scanned at 0.5 µm/px, coarser than --mpp 0.25: tiled at level 0, each tile 2x as wide as asked"
    assert plan.warnings == [said]
    assert wsi.target_downsample(0.2525, None, 0.25, None) == (1.0, [])
    assert wsi.target_downsample(None, 20.0, None, 40.0) == (
        1.0,
        ["scanned at 20x, coarser than --magnification 40: tiled at level 0, each tile 2x as wide as asked"],
    )
    assert wsi.target_downsample(0.25, 40.0, 0.5, None) == (2.0, [])


def test_a_resolution_or_power_no_scanner_has_is_taken_as_unknown_and_said(tmp_path):
    """A tiled TIFF written with a 72 dpi default resolution, as many writers leave it: OpenSlide reports level 0
    as 352.8 µm/px. Taken at its word, ``--mpp 0.5`` tiled level 0 'coarser than asked' and every tile recorded
    that scale; it is ignored instead, as missing metadata is, and said. So is an objective power of 0."""
    import tifffile

    from ingest.slides import open_slide

    path = tmp_path / "72dpi.tif"
    level0 = _slide()[:512, :512]
    with tifffile.TiffWriter(path) as tif:
        tif.write(level0, tile=(256, 256), photometric="rgb", compression="jpeg", resolution=(72, 72),
                  resolutionunit="INCH")  # fmt: skip
        tif.write(level0[::2, ::2], tile=(256, 256), photometric="rgb", compression="jpeg", subfiletype=1)
    reader = open_slide(str(path))
    assert reader.mpp == pytest.approx(25400 / 72)
    ignored = "slide's MPP metadata (352.8 µm/px) is no scanner's (a file's default resolution?): ignored"
    plan = plan_tiles(reader, tile_size=64, mpp=0.5, stride=None, threshold=0.3)
    assert plan.level == 0 and plan.mpp is None
    assert plan.warnings == [ignored, "slide has no MPP metadata; tiled at level 0"]
    assert plan_tiles(reader, 64, None, None, 0.3).warnings == [ignored]  # said without --mpp too
    reader.close()
    assert wsi.scanned_scale(0.2527, 40.0) == (0.2527, 40.0, []) and wsi.scanned_scale(None, None) == (None, None, [])
    assert wsi.scanned_scale(8.0, 1.25)[:2] == (8.0, 1.25) and wsi.scanned_scale(0.001, None)[0] is None
    # a header's objective power of 0 (unknown) failed --magnification with a division by zero
    zero = ArraySlideReader(_slide(), levels=2, mpp=None)
    zero.objective_power = 0.0
    plan = plan_tiles(zero, tile_size=64, mpp=None, stride=None, threshold=0.3, magnification=20.0)
    assert plan.level == 0 and plan.warnings == [
        "slide's objective power (0x) is no scanner's: ignored",
        "slide has no objective power; tiled at level 0",
    ]


def test_preview_marks_mask_outline_and_kept_tiles():
    import cv2

    from ingest.preview import preview_png

    img = np.full((512, 512, 3), 240, np.uint8)
    img[100:400, 100:400] = (180, 60, 120)  # edges off the 64 px tile grid, so outline and boxes do not overlap
    reader = ArraySlideReader(img, levels=3, mpp=0.25)
    plan = plan_tiles(reader, tile_size=64, mpp=None, stride=None, threshold=0.3)
    png = preview_png(plan.thumb, plan.mask, plan.mask_downsample, plan.tiles)
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    assert img.shape == plan.thumb.shape
    green = np.all(img == (0, 200, 0), axis=2)
    blue = np.all(img == (30, 80, 230), axis=2)
    assert green.sum() > 0 and blue.sum() > 0
    assert not green[:100, :100].any()  # no outline in the blank corner


def test_transparent_slide_areas_become_white():
    from ingest.slides import _flatten_rgba

    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    assert _flatten_rgba(rgba)[0, 0].tolist() == [10, 20, 30]
    assert _flatten_rgba(rgba)[1, 1].tolist() == [255, 255, 255]
    opaque = rgba.copy()
    opaque[:, :, 3] = 255
    assert np.array_equal(_flatten_rgba(opaque), opaque[:, :, :3])


def test_a_slide_stored_grey_is_said_to_be_why_it_yields_no_tiles(tmp_path):
    """Saturation finds no tissue in a slide without colour: its record says so, where "no tissue above the
    threshold" alone left the user to guess; a stained slide of the same tissue is tiled as ever."""
    from ingest.config import WsiIngestConfig
    from ingest.plan import make_plan
    from ingest.synthetic import slide_array, write_pyramid_tiff
    from ingest.units import GREY, plan_unit

    stained = slide_array(1024, "CE", np.random.default_rng(2))
    grey = cv2.cvtColor(cv2.cvtColor(stained, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    assert colourless(grey) and not colourless(stained)
    (tmp_path / "in").mkdir()
    write_pyramid_tiff(tmp_path / "in" / "grey.tif", grey)
    write_pyramid_tiff(tmp_path / "in" / "stained.tif", stained)
    cfg = WsiIngestConfig(sources=[str(tmp_path / "in")], out=str(tmp_path / "out"), tile_size=128, split="train=1.0")
    plan = make_plan("wsi", cfg, b"k")
    found = {plan.private[u.id].rsplit("/", 1)[-1]: plan_unit(u, cfg) for u in plan.units}
    (grey_works, grey_warnings), (works, warnings) = found["grey.tif"], found["stained.tif"]
    assert not any(w.plan.tiles for w in grey_works) and GREY in grey_warnings
    assert sum(len(w.plan.tiles) for w in works) > 0 and GREY not in warnings
