"""More vendor formats read through OpenSlide's own backends, with synthetic files: Leica SCN (scanned regions placed
on the glass by XML, a macro photo with the label), Sakura SVSLIDE (a SQLite database of per-channel JPEG tiles) and
Trestle (overlapping tiles, the macro photo in a file beside the slide). Tiles are cut like any slide's, equal
OpenSlide's pixels and stay private; none is cut from glass never scanned, and Tessera's direct tile reads stay off.
"""

import numpy as np
import openslide
import pytest

from ingest.config import WsiIngestConfig
from ingest.plan import plan_wsi
from ingest.slides import OpenSlideReader
from ingest.synthetic import slide_array
from ingest.synthetic_sakura import write_svslide
from ingest.synthetic_vendor import write_trestle
from ingest.synthetic_xml_tiff import write_scn
from tests.vendor_checks import PATIENT, check_tiles, write_slide

# Leica SCN: two scanned regions (level-0 x, y, width, height) on 1280 x 768 px of glass with tissue right of the label.
SCN_REGIONS = [(256, 384, 384, 384), (768, 256, 256, 384)]


@pytest.fixture(scope="module")
def scn(tmp_path_factory):
    root = tmp_path_factory.mktemp("scn")
    glass = np.full((768, 1280, 3), 255, np.uint8)
    glass[:, 256:] = slide_array(1024, "CE", np.random.default_rng(3))[:768]
    write_scn(root / "clot_l.scn", glass, SCN_REGIONS, PATIENT)
    return root / "clot_l.scn", glass


def _scanned(x: int, y: int, w: int, h: int) -> bool:
    return any(x < rx + rw and rx < x + w and y < ry + rh and ry < y + h for rx, ry, rw, rh in SCN_REGIONS)


def test_openslide_composites_the_scanned_regions_of_a_synthetic_scn_on_the_glass(scn):
    path, glass = scn
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "leica"
        assert slide.properties["leica.barcode"] == PATIENT.patient_id  # to be kept out
        assert list(slide.associated_images) == ["macro"]  # the photo of the glass, label and name included
        everything = np.asarray(slide.read_region((0, 0), 0, (1280, 768)))
    reader = OpenSlideReader(str(path))
    assert reader.level_dimensions == [(1280, 768), (320, 192), (80, 48)] and reader.mpp == pytest.approx(0.5)
    for x, y, w, h in SCN_REGIONS:
        assert np.abs(reader.read_region(x, y, 0, w, h).astype(int) - glass[y : y + h, x : x + w]).mean() < 5
    between = everything[256:, 640:768]  # glass with tissue on it, between the regions, never scanned
    assert glass[256:, 640:768].mean() < 200 and between[..., 3].max() == 0
    assert (reader.read_region(640, 256, 0, 128, 512) == 255).all()
    reader.close()


def test_scn_tiles_equal_openslide_and_none_is_cut_from_glass_never_scanned(scn, tmp_path):
    path, glass = scn
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(path)], out=str(tmp_path)), b"k").units
    metas = check_tiles(unit, OpenSlideReader(unit.sources[0], fast=False), tmp_path, "clot_l")
    assert all(_scanned(m["x"], m["y"], 128, 128) for m in metas)
    unscanned_tissue = [
        (x, y)
        for y in range(0, 768, 128)
        for x in range(256, 1280, 128)
        if glass[y : y + 128, x : x + 128].mean() < 200 and not _scanned(x, y, 128, 128)
    ]
    assert unscanned_tissue  # there was tissue to be fooled by


def test_a_leica_macro_photo_as_large_as_a_level_is_never_read_as_that_level(tmp_path):
    """Tissue at one end of the glass: a probe of the middle of the smallest level sees empty glass in OpenSlide's
    level and in the macro photo alike, yet the photo shows the label, with the patient's name, at its left end."""
    import tifffile

    glass = np.full((1024, 4096, 3), 255, np.uint8)
    glass[256:768, 640:1280] = slide_array(640, "CE", np.random.default_rng(3))[:512]
    write_scn(tmp_path / "end.scn", glass, [(640, 256, 640, 512)], PATIENT)
    reader = OpenSlideReader(str(tmp_path / "end.scn"))
    with tifffile.TiffFile(tmp_path / "end.scn") as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].shape[1::-1] == reader.level_dimensions[2]
    assert reader.direct_levels == []
    assert (reader.read_region(0, 0, 2, 32, 64) == 255).all()  # OpenSlide's empty glass, not the label
    reader.close()


@pytest.fixture(scope="module")
def svslide(tmp_path_factory):
    """A Sakura SVSLIDE of 1000 px whose level-0 tile (1, 2), over tissue, was never scanned."""
    root = tmp_path_factory.mktemp("sakura")
    return write_slide(root, "clot_s.svslide", 1000, "LAA", 5, write_svslide, unscanned=frozenset({(1, 2)}))


def test_openslide_reads_the_synthetic_svslide(svslide):
    path, level0 = svslide
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "sakura"
        # the slide record names the patient, and the label photo shows the name: all to be kept out
        assert slide.properties["sakura.SlideId"] == PATIENT.patient_id
        assert slide.properties["sakura.Description"] == PATIENT.name
        assert set(slide.associated_images) == {"label", "macro", "thumbnail"}
        assert np.asarray(slide.read_region((256, 512), 0, (256, 256)))[..., 3].max() == 0  # never scanned
    reader = OpenSlideReader(str(path))
    assert reader.level_dimensions == [(1000, 1000), (500, 500), (250, 250)] and reader.mpp == pytest.approx(0.5)
    assert reader.direct_levels == []  # a SQLite database: OpenSlide alone reads it
    assert np.abs(reader.read_region(0, 0, 0, 1000, 512).astype(int) - level0[:512]).mean() < 5
    assert level0[512:768, 256:512].mean() < 200 and (reader.read_region(256, 512, 0, 256, 256) == 255).all()
    reader.close()


def test_svslide_tiles_equal_openslide_and_none_is_cut_from_tiles_never_scanned(svslide, tmp_path):
    path, level0 = svslide
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(path)], out=str(tmp_path)), b"k").units
    metas = check_tiles(unit, OpenSlideReader(unit.sources[0]), tmp_path, "clot_s")
    kept = {(m["x"], m["y"]) for m in metas}
    assert level0[512:640, 256:384].mean() < 200 and (256, 512) not in kept  # tissue, but never scanned


@pytest.fixture(scope="module")
def trestle(tmp_path_factory):
    """A Trestle TIFF of 900 px whose 256 px tiles overlap by 16 px at level 0, its macro photo beside it."""
    return write_slide(tmp_path_factory.mktemp("trestle"), "clot_t.tif", 900, "CE", 2, write_trestle, overlap=16)


def test_openslide_reads_the_synthetic_trestle_tiff_and_its_overlapping_tiles(trestle):
    path, level0 = trestle
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "trestle"
        assert slide.properties["trestle.Slide Name"] == PATIENT.patient_id  # to be kept out
        assert list(slide.associated_images) == ["macro"]  # the photo beside it, label and name included
    reader = OpenSlideReader(str(path))
    # four tiles across, each advancing 256 - 16 px; the MPP from the resolution tags as they stand
    assert reader.level_dimensions[0] == (4 * 240 + 16,) * 2 and reader.mpp == pytest.approx(0.5)
    assert reader.direct_levels == []  # overlapping tiles: OpenSlide alone places them
    assert np.abs(reader.read_region(0, 0, 0, 900, 900).astype(int) - level0).mean() < 5
    reader.close()


def test_trestle_tiles_equal_openslide_and_its_macro_photo_is_a_skipped_input(trestle, tmp_path):
    path, _ = trestle
    plan = plan_wsi(WsiIngestConfig(sources=[str(path.parent)], out=str(tmp_path)), b"k")
    assert [u.sources for u in plan.units] == [[str(path)]]
    assert [r.reason for r in plan.skipped] == ["not a slide file (extension .full)"]
    check_tiles(plan.units[0], OpenSlideReader(str(path)), tmp_path, "clot_t")
