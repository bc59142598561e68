import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest

from ingest.series import order_slices, slice_normal
from ingest.windowing import PADDING_HU, to_hu, unwrap_12bit, window, window_stack, windowed, wrapped_12bit


def test_hu_and_windows_exact():
    stored = np.array([[0, 1024, 1064, 2048]], np.int16)
    hu = to_hu(stored, slope=1.0, intercept=-1024.0)
    assert hu.tolist() == [[-1024.0, 0.0, 40.0, 1024.0]]
    # brain window 40/80 spans [0, 80] HU: 0 -> 0, 40 -> 128 (127.5 rounds to even 128), >= 80 -> 255
    assert window(hu, 40, 80).tolist() == [[0, 0, 128, 255]]
    stack = window_stack(hu)
    assert stack.shape == (1, 4, 3) and stack.dtype == np.uint8
    # subdural 80/200 spans [-20, 180]: 40 HU -> 60 * 255 / 200 = 76.5 -> 76 (banker's rounding)
    # soft 40/380 spans [-150, 230]: 40 HU -> 190 * 255 / 380 = 127.5 -> 128
    assert stack[0, 2].tolist() == [128, 76, 128]
    with pytest.raises(ValueError, match="unknown window"):
        window_stack(hu, ("lung2",))


def test_rsnas_wrapped_12bit_values_are_read_as_the_signed_ones_they_are():
    """RSNA's faulty CT slices: 12-bit two's complement under an unsigned header with intercept 0 (air stored as
    3096). Read as signed, every HU comes back; the competition notebooks' +1000 mod 4096 gives the same from
    -1000 HU up, and shows what lies below -1000 HU (padding, noise in air) as over 2047 HU, bone."""
    hu = np.array([-2048, -1500, -1001, -1000, -1, 0, 40, 1000, 2047])
    stored = (hu & 0xFFF).astype(np.uint16)  # as those slices hold them
    assert stored[3] == 3096
    assert unwrap_12bit(stored).tolist() == hu.tolist()
    assert unwrap_12bit(stored | 0xF000).tolist() == hu.tolist()  # bits above BitsStored are not the value's
    notebooks = (stored.astype(np.int64) + 1000) % 4096 - 1000
    assert notebooks[hu >= -1000].tolist() == hu[hu >= -1000].tolist() and (notebooks[hu < -1000] > 2047).all()
    assert wrapped_12bit(12, signed=False, intercept=0) and wrapped_12bit(12, signed=False, intercept=-99.5)
    assert not wrapped_12bit(12, signed=False, intercept=-1024)  # unsigned with room for air: right as it is
    assert not wrapped_12bit(12, signed=True, intercept=0) and not wrapped_12bit(16, signed=False, intercept=0)


def test_slope_applies():
    assert to_hu(np.array([10]), 2.0, -5.0).tolist() == [15.0]


def test_order_recovered_from_shuffled_positions():
    z = [15.0, 0.0, 10.0, 5.0]
    order, warnings = order_slices([[0, 0, v] for v in z], [1, 0, 0, 0, 1, 0], [1, 2, 3, 4])
    assert [z[i] for i in order] == [0.0, 5.0, 10.0, 15.0]
    assert warnings == []


def test_order_along_oblique_normal():
    c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
    iop = [1, 0, 0, 0, c, s]  # tilted 30 degrees about x
    normal = slice_normal(iop)
    positions = [list(k * 2.5 * normal + np.array([3.0, 1.0, 2.0])) for k in (3, 1, 0, 2)]
    order, _ = order_slices(positions, iop, [None] * 4)
    assert order == [2, 1, 3, 0]


def test_fallback_to_instance_number_and_warnings():
    order, warnings = order_slices([None, None], None, [2, 1])
    assert order == [1, 0] and "InstanceNumber" in warnings[0]
    _, warnings = order_slices([[0, 0, 0], [0, 0, 0], [0, 0, 5]], [1, 0, 0, 0, 1, 0], [1, 2, 3])
    assert "duplicate slice positions" in warnings
    _, warnings = order_slices([[0, 0, z] for z in (0, 5, 10, 20)], [1, 0, 0, 0, 1, 0], [1, 2, 3, 4])
    assert any("uneven" in w for w in warnings)


@pytest.mark.parametrize("dtype", [np.int16, np.uint16, np.int8, np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("names", [("brain",), ("brain", "subdural", "soft"), ("brain", "subdural", "soft", "bone")])
def test_lookup_table_windows_equal_the_float_path(dtype, names):
    """The lookup tables (whole-type packed for 8/16-bit, value range otherwise) give exactly the float result,
    negative stored values included; padding is shown as air."""
    rng = np.random.default_rng(3)
    lo, hi = (-3000, 4000) if np.dtype(dtype).kind == "f" else (max(np.iinfo(dtype).min, -3000), 4000)
    pixels = rng.integers(lo, min(hi, np.iinfo(np.int16).max), (23, 29)).astype(dtype)
    for slope, intercept in ((1.0, -1024.0), (0.5, -20.0)):
        out = windowed(pixels, slope, intercept, names)
        assert out.dtype == np.uint8 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, window_stack(to_hu(pixels, slope, intercept), names))
    padding = pixels == pixels.flat[0]
    out = windowed(pixels, 1.0, -1024.0, names, padding)
    np.testing.assert_array_equal(out[0, 0], window_stack(np.full((1, 1), PADDING_HU, np.float32), names)[0, 0])


def test_a_patient_table_row_without_a_series_is_reported_not_ingested(tmp_path):
    from ingest.config import DicomIngestConfig
    from ingest.plan import plan_dicom
    from ingest.synthetic import make_ct_series

    _, labels = make_ct_series(tmp_path / "ct", n=2, slices=3, size=16)
    labels.write_text(labels.read_text() + "MRN99999,bleed\n")  # a patient whose series is not among the sources
    cfg = DicomIngestConfig(sources=[str(tmp_path / "ct")], out=str(tmp_path / "o"), labels=str(labels))
    plan = plan_dicom(cfg, b"k")
    assert sorted(plan.classes) == ["bleed", "normal"] and len(plan.units) == 2 and not plan.skipped
    (row,) = plan.unmatched
    assert plan.private[row] == f"{labels}: row MRN99999" and "MRN99999" not in row
    # what the samples and a run's prediction tables carry can be traced back through the private map
    assert sorted(plan.private[u.patient] for u in plan.units) == ["patient MRN12345", "patient MRN12346"]
    assert all(plan.private[u.item].startswith("series ") and plan.private[u.meta["study"]] for u in plan.units)


def test_a_numeric_patient_id_a_spreadsheet_stripped_of_its_leading_zeros_still_matches(tmp_path):
    """Saved through a spreadsheet, ``006388`` becomes ``6388``: every series was skipped as not in the label table
    and every row listed as naming no input."""
    from ingest.config import DicomIngestConfig
    from ingest.plan import plan_dicom
    from ingest.synthetic import SyntheticPatient, write_ct_series

    for i, pid in enumerate(("006388", "A0042")):
        write_ct_series(tmp_path / "ct", SyntheticPatient(f"P{i}", pid, "19600101"), 3, 16, bleed=i == 0, seed=i)
    labels = tmp_path / "labels.csv"
    labels.write_text("patient,label\n6388,bleed\nA0042,normal\n")
    cfg = DicomIngestConfig(sources=[str(tmp_path / "ct")], out=str(tmp_path / "o"), labels=str(labels))
    plan = plan_dicom(cfg, b"k")
    assert len(plan.units) == 2 and not plan.skipped and not plan.unmatched
    assert sorted(plan.private[u.patient] for u in plan.units) == ["patient 006388", "patient A0042"]
    assert {plan.private[u.patient]: plan.classes[u.label] for u in plan.units}["patient 006388"] == "bleed"


def test_series_without_a_patient_id_are_a_patient_per_study_and_say_so(tmp_path):
    """A de-identification that blanked PatientID made every such series one patient, all of them in one split.
    Each study stands for its patient now, and each such series says so."""
    from ingest.config import DicomIngestConfig
    from ingest.plan import NO_PATIENT, plan_dicom
    from ingest.synthetic import SyntheticPatient, write_ct_series

    for i in range(4):
        write_ct_series(tmp_path / "ct", SyntheticPatient(f"ANON{i}", "", ""), 3, 16, bleed=i % 2 == 0, seed=i)
    write_ct_series(tmp_path / "ct", SyntheticPatient("DOE^J", "MRN1", "19600101"), 3, 16, bleed=False, seed=9)
    cfg = DicomIngestConfig(sources=[str(tmp_path / "ct")], out=str(tmp_path / "o"), split="train=0.5,val=0.5")
    plan = plan_dicom(cfg, b"k")
    assert len(plan.units) == 5 and len({u.patient for u in plan.units}) == 5
    assert {u.split for u in plan.units} == {"train", "val"}
    blank = [u for u in plan.units if plan.private[u.patient].startswith("patient study ")]
    assert len(blank) == 4 and all(NO_PATIENT in u.meta["warnings"] for u in blank)
    [named] = [u for u in plan.units if u not in blank]
    assert plan.private[named.patient] == "patient MRN1" and NO_PATIENT not in named.meta["warnings"]


def test_a_slice_sample_is_named_by_its_sop_instance_through_the_private_map(tmp_path):
    """One sample per slice (RSNA's): its ``image`` is the pseudonym of its slice, which the private map traces to
    the slice's SOP Instance UID (the competition's image ID), in the series' anatomical order; a sample of
    several slices names none."""
    import json

    import pydicom

    from ingest.config import DicomIngestConfig
    from ingest.plan import plan_dicom
    from ingest.synthetic import make_ct_series
    from ingest.units import Work, work_samples
    from training.predictions import original_name

    _, labels = make_ct_series(tmp_path / "ct", n=1, slices=4, size=16)
    cfg = DicomIngestConfig(sources=[str(tmp_path / "ct")], out=str(tmp_path / "o"), labels=str(labels), neighbours=1)
    plan = plan_dicom(cfg, b"k")
    (unit,) = plan.units
    sop = {f: pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in unit.sources}
    metas = [json.loads(s["json"]) for s in work_samples(Work(unit), cfg)]
    assert [original_name(plan.private[m["image"]]) for m in metas] == [sop[f] for f in unit.sources]
    assert metas[0]["slices"] == [0, 0, 1] and len({m["image"] for m in metas}) == 4
    assert all(uid not in json.dumps(metas) for uid in sop.values())
    (block,) = work_samples(Work(unit), cfg.model_copy(update={"mode": "center"}))
    assert "image" not in json.loads(block["json"])


def test_a_series_that_gains_a_slice_gets_another_fingerprint(tmp_path):
    """A series is one input whatever its file count: a slice added to it (a late transfer) gives it another
    fingerprint, so a dataset made without that slice is told apart; the other series keeps its own."""
    import pydicom
    from pydicom.uid import generate_uid

    from ingest.config import DicomIngestConfig
    from ingest.plan import plan_dicom
    from ingest.pseudonym import pseudonym
    from ingest.synthetic import make_ct_series

    _, labels = make_ct_series(tmp_path / "ct", n=2, slices=3, size=16)
    cfg = DicomIngestConfig(sources=[str(tmp_path / "ct")], out=str(tmp_path / "o"), labels=str(labels))
    before = {u.id: u.fingerprint for u in plan_dicom(cfg, b"k").units}
    assert len(set(before.values())) == 2 and {u.id: u.fingerprint for u in plan_dicom(cfg, b"k").units} == before
    first = sorted((tmp_path / "ct").rglob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.InstanceNumber, ds.ImagePositionPatient = 4, [0.0, 0.0, 3 * float(ds.SliceThickness)]
    ds.save_as(first.with_name("late.dcm"), enforce_file_format=True)
    after = {u.id: u.fingerprint for u in plan_dicom(cfg, b"k").units}
    grown = pseudonym(b"k", "series", ds.SeriesInstanceUID)
    assert after.keys() == before.keys() and {k for k in before if after[k] != before[k]} == {grown}


def test_a_large_local_cohort_has_its_headers_parsed_by_processes_in_order(tmp_path, monkeypatch):
    """Each process parses runs of files; the headers come back in the files' order, as one process reads them,
    a file that is not DICOM with its reason; how many processes: one per 2048 files, at most one per core."""
    from ingest import dicom
    from ingest.plan import source_headers
    from ingest.synthetic import make_ct_series

    make_ct_series(tmp_path / "ct", n=2, slices=9, size=16)
    (tmp_path / "ct" / "notes.txt").write_text("not a slice")
    files = sorted(str(p) for p in (tmp_path / "ct").rglob("*") if p.is_file())
    serial = dicom.map_headers(source_headers, files, processes=1)
    assert dicom.map_headers(source_headers, files, processes=2) == serial
    assert serial[files.index(str(tmp_path / "ct" / "notes.txt"))] == ([], "not a DICOM file")
    monkeypatch.setattr(dicom.os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
    assert [dicom.header_processes(n) for n in (100, 4096, 6200, 10**6)] == [1, 2, 3, 4]


def test_headers_on_the_object_store_are_read_on_threads_in_each_process(tmp_path):
    """From ``s3://``, each header is a request: the requests overlap on threads, in each of the processes a large
    cohort gets (a request's own work in boto3 holds the GIL as parsing does), and come back in order."""
    import os
    import threading
    import time

    from ingest import dicom

    def where(loc: str, seen: str, want: int) -> tuple[str, int, str]:
        """A slow request, held until ``want`` processes have made one: on a busy machine the second process
        started after the first had read every run (a clean clone's suite, once)."""
        Path(seen, str(os.getpid())).touch()
        held = time.monotonic() + 60
        while len(os.listdir(seen)) < want and time.monotonic() < held:
            time.sleep(0.01)
        return loc, os.getpid(), threading.current_thread().name

    locations = [f"s3://bucket/ct/{i:04d}.dcm" for i in range(64)]
    for processes in (1, 2):
        (tmp_path / str(processes)).mkdir()
        read = functools.partial(where, seen=str(tmp_path / str(processes)), want=processes)
        found = dicom.map_headers(read, locations, processes=processes)
        assert [loc for loc, _, _ in found] == locations
        assert all(thread != "MainThread" for _, _, thread in found)
        pids = {pid for _, pid, _ in found}
        if processes == 1:
            assert pids == {os.getpid()}
        else:
            assert len(pids) == 2 and os.getpid() not in pids


@pytest.mark.parametrize("processes", [1, 2])
def test_a_header_pass_counts_its_requests_as_the_drivers_and_its_wait_once(processes):
    """The header requests, in the driver's threads or its header processes, are the driver's transfers (its
    object-store line); its wait is the pass's, not each thread's or process's requests added up."""
    import time

    from ingest import dicom
    from shards import transfers

    def get(loc: str) -> str:  # a ranged GET of 100 bytes; long enough that their sum outlasts starting processes
        return transfers.counted(False, 100, lambda: time.sleep(0.1) or loc)  # on a loaded machine (1.5 s seen)

    locations = [f"s3://bucket/ct/{i:04d}.dcm" for i in range(64)]
    transfers.take()
    start = time.perf_counter()
    assert dicom.map_headers(get, locations, processes=processes) == locations
    wall = time.perf_counter() - start
    moved = transfers.take()
    assert (moved.downloads, moved.downloaded) == (64, 6400) and moved.seconds >= 64 * 0.1
    assert 0 < moved.waited <= wall  # 64 x 100 ms of requests overlapped: their sum is more than the pass took
    assert moved.seconds > wall


@pytest.mark.parametrize("processes", [1, 2])
def test_a_long_header_pass_shows_its_progress_and_a_short_one_does_not(processes, monkeypatch, capsys):
    """Planning RSNA's 752k slices on an object store reads headers for minutes before the ingest's own bar: the
    driver counts them on a bar of its own (in one process, or as each process's runs come back)."""
    from ingest import dicom

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    locations = [f"s3://bucket/ct/{i:04d}.dcm" for i in range(64)]
    monkeypatch.setattr(dicom, "HEADER_BAR_FILES", 64)
    assert dicom.map_headers(str.upper, locations, processes=processes) == [loc.upper() for loc in locations]
    err = capsys.readouterr().err
    assert "reading headers: 100%" in err and "64/64" in err
    monkeypatch.setattr(dicom, "HEADER_BAR_FILES", 65)
    dicom.map_headers(str.upper, locations, processes=processes)
    assert capsys.readouterr().err == ""


def test_a_slice_held_by_two_files_is_read_once_and_the_copy_accounted_for(tmp_path):
    """An export that holds a slice twice (a re-sent transfer in another folder) gives one sample of it; the copy
    is skipped with the reason, so the manifest still accounts for every file. Frames of one multi-frame file are
    not copies of each other."""
    import shutil

    from ingest.config import DicomIngestConfig
    from ingest.dicom import SliceHeader, group_series
    from ingest.plan import COPY, plan_dicom
    from ingest.synthetic import make_ct_series

    _, labels = make_ct_series(tmp_path / "ct", n=1, slices=4, size=16)
    first = sorted((tmp_path / "ct").rglob("*.dcm"))[1]
    (tmp_path / "ct" / "zz_resent").mkdir()
    shutil.copy(first, tmp_path / "ct" / "zz_resent" / "again.dcm")
    cfg = DicomIngestConfig(sources=[str(tmp_path / "ct")], out=str(tmp_path / "o"), labels=str(labels))
    plan = plan_dicom(cfg, b"k")
    (unit,) = plan.units
    assert len(unit.sources) == 4 and str(first) in unit.sources and unit.meta["warnings"] == []
    (copy,) = plan.skipped
    assert copy.reason == COPY and plan.private[copy.id] == str(tmp_path / "ct" / "zz_resent" / "again.dcm")

    frames = [SliceHeader("f.dcm", "P", "st", "se", "1.2", "CT", [0, 0, k], [1, 0, 0, 0, 1, 0], k, k) for k in range(3)]
    (series,) = group_series(frames)
    assert len(series.slices) == 3 and series.copies == []


def test_a_series_whose_slices_name_two_patients_says_so():
    """A series is one patient's: slices naming two PatientIDs (a mix-up, or a de-identification per file) take
    the first file's, as before, and now say so."""
    from ingest.dicom import SliceHeader, group_series

    frames = [
        SliceHeader(f"{k}.dcm", "P", "st", "se", f"1.{k}", "CT", [0, 0, k], [1, 0, 0, 0, 1, 0], k) for k in range(3)
    ]
    assert group_series(frames)[0].warnings == []
    (series,) = group_series([dataclasses.replace(frames[0], patient_id="Q"), *frames[1:]])
    assert series.patient_id == "Q" and len(series.slices) == 3
    assert series.warnings == ["slices of 2 PatientIDs in one series: the first file's is its patient"]


def test_an_enhanced_ct_file_gives_the_samples_its_slices_as_single_files_give(tmp_path):
    """A series in one Enhanced CT file (frames stored against the anatomical order, one frame with its own
    rescale), or in Enhanced CT files of one frame each (their geometry in their functional groups too), is
    ordered, windowed and stored as the same slices in classic single-frame files are."""
    import pydicom
    from pydicom.uid import generate_uid

    from ingest.config import DicomIngestConfig
    from ingest.plan import plan_dicom
    from ingest.synthetic import SyntheticPatient, ct_slice_dataset, enhanced_ct_dataset
    from ingest.units import Work, work_samples

    patient = SyntheticPatient("DOE^JANE", "PID-1", "19700101")
    volume = np.random.default_rng(5).integers(0, 2400, (4, 16, 16)).astype(np.int16)
    hu = [(1.0, -1024.0)] * 4
    hu[2] = (2.0, -2048.0)
    enhanced = enhanced_ct_dataset(volume[::-1], patient, generate_uid(), generate_uid())  # frame 0: the top slice
    for frame, item in enumerate(enhanced.PerFrameFunctionalGroupsSequence):
        item.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, 5.0 * (3 - frame)]
    own = pydicom.Dataset()
    own.RescaleSlope, own.RescaleIntercept = hu[2]
    enhanced.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = [own]  # slice 2's frame
    (tmp_path / "enhanced").mkdir()
    enhanced.save_as(tmp_path / "enhanced" / "series.dcm", enforce_file_format=True)
    (tmp_path / "singles").mkdir()
    study, series = generate_uid(), generate_uid()
    for k in (2, 0, 3, 1):  # files named against the anatomical order
        one = enhanced_ct_dataset(volume[k : k + 1], patient, study, series)
        one.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, 5.0 * k]
        one.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleSlope = hu[k][0]
        one.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0].RescaleIntercept = hu[k][1]
        one.InstanceNumber = 4 - k
        one.save_as(tmp_path / "singles" / f"{k}.dcm", enforce_file_format=True)
    (tmp_path / "classic").mkdir()
    for k in range(4):
        ds = ct_slice_dataset(volume[k], patient, study, series, k)
        ds.RescaleSlope, ds.RescaleIntercept = hu[k]
        ds.save_as(tmp_path / "classic" / f"{k}.dcm", enforce_file_format=True)
    samples = {}
    for name in ("enhanced", "singles", "classic"):
        cfg = DicomIngestConfig(sources=[str(tmp_path / name)], out=str(tmp_path / "o"), format="png")
        (unit,) = plan_dicom(cfg, b"k").units
        samples[name] = [s["png"] for s in work_samples(Work(unit), cfg)]
    assert len(samples["enhanced"]) == 4 and samples["enhanced"] == samples["classic"] == samples["singles"]


def test_a_series_stored_as_rsnas_faulty_slices_gives_the_samples_of_the_same_series_stored_right(tmp_path):
    """The same HU stored right and stored wrapped (12-bit two's complement under an unsigned header): the same
    samples, and the wrapped series' input carries a warning that says what was read otherwise."""
    from ingest.config import DicomIngestConfig
    from ingest.dicom import WRAPPED
    from ingest.plan import plan_dicom
    from ingest.synthetic import make_ct_series
    from ingest.units import Work, work_samples

    samples, warnings = {}, {}
    for name in ("right", "wrapped"):
        make_ct_series(tmp_path / name, n=1, slices=4, size=32, seed=3, wrapped=name == "wrapped")
        cfg = DicomIngestConfig(sources=[str(tmp_path / name)], out=str(tmp_path / "o"), format="png")
        (unit,) = plan_dicom(cfg, b"k").units
        samples[name] = [s["png"] for s in work_samples(Work(unit), cfg)]
        warnings[name] = unit.meta["warnings"]
    assert len(samples["right"]) == 4 and samples["wrapped"] == samples["right"]
    assert warnings == {"right": [], "wrapped": [WRAPPED]}


def _series_with_a_broken_slice(tmp_path, broken: list[int], **options):
    """A 6-slice CT series planned, then slices ``broken`` cut short (header whole, pixels not): the unit and
    its config."""
    import pydicom

    from ingest.config import DicomIngestConfig
    from ingest.plan import plan_dicom
    from ingest.synthetic import make_ct_series

    make_ct_series(tmp_path / "ct", n=1, slices=6, size=16, seed=1)
    cfg = DicomIngestConfig(sources=[str(tmp_path / "ct")], out=str(tmp_path / "out"), split="train=1.0", **options)
    (unit,) = plan_dicom(cfg, b"k").units
    for i in broken:
        ds = pydicom.dcmread(unit.sources[i])
        ds.PixelData = ds.PixelData[:100]  # as RSNA's ID_6431af929 (paper 003): its pixel data cut short
        ds.save_as(unit.sources[i])
    return unit, cfg


def test_a_slice_that_cannot_be_read_is_left_out_of_its_series_and_named(tmp_path):
    """Paper 003 met one RSNA file whose pixels were cut short: that slice alone is lost (its sample, and its
    place in its neighbours' samples taken by the nearest readable slice), the series' other slices are ingested
    and its record says which slice was left out and why."""
    from ingest.staging import process_work
    from ingest.units import Work, work_samples

    unit, cfg = _series_with_a_broken_slice(tmp_path, [2])
    work = Work(unit)
    rec = process_work(work, cfg)
    assert rec.status == "ingested" and rec.samples == 5 and rec.left_out == 1
    (note,) = rec.warnings
    assert note.startswith(f"1 of 6 slice(s) could not be read and were left out ({unit.meta['images'][2]}; ")
    assert "DicomError: pixel data could not be decoded" in note
    metas = [json.loads(s["json"]) for s in work_samples(Work(unit), cfg)]
    assert [m["image"] for m in metas] == [unit.meta["images"][i] for i in (0, 1, 3, 4, 5)]

    unit, cfg = _series_with_a_broken_slice(tmp_path / "k1", [2], neighbours=1)
    assert [json.loads(s["json"])["slices"] for s in work_samples(Work(unit), cfg)] == [
        [0, 0, 1], [0, 1, 1], [3, 3, 4], [3, 4, 5], [4, 5, 5]
    ]  # fmt: skip
    unit, cfg = _series_with_a_broken_slice(tmp_path / "series", [2], mode="series", frames=6)
    assert [json.loads(s["json"])["slices"] for s in work_samples(Work(unit), cfg)] == [[0, 1, 1, 3, 4, 5]]


def test_a_series_none_of_whose_slices_can_be_read_fails_with_the_reason(tmp_path):
    from ingest.staging import process_work
    from ingest.units import Work

    unit, cfg = _series_with_a_broken_slice(tmp_path, list(range(6)))
    rec = process_work(Work(unit), cfg)
    assert rec.status == "failed" and rec.samples == 0
    assert rec.reason.startswith("DicomError: pixel data could not be decoded")


def test_a_slice_the_store_does_not_give_fails_the_work_for_a_retry_not_the_slice(tmp_path, monkeypatch):
    """Only a file's own fault leaves its slice out: an error of the store (down, timing out) is the work's, which
    is retried whole, so that no slice is lost to an outage."""
    import ingest.units as units
    from ingest.units import Work, work_samples
    from shards.storage import StorageError

    unit, cfg = _series_with_a_broken_slice(tmp_path, [])
    real = units.slice_rgb

    def flaky(path, windows, frame, hu):
        if path == unit.sources[3]:
            raise StorageError("the store did not answer")
        return real(path, windows, frame, hu)

    monkeypatch.setattr(units, "slice_rgb", flaky)
    with pytest.raises(StorageError):
        list(work_samples(Work(unit), cfg))
