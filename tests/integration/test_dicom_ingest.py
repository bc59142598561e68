"""DICOM ingest end to end: RSNA labels, sample modes, and the files a real export mixes in."""

import csv
import json
import re
import shutil
import subprocess
import sys

import pydicom
import pydicom.uid
import pytest
from pydicom.data import get_testdata_file

from ingest import runner
from ingest.config import DicomIngestConfig
from ingest.dicom import WRAPPED
from ingest.runner import run_ingest
from ingest.synthetic import make_ct_series
from shards import storage
from shards.verify import verify_dataset
from shards.writer import read_tar_samples
from training.config import load_recipe
from training.launch import run_training
from training.submissions import RSNA_LABELS


def _rsna_csv(root, path):
    rows = ["ID,Label"]
    for f in sorted(root.rglob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if "SeriesInstanceUID" in ds and ds.get("Modality") == "CT":
            bleed = int(ds.PatientID.endswith(("5", "7")))  # MRN12345 / MRN12347 bleed
            rows += [f"{ds.SOPInstanceUID}_any,{bleed}", f"{ds.SOPInstanceUID}_subdural,{bleed}"]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_rsna_center_mode_with_odd_files(stack, tmp_path):
    root = tmp_path / "dicom"
    patients, _ = make_ct_series(root, n=4, slices=14, size=32, seed=2)
    shutil.copy(get_testdata_file("rtplan.dcm"), root / "plan.dcm")  # DICOM, but no image
    shutil.copy(get_testdata_file("MR_truncated.dcm"), root / "cut.dcm")  # header fine, pixels cut short
    burned = next(root.rglob("series/*.dcm"))
    ds = pydicom.dcmread(burned)
    ds.BurnedInAnnotation = "YES"  # marks its whole series
    ds.save_as(burned)
    heads = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in root.rglob("series/*.dcm")}
    cut = next(f for f, h in heads.items() if h.InstanceNumber == 7 and h.SeriesInstanceUID != ds.SeriesInstanceUID)
    ds = pydicom.dcmread(cut)
    ds.PixelData = ds.PixelData[:100]  # the centre slice of another series cut short: that slice alone is lost
    ds.save_as(cut)
    make_ct_series(root / "wrapped", n=1, slices=14, size=32, seed=3, wrapped=True)  # RSNA's 12-bit fault
    labels = _rsna_csv(root, tmp_path / "stage_2_train.csv")
    cfg = DicomIngestConfig(
        sources=[str(root)], out=str(tmp_path / "out"), labels=str(labels), split="train=1.0", mode="center",
        neighbours=2, store_size=32,
    )  # fmt: skip
    manifest, _ = run_ingest("dicom", cfg)
    reasons = sorted(r.reason or "" for r in manifest.inputs if r.status != "ingested")
    assert manifest.multilabel[0] == "any" and manifest.classes == ["no hemorrhage", "hemorrhage"]
    assert any("BurnedInAnnotation" in r for r in reasons)
    assert "DICOM object without an image (modality RTPLAN)" in reasons
    assert any(r.startswith("not in the label table") for r in reasons)  # the MR file has no RSNA rows
    ingested = [r for r in manifest.inputs if r.status == "ingested"]
    assert len(ingested) == 4 and all(r.samples == 1 for r in ingested)
    assert sorted(r.left_out for r in ingested) == [0, 0, 0, 1]
    warned = sorted(w for r in ingested for w in r.warnings)
    assert len(warned) == 2 and warned[0].startswith("1 of 14 slice(s) could not be read") and warned[1] == WRAPPED
    samples = read_tar_samples(tmp_path / "out" / "train" / "shard-000000.tar")
    picked = sorted(json.loads(s["json"])["slices"] for s in samples)
    assert picked == [[4, 5, 5, 7, 8]] + [[4, 5, 6, 7, 8]] * 3  # the cut slice's place: its nearest readable one
    for s in samples:
        meta = json.loads(s["json"])
        assert sorted(k for k in s if k.endswith(".png")) == [f"{j:03d}.png" for j in range(5)]
        assert meta["num_slices"] == 14
        assert meta["labels"][0] == int(s["cls"]) and meta["labels"][5] == meta["labels"][0]
    blob = (tmp_path / "out" / "manifest.json").read_text() + "".join(str(s) for s in samples)
    for p in patients:
        assert p.patient_id not in blob and p.name not in blob


def test_dicom_from_the_object_store_matches_local(stack, tmp_path, capsys, monkeypatch):
    """Sources under an ``s3://`` prefix (headers read by ranged GETs) give the same records as the same files
    on disk: same series, same skipped file and reason, same sample counts. The driver's header requests are on
    its own object-store line."""
    root = tmp_path / "dicom"
    make_ct_series(root, n=2, slices=6, size=32, seed=4)
    shutil.copy(get_testdata_file("rtplan.dcm"), root / "plan.dcm")
    src = "s3://shards/it-dicom-src"
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        storage.put_file(f, f"{src}/{f.relative_to(root).as_posix()}")
    records, driver = {}, {}
    monkeypatch.setattr(runner, "DRIVER_LINE_S", 0.0)  # its line however short the driver's wait
    for name, source in (("local", str(root)), ("s3", src)):
        cfg = DicomIngestConfig(sources=[source], out=str(tmp_path / name), split="train=1.0", store_size=32)
        capsys.readouterr()
        manifest, _ = run_ingest("dicom", cfg)
        records[name] = sorted((r.status, r.reason or "", r.samples) for r in manifest.inputs)
        out = capsys.readouterr().out
        said = (
            r"object store: the driver \(.*\) downloaded (\d+) file\(s\), [^,]* and listed (\d+) page\(s\) of objects"
        )
        driver[name] = re.findall(said, out)
    assert driver["local"] == [] and int(driver["s3"][0][0]) >= 13  # a header each: 12 slices and the plan
    assert int(driver["s3"][0][1]) >= 1  # and the prefix's listing
    assert records["s3"] == records["local"]
    assert [n for status, _, n in records["s3"] if status == "ingested"] == [6, 6]
    assert any("RTPLAN" in reason for _, reason, _ in records["s3"])

    # A slice that arrives late joins its series: a difference, and --replace-changed ingests that series again
    late = pydicom.dcmread(next(root.rglob("series/*.dcm")))
    late.SOPInstanceUID = late.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    late.InstanceNumber, late.ImagePositionPatient = 7, [0.0, 0.0, 6 * float(late.SliceThickness)]
    late.save_as(tmp_path / "late.dcm", enforce_file_format=True)
    storage.put_file(tmp_path / "late.dcm", f"{src}/late/late.dcm")
    cfg = DicomIngestConfig(sources=[src], out=str(tmp_path / "s3"), split="train=1.0", store_size=32)
    with pytest.raises(ValueError, match=r"1 input\(s\) whose files changed since it was made"):
        run_ingest("dicom", cfg)
    capsys.readouterr()
    monkeypatch.setattr(runner, "DRIVER_LINE_S", 60.0)  # a loaded machine's bookkeeping took over 1 s (CI)
    grown, _ = run_ingest("dicom", cfg.model_copy(update={"replace_changed": True}))
    out = capsys.readouterr().out
    assert "object store: the workers" in out and "the driver" not in out  # it waited less than a minute
    assert sorted(r.samples for r in grown.inputs if r.status == "ingested") == [6, 7]
    assert grown.amended[-1].replaced == 1 and verify_dataset(str(tmp_path / "s3")) == []
    keys = [s["__key__"] for p in (tmp_path / "s3").glob("*/shard-*.tar") for s in read_tar_samples(p)]
    assert len(keys) == len(set(keys)) == 13


def test_an_rsna_run_is_submitted_by_its_slices_sop_instances(stack, tmp_path):
    """Paper 003 through the CLI: CT series with RSNA's per-slice labels ingested a sample per slice, a multi-label
    model of RSNA's six labels trained on them, and `tessera predict --reveal --submission` writes RSNA's layout:
    six rows per slice of the split, each slice named by its SOP Instance UID (the competition's image ID), each
    with its sample's probability of that label in the revealed table; it warns of the slices it lacks."""
    root, ds, preds = tmp_path / "dicom", tmp_path / "ds", tmp_path / "preds"
    make_ct_series(root, n=4, slices=5, size=32, seed=3)
    for f in root.rglob("*.dcm"):  # a slice of each series cut short: left out, and the submission says so
        if (cut := pydicom.dcmread(f)).InstanceNumber == 3:
            cut.PixelData = cut.PixelData[:100]
            cut.save_as(f)
    labels = _rsna_csv(root, tmp_path / "stage_2_train.csv")
    cli = [sys.executable, "-m", "cluster.cli"]
    ingest = [*cli, "ingest", "dicom", str(root), "--out", str(ds), "--labels", str(labels), "--store-size", "32"]
    run = subprocess.run([*ingest, "--split", "train=0.5,val=0.5"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    overrides = [f"data.dataset={ds}", "data.image_size=32", "model.name=resnet18", "model.pretrained=false"]
    overrides += ["epochs=1", "batch_size=4", "workers=1", "deepspeed.zero_stage=0"]
    out = run_training(load_recipe("rsna_ich_subtypes", overrides), stack.mlflow_url, str(tmp_path / "ckpt"))
    assert out.error is None, out.error

    submission = tmp_path / "submission.csv"
    predict = [*cli, "predict", out.run_id, "--split", "val", "--out", str(preds), "--reveal"]
    run = subprocess.run([*predict, "--submission", str(submission)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((ds / "manifest.json").read_text())
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in root.rglob("*.dcm")]
    series_of = {h.SOPInstanceUID: h.SeriesInstanceUID for h in headers}
    shown = list(csv.DictReader((preds / "predictions_sample.csv").read_text().splitlines()))
    n = manifest["splits"]["val"]["num_samples"]
    assert f"submission (RSNA): {n} images -> {submission}" in run.stdout and len(shown) == n == 8
    lacking = "warning: the submission calls nothing for 2 slice(s) that could not be read, left out of their series"
    assert lacking in run.stdout, run.stdout[-2000:]
    assert all(series_of[r["image"]] == r["series"] for r in shown)  # revealed: each slice's UID, of its series
    assert len({r["image"] for r in shown}) == n and len({r["series"] for r in shown}) == 2
    rows = list(csv.reader(submission.read_text().splitlines()))
    assert rows[0] == ["ID", "Label"] and len(rows) == 1 + 6 * n
    expected = {f"{r['image']}_{label}": r[f"p_{label}"] for r in shown for label in RSNA_LABELS}
    assert dict(rows[1:]) == expected and [i for i, _ in rows[1:]] == sorted(expected)
    assert submission.stat().st_mode & 0o777 == 0o600
