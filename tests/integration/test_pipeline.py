"""The walking skeleton end to end: synthetic slides and CT -> shards on S3 -> Ray Train + DeepSpeed -> MLflow."""

import csv
import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from mlflow import MlflowClient

from cluster.demo import run_demo
from shards import manifest as mf
from shards import storage
from shards.dali import shard_range
from shards.sampling import read_labels
from shards.schema import PNG_SIGNATURE
from shards.verify import verify_dataset
from shards.writer import read_tar_samples
from training.config import load_recipe
from training.data import WorkerData
from training.losses import class_counts


@pytest.fixture(scope="module")
def demo(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    return run_demo(stack, work, small=True) | {"workdir": work}


def _samples(url, tmp):
    shards = [u for u in storage.list_urls(url) if u.endswith(".tar")]
    return [s for shard in shards for s in read_tar_samples(storage.get_file(shard, Path(tmp) / "s.tar"))]


def test_shards_match_manifest_and_account_for_every_input(demo, tmp_path):
    for url in (demo["wsi"], demo["ct"], demo["mri"]):
        assert verify_dataset(url) == []
    wsi = mf.load(demo["wsi"])
    assert len(wsi.inputs) == 4 and all(r.status == "ingested" for r in wsi.inputs)
    assert sum(r.samples for r in wsi.inputs) == sum(s.num_samples for s in wsi.splits.values())
    ct = mf.load(demo["ct"])
    assert len(ct.inputs) == 2 and sum(r.samples for r in ct.inputs) == 16
    mf.check_patient_disjoint(wsi)
    assert set(wsi.splits) == {"train", "val"}
    previews = [u for u in storage.list_urls(storage.join(demo["wsi"], "previews")) if u.endswith(".png")]
    assert len(previews) == 4  # one per slide, named by pseudonym
    mri = mf.load(demo["mri"])
    assert len(mri.inputs) == 8 and all(r.status == "ingested" for r in mri.inputs)
    crops = [
        json.loads(s["json"]) for split in mri.splits for s in _samples(storage.join(demo["mri"], split), tmp_path)
    ]
    crops = [m for m in crops if m["crop"] is not None]
    assert len(crops) == 6 and all(m["segmented"] for m in crops)  # 2 images of each tumour class, one box each


def test_labels_survive_the_round_trip(demo, tmp_path):
    manifest = mf.load(demo["wsi"])
    label_of_patient = {r.patient: r.label for r in manifest.inputs}
    for split in manifest.splits:
        samples = _samples(storage.join(demo["wsi"], split), tmp_path)
        assert len(samples) == manifest.splits[split].num_samples
        assert len({s["__key__"] for s in samples}) == len(samples)
        for s in samples:
            meta = json.loads(s["json"])
            assert int(s["cls"]) == meta["label"] == label_of_patient[meta["patient"]]
    # the synthetic label CSV alternates CE/LAA: both classes present, names recorded in order
    assert manifest.classes == ["CE", "LAA"]
    assert sorted(label_of_patient.values()) == [0, 0, 1, 1]


def test_balanced_sampler_reads_the_samples_it_draws_from_s3(demo):
    """Paper 003's sampler reads labels and samples by ranged GETs from the stack's S3, and DALI decodes them."""
    manifest = mf.load(demo["wsi"])
    overrides = ["data.sampler=balanced", "data.epoch_samples=8", "data.image_size=32", "batch_size=4"]
    recipe = load_recipe("demo_tiles", [f"data.dataset={demo['wsi']}", *overrides])
    data = WorkerData(recipe, manifest, 0, 1, None)
    try:
        assert demo["wsi"].startswith("s3://")
        counts = class_counts(manifest.inputs, "train", len(manifest.classes))
        assert np.bincount(data.train_labels, minlength=len(counts)).tolist() == counts
        # ingest recorded every sample's class in the manifest; ranged GETs of the `.cls` members agree
        assert manifest.sample_classes("train") == read_labels(*data._random_access("train")).tolist()
        batches = list(data.batches("train", 0, True))
        assert [x.shape for x, _, _ in batches] == [(4, 3, 32, 32)] * 2
        for _, labels, metas in batches:
            assert labels.tolist() == [m["label"] for m in metas]
    finally:
        data.close()


def test_ranged_reads_from_s3_give_each_worker_what_dalis_reader_gives_it(demo):
    """The default for an S3 dataset: evaluation by ranged GETs equals DALI's own S3 reader, worker by worker."""
    manifest = mf.load(demo["wsi"])
    for rank in range(2):
        readers = {}
        for reader in ("stream", "auto"):
            overrides = [f"data.dataset={demo['wsi']}", f"data.reader={reader}", "data.image_size=32", "batch_size=8"]
            readers[reader] = WorkerData(load_recipe("demo_tiles", overrides), manifest, rank, 2, None)
        try:
            assert readers["auto"].recipe.data.ranged
            got, want = (list(readers[r].batches("val", 0, False)) for r in ("auto", "stream"))
            assert sum(len(y) for _, y, _ in got) == len(range(*shard_range(manifest.num_samples("val"), rank, 2)))
            for (x, y, metas), (wx, wy, wmetas) in zip(got, want, strict=True):
                assert np.array_equal(x, wx) and np.array_equal(y, wy) and metas == wmetas
        finally:
            for data in readers.values():
                data.close()


def test_mlflow_run_has_every_epoch_and_a_confusion_matrix(demo, stack):
    client = MlflowClient(stack.mlflow_url)
    run = client.get_run(demo["run_id"])
    assert run.info.status == "FINISHED"
    epochs = int(run.data.params["epochs"])
    for key in ("train_loss", "train_accuracy", "val_accuracy", "val_weighted_log_loss", "val_patient_accuracy"):
        history = client.get_metric_history(demo["run_id"], key)
        assert sorted(m.step for m in history) == list(range(epochs)), key
    assert run.data.tags["recipe"] == "demo_tiles" and len(run.data.tags["manifest_sha256"]) == 64
    assert run.data.tags["deepspeed.zero_stage_used"] == "2"  # two workers: the recipe's stage
    assert run.data.tags["precision_used"] == "fp32"  # bf16 `auto` on the CPU
    made_by = mf.load(run.data.tags["dataset"]).made_by  # the code that rendered its samples, and that trained
    assert made_by and run.data.tags["dataset_made_by"] == made_by and run.data.tags["git_commit"] in made_by
    artifacts = {a.path for a in client.list_artifacts(demo["run_id"])}
    expected = {"confusion_sample.png", "confusion_patient.png", "roc_sample.png", "recipe.yaml", "curve_loss.png"}
    assert expected | {"curve_lr.png", "model"} <= artifacts
    versions = client.search_model_versions(f"name='{run.data.tags['recipe']}'")
    assert demo["run_id"] in {v.run_id for v in versions}


def test_runs_on_the_local_stack_start_no_preemption_watcher_and_no_dataset_manager(demo):
    """One machine has no node to drain: the stack turns Ray Train's watcher off, one process fewer per run. Nor
    does a worker group given no Ray Data datasets (its workers read shards with DALI) start a dataset manager."""
    from ray.util.state import list_actors

    classes = {a.class_name for a in list_actors(limit=10_000, detail=False, raise_on_missing_output=False)}
    assert {"TrainController", "RayTrainWorker"} <= classes  # the demo's run, among those the GCS still lists
    assert "PreemptionWatcher" not in classes and "DatasetManager" not in classes


def test_the_exported_model_loads_and_predicts(demo, stack, tmp_path):
    import torch

    from training.export import load_export

    folder = MlflowClient(stack.mlflow_url).download_artifacts(demo["run_id"], "model", str(tmp_path))
    model, desc = load_export(Path(folder))
    assert desc["classes"] == ["CE", "LAA"] and desc["image_size"] == 64
    assert desc["tile_um"] == 64.0  # 128 px tiles of the 0.5 µm/px slides: what a background model would match
    traced = torch.jit.load(str(Path(folder) / "model.ts"))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(traced(x), model(x))


def _identifiers(workdir: Path) -> set[str]:
    ids = {"SLIDEPATIENT", "MRN9000", "General Hospital", "HOUSE^G", "ACC7788"}
    for f in (workdir / "ct").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ids |= {
            str(ds.PatientName),
            ds.PatientID,
            ds.PatientBirthDate,
            ds.StudyInstanceUID,
            ds.SeriesInstanceUID,
            ds.SOPInstanceUID,
            f.stem,
        }
    ids |= {p.stem for p in (workdir / "slides").glob("*.tif")}  # slide file names
    ids |= {p.stem for p in (workdir / "new").glob("*.tif")}  # the unlabelled slides': their patients' names too
    ids |= {f"p{i:04d}" for i in range(4)}  # patient ids of the label CSV
    ids |= {p.stem for p in (workdir / "mri").rglob("*.jpg")}  # MR image file names
    return ids


def _readable(name: str, data: bytes) -> bytes:
    """The bytes of a file that can carry text: all of them, but for the pixels of a PNG (its IDAT chunks) or a
    JPEG (from its first scan on), which are compressed, and in which a short identifier turns up by chance (a
    heatmap's 3.7 MB of IDAT once held "p00003"). A PNG's text chunks and a JPEG's EXIF and comments stay; a
    shard's members are taken one by one, their names included."""
    if name.endswith(".tar"):
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        return b"".join(m.encode() + b"\n" + _readable(m, content) for m, content in members)
    if data.startswith(PNG_SIGNATURE):
        kept, pos = [data[:8]], 8
        while pos < len(data):
            (size,) = struct.unpack(">I", data[pos : pos + 4])
            if data[pos + 4 : pos + 8] != b"IDAT":
                kept.append(data[pos : pos + 12 + size])
            pos += 12 + size
        return b"".join(kept)
    if data.startswith(b"\xff\xd8"):
        scan = data.find(b"\xff\xda")  # start of scan: the headers and metadata segments come before
        return data if scan < 0 else data[:scan]
    return data


def test_readable_bytes_leave_out_compressed_pixels_only(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    info = PngInfo()
    info.add_text("Title", "p0003")
    png, jpeg = io.BytesIO(), io.BytesIO()
    noise.save(png, "PNG", pnginfo=info)
    noise.save(jpeg, "JPEG", comment=b"MRN9000")
    for name, data in (("a.png", png.getvalue()), ("a.jpg", jpeg.getvalue())):
        readable = _readable(name, data)
        assert len(readable) < len(data) / 4  # the pixels left out
        assert (b"p0003" if name == "a.png" else b"MRN9000") in readable  # the text kept
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for name, data in (("SLIDEPATIENT.jpg", jpeg.getvalue()), ("x.json", b'{"patient": "ACC7788"}')):
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    readable = _readable("s.tar", shard.getvalue())
    assert all(t in readable for t in (b"SLIDEPATIENT", b"MRN9000", b"ACC7788"))


def test_no_patient_identifier_reaches_shards_manifests_or_mlflow(demo, stack, tmp_path):
    ids = _identifiers(demo["workdir"])
    blobs = []
    for url in storage.list_urls("s3://shards/demo/"):
        blobs.append((url, storage.get_bytes(url)))
    client = MlflowClient(stack.mlflow_url)
    local = client.download_artifacts(demo["run_id"], "", str(tmp_path))
    blobs += [(str(p), p.read_bytes()) for p in Path(local).rglob("*") if p.is_file()]
    run = client.get_run(demo["run_id"])
    blobs.append(("mlflow params+tags", json.dumps([run.data.params, run.data.tags]).encode()))
    assert len(blobs) > 6
    for where, data in blobs:
        readable = _readable(where, data)
        for ident in ids:
            assert ident.encode() not in readable, f"{ident!r} found in {where}"


def test_the_new_slides_without_labels_are_called_per_tile_and_patient(demo, stack):
    """The demo's last stage: slides ingested without labels, called by the trained run's model."""
    calls, manifest = demo["calls"], mf.load(demo["new"])
    assert manifest.classes == [] and not calls.labelled and calls.samples == manifest.num_samples("test") > 0
    patients = list(csv.DictReader(calls.tables["patient"].splitlines()))
    assert sorted(r["patient"] for r in patients) == sorted({r.patient for r in manifest.inputs})
    for r in patients:
        assert r["predicted"] in ("CE", "LAA") and float(r["p_CE"]) + float(r["p_LAA"]) == pytest.approx(1, abs=1e-5)
    client = MlflowClient(stack.mlflow_url)
    kept = client.list_artifacts(demo["run_id"], "predictions/external_test")
    assert {Path(a.path).name for a in kept} >= {"predictions_sample.csv", "predictions_patient.csv", "heatmaps"}
    drawn = client.list_artifacts(demo["run_id"], "predictions/external_test/heatmaps")  # a slide's, by pseudonym
    assert sorted(Path(a.path).name for a in drawn) == sorted(f"{r.item}.png" for r in manifest.inputs)
    assert all(r.preview_scale and 0 < r.preview_scale <= 1 for r in manifest.inputs)
    # the validation and held-out slides' too, which training drew (the recipe's eval.heatmaps) as `tessera evaluate
    # --heatmaps` draws them, titled with their labels; the small demo has no test split
    inputs = [r for r in mf.load(demo["wsi"]).inputs if r.status == "ingested"]
    for split, folder in [("val", "heatmaps"), ("test", "test_heatmaps")]:
        drawn = client.list_artifacts(demo["run_id"], folder)
        assert sorted(Path(a.path).name for a in drawn) == sorted(f"{r.item}.png" for r in inputs if r.split == split)
    assert any(r.split == "val" for r in inputs)
