"""Vendor formats read through OpenSlide's own backends, with synthetic files OpenSlide reads: MIRAX (3DHISTECH; a
slide is ``x.mrxs`` plus the data folder ``x/``, planned, cut and downloaded as one slide) and NDPI (Hamamatsu;
levels are single JPEGs with restart markers, plus a macro photo) and VMS and VMU (Hamamatsu; a key file naming JPEGs,
or uncompressed NGR images, beside it, planned and downloaded with them), Philips TIFF (XML metadata, label and
macro photos inside it, sparse tiles), Ventana BIF (overlapping tiles), Leica SCN (scanned regions placed on the
glass) and Sakura SVSLIDE (a SQLite database of per-channel JPEG tiles). All are cut like any slide and stay
private; Tessera's direct tile reads serve only the levels whose pixels lie where the TIFF page has them."""

import json
import os

import numpy as np
import openslide
import pytest

from ingest.config import WsiIngestConfig
from ingest.plan import plan_wsi
from ingest.slides import OpenSlideReader
from ingest.source_cache import SourceCache
from ingest.synthetic import SyntheticPatient, slide_array
from ingest.synthetic_sakura import write_svslide
from ingest.synthetic_vendor import write_mirax, write_ndpi, write_vms, write_vmu
from ingest.synthetic_xml_tiff import write_bif, write_philips, write_scn
from ingest.units import plan_slide, wsi_samples
from shards.schema import decode_image

PATIENT = SyntheticPatient("ROE^RICHARD", "MRN777", "19550505")


def _check_tiles(unit, reader: OpenSlideReader, out, stem: str) -> list[dict]:
    """Cut ``unit`` into 128 px PNG tiles: each equals OpenSlide's pixels at its recorded place, and no sample
    holds the patient's identity or the file's name. Returns the samples' metadata."""
    cfg = WsiIngestConfig(sources=unit.sources[:1], out=str(out), tile_size=128, format="png")
    works, _ = plan_slide(unit, cfg)
    samples = [s for w in works for s in wsi_samples(w, cfg)]
    assert len(samples) > 5
    private = [PATIENT.name, PATIENT.patient_id, PATIENT.birth_date, stem]
    for sample in samples:
        meta = json.loads(sample["json"])
        assert np.array_equal(decode_image(sample["png"]), reader.read_region(meta["x"], meta["y"], 0, 128, 128))
        blob = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in sample.values())
        assert not any(p.encode() in blob for p in private)
    reader.close()
    return [json.loads(sample["json"]) for sample in samples]


def _check_download(unit, laid_out) -> None:
    """What a worker does with a multi-file slide on s3:// (here any location counts as remote): the copy is laid
    out as ``laid_out(copy path)`` expects and OpenSlide reads the same pixels from it."""
    cache = SourceCache(slots=1, remote=lambda loc: True)
    copy = cache.path(unit.sources)
    assert copy != unit.sources[0] and laid_out(copy)
    original, local = OpenSlideReader(unit.sources[0]), OpenSlideReader(copy)
    assert np.array_equal(original.read_region(300, 300, 0, 200, 200), local.read_region(300, 300, 0, 200, 200))
    original.close(), local.close()
    cache.clear()


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
    _check_tiles(unit, reader, tmp_path, "clot_m")


def test_a_downloaded_copy_keeps_the_layout_openslide_needs(mirax):
    root, _ = mirax
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(root)], out=str(root / "out")), b"k").units
    _check_download(unit, lambda copy: os.path.isfile(os.path.join(copy[: -len(".mrxs")], "Slidedat.ini")))


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
    kept = {(m["x"], m["y"]) for m in _check_tiles(unit, OpenSlideReader(unit.sources[0]), tmp_path, "clot_p")}
    # both on tissue (the slide's background is 237 grey, its tissue about 116); the second in the gap (1, 1) left
    assert level0[128:256, 384:512].mean() < 150 and level0[256:384, 256:384].mean() < 150
    assert (384, 128) in kept and (256, 256) not in kept


@pytest.fixture(scope="module")
def philips(tmp_path_factory):
    """A Philips TIFF of 1300 px (levels padded to 1536, 768 and 512 px), its level-0 tile (2, 2), over tissue,
    never scanned."""
    root = tmp_path_factory.mktemp("philips")
    level0 = slide_array(1300, "LAA", np.random.default_rng(9))
    write_philips(root / "clot_ph.tiff", level0, PATIENT, unscanned=frozenset({(2, 2)}))
    return root / "clot_ph.tiff", level0


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
    metas = _check_tiles(unit, OpenSlideReader(unit.sources[0], fast=False), tmp_path, "clot_ph")
    kept = {(m["x"], m["y"]) for m in metas}
    assert level0[512:640, 512:640].mean() < 200 and (512, 512) not in kept  # tissue, but never scanned
    assert any(level0[y : y + 128, x : x + 128].mean() < 200 for x, y in kept)


@pytest.fixture(scope="module", params=[0, 12], ids=["abutting", "overlapping"])
def bif(request, tmp_path_factory):
    """A Ventana BIF of 988 px (four tiles across either way) whose tiles abut, or overlap their neighbours by 12 px."""
    root = tmp_path_factory.mktemp("bif")
    level0 = slide_array(988, "CE", np.random.default_rng(4))
    write_bif(root / "clot_v.bif", level0, PATIENT, overlap=request.param)
    return root / "clot_v.bif", level0, request.param


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
    _check_tiles(unit, OpenSlideReader(unit.sources[0], fast=False), tmp_path, "clot_v")


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
    metas = _check_tiles(unit, OpenSlideReader(unit.sources[0], fast=False), tmp_path, "clot_l")
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
    level0 = slide_array(1000, "LAA", np.random.default_rng(5))
    write_svslide(root / "clot_s.svslide", level0, PATIENT, unscanned=frozenset({(1, 2)}))
    return root / "clot_s.svslide", level0


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
    metas = _check_tiles(unit, OpenSlideReader(unit.sources[0]), tmp_path, "clot_s")
    kept = {(m["x"], m["y"]) for m in metas}
    assert level0[512:640, 256:384].mean() < 200 and (256, 512) not in kept  # tissue, but never scanned


@pytest.fixture(scope="module")
def ndpi(tmp_path_factory):
    root = tmp_path_factory.mktemp("ndpi")
    level0 = slide_array(700, "LAA", np.random.default_rng(7))
    write_ndpi(root / "clot_n.ndpi", level0, PATIENT)
    return root / "clot_n.ndpi", level0


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
    _check_tiles(unit, OpenSlideReader(str(path)), tmp_path, "clot_n")


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
    _check_download(unit, lambda copy: os.path.isfile(copy[: -len(ext) - 1] + HAMAMATSU[ext][1][-1][len("clot_h") :]))


def test_vms_and_vmu_tiles_equal_openslide_at_the_recorded_place_and_carry_nothing_identifying(hamamatsu, tmp_path):
    root, _, _ = hamamatsu
    [unit] = plan_wsi(WsiIngestConfig(sources=[str(root)], out=str(tmp_path)), b"k").units
    _check_tiles(unit, OpenSlideReader(unit.sources[0]), tmp_path, "clot_h")


def test_vms_companions_read_only_the_file_keys_of_a_key_file():
    from ingest.sources import vms_companions

    text = "[Virtual Microscope Specimen]\nImageFile(0,1)=b.jpg\nImageFile=a.jpg\nMapFile=m.jpg\nNoLayers=1\n"
    assert vms_companions("s3://x/s/slide.vms", text) == ["s3://x/s/a.jpg", "s3://x/s/b.jpg", "s3://x/s/m.jpg"]
    assert vms_companions("s3://x/s/slide.vms", "[Other]\nImageFile=a.jpg\n") == []
    assert vms_companions("s3://x/s/slide.vms", "not an ini file") == []
    assert vms_companions("/s/slide.vms", "[Virtual Microscope Specimen]\nImageFile=../../etc/passwd\n") == []
