"""Vendor formats read through OpenSlide's own backends, with synthetic files OpenSlide reads: Aperio SVS (tiled
levels; thumbnail, label and macro photos stripped), MIRAX (3DHISTECH; a slide is ``x.mrxs`` plus the data folder
``x/``, planned, cut and downloaded as one slide), NDPI (Hamamatsu; levels are single JPEGs with restart markers,
plus a macro photo), VMS and VMU (Hamamatsu; a key file naming JPEGs, or uncompressed NGR images, beside it, planned
and downloaded with them), Philips TIFF (XML metadata, label and macro photos inside it, sparse tiles) and Ventana
BIF (overlapping tiles). All are cut like any slide and stay private; Tessera's direct tile reads serve only the
levels whose pixels lie where the TIFF page has them. Leica, Sakura and Trestle are in
``test_vendor_formats_more.py``."""

import os

import numpy as np
import openslide
import pytest

from ingest.config import WsiIngestConfig
from ingest.plan import plan_wsi
from ingest.slides import OpenSlideReader
from ingest.synthetic import slide_array
from ingest.synthetic_vendor import write_mirax, write_ndpi, write_svs, write_vms, write_vmu
from ingest.synthetic_xml_tiff import write_bif, write_philips
from tests.vendor_checks import PATIENT, check_download, check_tiles, write_slide


@pytest.fixture(scope="module")
def svs(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("svs"), "clot_a.svs", 1200, "CE", 2, write_svs)


def test_openslide_reads_the_synthetic_svs_and_direct_reads_serve_its_levels(svs):
    path, level0 = svs
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "aperio"
        # the scan's file name and user: the patient's name and id here, to be kept out
        assert (slide.properties["aperio.Filename"], slide.properties["aperio.User"]) == (PATIENT.name, "MRN777")
        assert set(slide.associated_images) == {"thumbnail", "label", "macro"}
    reader = OpenSlideReader(str(path))
    assert reader.level_dimensions == [(1200, 1200), (300, 300), (75, 75)] and reader.mpp == pytest.approx(0.5)
    assert reader.direct_levels == [0, 1, 2]  # the thumbnail, label and macro are stripped: never a level
    assert np.abs(reader.read_region(0, 0, 0, 1200, 1200).astype(int) - level0).mean() < 5
    reader.close()


def test_svs_tiles_equal_openslide_and_carry_nothing_identifying(svs, tmp_path):
    path, _ = svs
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(path)], out=str(tmp_path)), b"k").units
    check_tiles(unit, OpenSlideReader(unit.sources[0], fast=False), tmp_path, "clot_a")  # OpenSlide's own pixels


@pytest.fixture(scope="module")
def mirax(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirax")
    level0 = slide_array(700, "CE", np.random.default_rng(6))
    write_mirax(root / "clot_m.mrxs", level0, PATIENT)
    (root / "notes.txt").write_text("not a slide")
    return root, level0


def test_openslide_reads_the_synthetic_mirax(mirax):
    root, level0 = mirax
    reader = OpenSlideReader(str(root / "clot_m.mrxs"))
    # 700 px in 256 px camera images: three across, the last padded with white
    assert reader.level_dimensions == [(768, 768), (384, 384), (192, 192)] and reader.mpp == pytest.approx(0.5)
    assert np.abs(reader.read_region(100, 200, 0, 256, 256).astype(int) - level0[200:456, 100:356]).mean() < 5
    half = reader.read_region(0, 0, 1, 300, 300).astype(int)
    assert np.abs(half - level0[::2, ::2][:300, :300]).mean() < 5
    reader.close()


def test_the_data_folder_is_part_of_its_slide_not_skipped_inputs(mirax):
    root, _ = mirax
    plan = plan_wsi(WsiIngestConfig(sources=[str(root)], out=str(root / "out")), b"k")
    [unit] = plan.units
    names = [os.path.relpath(f, root) for f in unit.sources]
    assert names == ["clot_m.mrxs", "clot_m/Data0000.dat", "clot_m/Index.dat", "clot_m/Slidedat.ini"]
    assert [r.reason for r in plan.skipped] == ["not a slide file (extension .txt)"]
    # the .mrxs named alone brings its folder
    [alone] = plan_wsi(WsiIngestConfig(sources=[str(root / "clot_m.mrxs")], out=str(root / "out")), b"k").units
    assert alone.sources == unit.sources


def test_tiles_equal_openslide_at_the_recorded_place_and_carry_nothing_identifying(mirax, tmp_path):
    root, _ = mirax
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(root)], out=str(tmp_path)), b"k").units
    reader = OpenSlideReader(unit.sources[0])
    with openslide.OpenSlide(unit.sources[0]) as slide:  # the scanner's slide name is there, to be kept out
        assert "ROE^RICHARD MRN777" in slide.properties["mirax.GENERAL.SLIDE_NAME"]
    check_tiles(unit, reader, tmp_path, "clot_m")


def test_a_downloaded_copy_keeps_the_layout_openslide_needs(mirax):
    root, _ = mirax
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(root)], out=str(root / "out")), b"k").units
    check_download(unit, lambda copy: os.path.isfile(os.path.join(copy[: -len(".mrxs")], "Slidedat.ini")))


@pytest.fixture(scope="module")
def mapped_mirax(tmp_path_factory):
    """A MIRAX as scanners write it: 256 px camera images overlapping by 24 px, each up to 5 px off the grid, their
    places in a position map, and one position (1, 1), over tissue, never captured."""
    root = tmp_path_factory.mktemp("mapped-mirax")
    level0 = slide_array(900, "CE", np.random.default_rng(6))
    places = write_mirax(root / "clot_p.mrxs", level0, PATIENT, overlap=24, jitter=5, skip=frozenset({(1, 1)}))
    return root, level0, places


def test_openslide_places_mirax_camera_images_by_the_position_map(mapped_mirax):
    root, level0, places = mapped_mirax
    reader = OpenSlideReader(str(root / "clot_p.mrxs"))
    assert reader.level_dimensions[0] == (4 * (256 - 24) + 24,) * 2  # four images across, less three overlaps
    assert any(place != (gx * 232, gy * 232) for (gx, gy), place in places.items())  # off the nominal grid
    truth = np.full((1200, 1200, 3), 255, np.uint8)
    truth[:900, :900] = level0
    for x, y in places.values():  # each camera image where the map puts it
        assert np.abs(reader.read_region(x, y, 0, 256, 256).astype(int) - truth[y : y + 256, x : x + 256]).mean() < 5
    # (1, 1) never captured: beyond its neighbours' reach OpenSlide has no pixels there, and Tessera reads white
    with openslide.OpenSlide(str(root / "clot_p.mrxs")) as slide:
        assert np.asarray(slide.read_region((270, 270), 0, (180, 180)))[..., 3].max() == 0
    assert truth[270:450, 270:450].mean() < 200  # though there is tissue under it
    assert (reader.read_region(270, 270, 0, 180, 180) == 255).all()
    reader.close()


def test_mapped_mirax_tiles_equal_openslide_and_none_is_cut_from_pixels_never_captured(mapped_mirax, tmp_path):
    root, level0, _ = mapped_mirax
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(root)], out=str(tmp_path)), b"k").units
    kept = {(m["x"], m["y"]) for m in check_tiles(unit, OpenSlideReader(unit.sources[0]), tmp_path, "clot_p")}
    # both on tissue (the slide's background is 237 grey, its tissue about 116); the second in the gap (1, 1) left
    assert level0[128:256, 384:512].mean() < 150 and level0[256:384, 256:384].mean() < 150
    assert (384, 128) in kept and (256, 256) not in kept


@pytest.fixture(scope="module")
def philips(tmp_path_factory):
    """A Philips TIFF of 1300 px (levels padded to 1536, 768 and 512 px), its level-0 tile (2, 2), over tissue,
    never scanned."""
    root = tmp_path_factory.mktemp("philips")
    return write_slide(root, "clot_ph.tiff", 1300, "LAA", 9, write_philips, unscanned=frozenset({(2, 2)}))


def test_openslide_reads_the_synthetic_philips_tiff(philips):
    path, level0 = philips
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "philips"
        assert slide.properties["philips.PIM_DP_UFS_BARCODE"]  # the patient's id, base64, to be kept out
        assert {"label", "macro"} <= set(slide.associated_images)  # the label photo shows the patient's name
        assert np.asarray(slide.read_region((512, 512), 0, (256, 256)))[..., 3].max() == 0  # never scanned
    reader = OpenSlideReader(str(path))
    # downsamples from the XML's pixel spacings: the last page is 512 px, not 1536 / 4
    assert reader.level_downsamples == [1.0, 2.0, 4.0] and reader.mpp == pytest.approx(0.25)
    assert np.abs(reader.read_region(100, 100, 0, 300, 300).astype(int) - level0[100:400, 100:400]).mean() < 5
    assert level0[512:768, 512:768].mean() < 200 and (reader.read_region(512, 512, 0, 256, 256) == 255).all()
    reader.close()


def test_philips_tiles_equal_openslide_and_none_is_cut_from_tiles_never_scanned(philips, tmp_path):
    path, level0 = philips
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(path.parent)], out=str(tmp_path)), b"k").units
    assert OpenSlideReader(unit.sources[0]).direct_levels == [0, 1]  # Tessera's own tile reads serve level 0
    # compared with OpenSlide's own pixels (not the direct reads ingest uses)
    metas = check_tiles(unit, OpenSlideReader(unit.sources[0], fast=False), tmp_path, "clot_ph")
    kept = {(m["x"], m["y"]) for m in metas}
    assert level0[512:640, 512:640].mean() < 200 and (512, 512) not in kept  # tissue, but never scanned
    assert any(level0[y : y + 128, x : x + 128].mean() < 200 for x, y in kept)


@pytest.fixture(scope="module", params=[0, 12], ids=["abutting", "overlapping"])
def bif(request, tmp_path_factory):
    """A Ventana BIF of 988 px (four tiles across either way) whose tiles abut, or overlap their neighbours by 12 px."""
    root = tmp_path_factory.mktemp("bif")
    return *write_slide(root, "clot_v.bif", 988, "CE", 4, write_bif, overlap=request.param), request.param


def test_openslide_reads_the_synthetic_bif_and_direct_reads_take_only_abutting_tiles(bif):
    path, level0, overlap = bif
    with openslide.OpenSlide(str(path)) as slide:
        assert slide.properties["openslide.vendor"] == "ventana"
        assert slide.properties["ventana.BarCode1D"] == PATIENT.patient_id  # to be kept out
        assert "macro" in slide.associated_images  # the label photo, which shows the patient's name
    reader = OpenSlideReader(str(path))
    assert reader.level_dimensions[0] == (3 * (256 - overlap) + 256,) * 2 and reader.mpp == pytest.approx(0.25)
    assert np.abs(reader.read_region(300, 300, 0, 400, 400).astype(int) - level0[300:700, 300:700]).mean() < 5
    # overlapping tiles do not lie where the TIFF page has them: OpenSlide alone places them
    assert reader.direct_levels == ([] if overlap else [0, 1, 2])
    reader.close()


def test_bif_tiles_equal_openslide_and_carry_nothing_identifying(bif, tmp_path):
    path, _, _ = bif
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(path)], out=str(tmp_path)), b"k").units
    check_tiles(unit, OpenSlideReader(unit.sources[0], fast=False), tmp_path, "clot_v")


@pytest.fixture(scope="module")
def ndpi(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("ndpi"), "clot_n.ndpi", 700, "LAA", 7, write_ndpi)


def test_openslide_reads_the_synthetic_ndpi_and_its_macro_is_not_a_level(ndpi):
    path, level0 = ndpi
    assert openslide.OpenSlide.detect_format(str(path)) == "hamamatsu"
    reader = OpenSlideReader(str(path))
    # padded to whole JPEG blocks at every level; OpenSlide adds levels by JPEG scaling
    assert reader.level_dimensions[:3] == [(704, 704), (352, 352), (176, 176)] and reader.mpp == pytest.approx(0.5)
    assert np.abs(reader.read_region(100, 200, 0, 256, 256).astype(int) - level0[200:456, 100:356]).mean() < 5
    reader.close()
    with openslide.OpenSlide(str(path)) as slide:
        assert list(slide.associated_images) == ["macro"]
        assert slide.properties["hamamatsu.Reference"] == PATIENT.patient_id  # there to be kept out


def test_ndpi_tiles_equal_openslide_at_the_recorded_place_and_carry_nothing_identifying(ndpi, tmp_path):
    path, _ = ndpi
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(path)], out=str(tmp_path)), b"k").units
    check_tiles(unit, OpenSlideReader(str(path)), tmp_path, "clot_n")


# Hamamatsu key-file formats: the key file's extension, its writer, the files it names, and the largest mean
# difference from the level-0 array (JPEG for VMS; VMU is uncompressed, so exact).
HAMAMATSU = {
    "vms": (write_vms, ["clot_h.vms", "clot_h.jpg", "clot_h_macro.jpg", "clot_h_map.jpg"], 5),
    "vmu": (write_vmu, ["clot_h.vmu", "clot_h.ngr", "clot_h_macro.jpg", "clot_h_map.ngr"], 0),
}


@pytest.fixture(scope="module", params=sorted(HAMAMATSU))
def hamamatsu(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    level0 = slide_array(700, "CE", np.random.default_rng(9))
    HAMAMATSU[request.param][0](root / f"clot_h.{request.param}", level0, PATIENT)
    (root / "other.jpg").write_bytes(b"a photo that belongs to no slide")
    return root, level0, request.param


def test_openslide_reads_the_synthetic_vms_and_vmu(hamamatsu):
    root, level0, ext = hamamatsu
    reader = OpenSlideReader(str(root / f"clot_h.{ext}"))
    assert reader.level_dimensions[0] == (704, 704) and reader.mpp == pytest.approx(0.5)
    diff = np.abs(reader.read_region(100, 200, 0, 256, 256).astype(int) - level0[200:456, 100:356]).mean()
    assert diff <= HAMAMATSU[ext][2]
    reader.close()


def test_a_key_file_brings_the_images_it_names(hamamatsu):
    root, _, ext = hamamatsu
    plan = plan_wsi(WsiIngestConfig(sources=[str(root)], out=str(root / "out")), b"k")
    [unit] = plan.units
    assert [os.path.relpath(f, root) for f in unit.sources] == HAMAMATSU[ext][1]
    assert [r.reason for r in plan.skipped] == ["not a slide file (extension .jpg)"]  # other.jpg only
    check_download(unit, lambda copy: os.path.isfile(copy[: -len(ext) - 1] + HAMAMATSU[ext][1][-1][len("clot_h") :]))


def test_vms_and_vmu_tiles_equal_openslide_at_the_recorded_place_and_carry_nothing_identifying(hamamatsu, tmp_path):
    root, _, _ = hamamatsu
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(root)], out=str(tmp_path)), b"k").units
    check_tiles(unit, OpenSlideReader(unit.sources[0]), tmp_path, "clot_h")


def test_vms_companions_read_only_the_file_keys_of_a_key_file():
    from ingest.sources import vms_companions

    text = "[Virtual Microscope Specimen]\nImageFile(0,1)=b.jpg\nImageFile=a.jpg\nMapFile=m.jpg\nNoLayers=1\n"
    assert vms_companions("s3://x/s/slide.vms", text) == ["s3://x/s/a.jpg", "s3://x/s/b.jpg", "s3://x/s/m.jpg"]
    assert vms_companions("s3://x/s/slide.vms", "[Other]\nImageFile=a.jpg\n") == []
    assert vms_companions("s3://x/s/slide.vms", "not an ini file") == []
    assert vms_companions("/s/slide.vms", "[Virtual Microscope Specimen]\nImageFile=../../etc/passwd\n") == []
