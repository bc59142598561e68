"""DICOM WSI: a series of files is one slide, read through OpenSlide like any other, and private like any other."""

import json
import os

import numpy as np
import pydicom
import pytest

from ingest.config import WsiIngestConfig
from ingest.dicom_wsi import group_dicom_slides
from ingest.plan import plan_wsi
from ingest.slides import OpenSlideReader
from ingest.synthetic import SyntheticPatient, ct_slice_dataset, slide_array, write_dicom_wsi
from ingest.units import Unit, plan_slide, wsi_samples
from shards.schema import decode_image

PATIENTS = [SyntheticPatient("ROE^RICHARD", "MRN777", "19550505"), SyntheticPatient("POE^EDGAR", "MRN888", "19490119")]


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    """Two DICOM WSI slides in their own folders, a CT slice and a file that only claims to be DICOM."""
    root = tmp_path_factory.mktemp("dicom_wsi")
    rng = np.random.default_rng(4)
    level0 = {}
    for name, patient, label in [("clot_a", PATIENTS[0], "CE"), ("clot_b", PATIENTS[1], "LAA")]:
        level0[name] = slide_array(768, label, rng)
        write_dicom_wsi(root / name, level0[name], patient)
    ct = ct_slice_dataset(np.zeros((8, 8)), PATIENTS[0], "1.2.3", "1.2.3.4", 0)
    ct.save_as(root / "ct.dcm", enforce_file_format=True)
    (root / "junk.dcm").write_bytes(b"not a dicom file at all")
    return root, level0


def test_a_series_of_level_files_is_one_slide_named_for_its_folder(slides):
    root, _ = slides
    files = sorted(str(p) for p in root.rglob("*.dcm"))
    grouped, refused = group_dicom_slides(files)
    assert [s.name for s in grouped] == ["clot_a", "clot_b"]
    for slide in grouped:
        assert len(slide.files) == 4  # three pyramid levels and the label image
        assert pydicom.dcmread(slide.files[0], stop_before_pixels=True).TotalPixelMatrixColumns == 768
    assert "not a whole-slide DICOM" in refused[str(root / "ct.dcm")]
    assert "unreadable DICOM header" in refused[str(root / "junk.dcm")]
    # two slides sharing a folder are told apart by their series
    mixed = [f for f in files if "clot_" in f]
    for f in mixed:
        os.link(f, root / f"mixed_{os.path.basename(f)}")
    both, _ = group_dicom_slides(sorted(str(p) for p in root.glob("mixed_*.dcm")))
    assert len(both) == 2 and all(s.name.count(".") > 3 for s in both)  # SeriesInstanceUIDs
    for p in root.glob("mixed_*.dcm"):
        p.unlink()


def test_a_whole_slide_file_without_a_series_is_refused_alone(slides, tmp_path):
    root, _ = slides
    label = sorted((root / "clot_a").glob("*.dcm"))[0]
    ds = pydicom.dcmread(label)
    del ds.SeriesInstanceUID
    ds.save_as(tmp_path / "orphan.dcm")
    grouped, refused = group_dicom_slides([str(tmp_path / "orphan.dcm")])
    assert grouped == [] and refused == {str(tmp_path / "orphan.dcm"): "whole-slide DICOM without a SeriesInstanceUID"}


def test_planning_gives_one_unit_per_slide_and_records_every_refused_file(slides, monkeypatch):
    root, _ = slides
    monkeypatch.setenv("TESSERA_PSEUDONYM_KEY", "test")
    plan = plan_wsi(WsiIngestConfig(sources=[str(root)], out=str(root / "out")), b"k")
    assert len(plan.units) == 2 and all(len(u.sources) == 4 for u in plan.units)
    reasons = sorted(r.reason for r in plan.skipped)
    assert len(reasons) == 2 and "not a whole-slide DICOM" in reasons[0] and "unreadable" in reasons[1]


def test_tiles_equal_openslide_at_the_recorded_place_and_carry_nothing_identifying(slides, tmp_path):
    root, level0 = slides
    (slide,), _ = group_dicom_slides(sorted(str(p) for p in (root / "clot_a").glob("*.dcm")))
    reader = OpenSlideReader(slide.files[0])
    assert reader.level_dimensions == [(768, 768), (384, 384), (192, 192)] and reader.mpp == pytest.approx(0.5)
    # OpenSlide decodes the JPEG frames: the pixels are the slide's, up to JPEG error
    assert np.abs(reader.read_region(200, 300, 0, 128, 128).astype(int) - level0["clot_a"][300:428, 200:328]).mean() < 4
    cfg = WsiIngestConfig(sources=[str(root)], out=str(tmp_path), tile_size=128, format="png")
    works, _ = plan_slide(Unit("u", "wsi", slide.files, "slide", "patient", 0), cfg)
    samples = [s for w in works for s in wsi_samples(w, cfg)]
    assert len(samples) > 5
    private = [PATIENTS[0].name, PATIENTS[0].patient_id, PATIENTS[0].birth_date, "SLIDE-MRN777", "clot_a"]
    for sample in samples:
        meta = json.loads(sample["json"])
        tile = decode_image(sample["png"])
        assert np.array_equal(tile, reader.read_region(meta["x"], meta["y"], 0, 128, 128))
        blob = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in sample.values())
        assert not any(p.encode() in blob for p in private)
    reader.close()
