"""Image-folder ingest on the local stack: MR class folders cropped to their YOLO boxes and CT-ICH slice
sequences, to S3, read back by the training loader."""

import json
import shutil

import numpy as np
import pytest

from ingest.config import ImagesIngestConfig
from ingest.runner import run_ingest
from ingest.synthetic import make_ct_ich, make_mri_folders
from shards import manifest as mf
from shards import storage
from shards.dali import build_pipeline, fetch_indices
from shards.writer import read_tar_samples
from tests.checkpoints import tiny_sam, yolo_export


def _first_batch(manifest, url: str, split: str, idx_dir, frames: int = 0):
    urls = manifest.shard_urls(url, split)
    pipe = build_pipeline(urls, fetch_indices(urls, str(idx_dir)), 2, 32, train=False, frames=frames)
    images, _, _ = pipe.run()
    return np.asarray(images.as_tensor())


def test_mri_crops_to_s3_and_the_loader_reads_them(stack, tmp_path):
    labels = make_mri_folders(tmp_path, per_class=4, size=64, seed=3)
    (tmp_path / "images" / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (labels / "gl_0001.txt").write_text("0 0.5 0.5\n")  # a YOLO line missing its box size
    out = "s3://shards/mri/crops"
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=out, boxes=str(labels), crop=True, split="train=0.5,val=0.5",
        images_per_task=5, segment="grabcut", median=3,  # paper 004: denoised, each box's lesion cut out
    )  # fmt: skip
    manifest, _ = run_ingest("images", cfg)
    by_status = {}
    for r in manifest.inputs:
        by_status.setdefault(r.status, []).append(r.reason)
    assert len(by_status["ingested"]) == 15  # 16 images, one with a broken box file
    assert sorted(by_status["failed"]) == [
        "ImageError: not a decodable image (22 bytes)",
        "boxes: YOLO file: line 1 is not 'class cx cy w h'",
    ]
    assert manifest.classes == ["glioma", "meningioma", "notumor", "pituitary"]
    mf.check_patient_disjoint(manifest)
    # batches of five images share staged parts; each image still names its own split's shards
    for split, info in manifest.splits.items():
        mine = [r for r in manifest.inputs if r.status == "ingested" and r.split == split]
        assert sum(r.samples for r in mine) == info.num_samples
        assert all(r.shards and all(s.startswith(f"{split}/") for s in r.shards) for r in mine)
    batch = _first_batch(manifest, out, "train", tmp_path / "idx")
    assert batch.shape == (2, 3, 32, 32) and np.isfinite(batch).all()
    metas = [m for split in manifest.splits for m in _metas(manifest, out, split, tmp_path)]
    crops = [m for m in metas if m["crop"] is not None]
    assert len(crops) == 11 and all(m["segmented"] and 0.5 < m["lesion_fraction"] < 1 for m in crops)


def _metas(manifest, url: str, split: str, tmp) -> list[dict]:
    """The metadata of a split's samples, read from the store."""
    shards = [read_tar_samples(storage.get_file(u, tmp / "x.tar")) for u in manifest.shard_urls(url, split)]
    return [json.loads(s["json"]) for samples in shards for s in samples]


def test_ct_ich_sequences_to_s3_as_frames(stack, tmp_path):
    csv_path = make_ct_ich(tmp_path, patients=7, slices=10, size=48, seed=1)
    shutil.rmtree(tmp_path / "Patients_CT" / "055")  # in the table, not among the sources: reported, not an input
    out = "s3://shards/ct_ich/sequences"
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "Patients_CT")], out=out, labels=str(csv_path), slice_folder="brain",
        mode="series", frames=4, split="train=0.5,val=0.5", format="png",
    )  # fmt: skip
    manifest, _ = run_ingest("images", cfg)
    ingested = [r for r in manifest.inputs if r.status == "ingested"]
    assert len(ingested) == 6 and all(r.samples == 1 for r in ingested)
    assert sorted(r.label for r in ingested) == [0, 0, 0, 1, 1, 1]
    assert manifest.multilabel[0] == "any" and len(manifest.unmatched_labels) == 1
    text = json.dumps(manifest.model_dump())
    assert "Patients_CT" not in text and '"049"' not in text and '"055"' not in text
    batch = _first_batch(manifest, out, "train", tmp_path / "idx", frames=4)
    assert batch.shape == (2, 4, 3, 32, 32)


def test_image_batches_follow_a_folder_that_grew_and_append_adds_to_it(stack, tmp_path):
    """A run stopped after staging a batch; images were added before it ran again: the batches are made anew
    (a staged batch is not taken for one with other images), every image once. Then more images arrive and
    --append adds them in batches of their own."""
    from ingest.config import pseudonym_key
    from ingest.plan import make_plan
    from ingest.staging import process_work
    from ingest.units import batch_images
    from shards.writer import read_tar_samples

    make_mri_folders(tmp_path, per_class=4, size=32, seed=5)
    images = tmp_path / "images"
    aside = sorted(images.rglob("*_0001.jpg")) + sorted(images.rglob("*_0003.jpg"))
    for path in aside:
        path.rename(tmp_path / path.name)
    out = "s3://shards/mri/grown"
    cfg = ImagesIngestConfig(sources=[str(images)], out=out, split="train=1.0", images_per_task=3)
    works = batch_images(make_plan("images", cfg, pseudonym_key()).units, 3)
    assert process_work(works[0], cfg).status == "ingested"  # staged, then the run stopped
    for path in aside[:4]:  # four images arrived meanwhile
        (tmp_path / path.name).rename(path)

    def keys(manifest):
        found = []
        for split in manifest.splits:
            for i, url in enumerate(manifest.shard_urls(out, split)):
                local = tmp_path / f"{split}-{i}.tar"
                found += [s["__key__"] for s in read_tar_samples(storage.get_file(url, local))]
        return found

    resumed, _ = run_ingest("images", cfg)
    assert resumed.counts()["ingested"] == 12 and len(set(keys(resumed))) == len(keys(resumed)) == 12
    for path in aside[4:]:
        (tmp_path / path.name).rename(path)
    grown, _ = run_ingest("images", cfg.model_copy(update={"append": True}))
    assert grown.counts()["ingested"] == 16 and [a.added for a in grown.amended] == [4]
    assert len(set(keys(grown))) == len(keys(grown)) == 16
    for split, info in resumed.splits.items():
        assert grown.splits[split].shards[: len(info.shards)] == info.shards


def test_sam_segments_the_crops_in_the_ray_workers(stack, tmp_path):
    """``--segment sam`` from a local checkpoint: each worker loads it and segments its images' boxes; a box in
    which it found no lesion (random weights: any box may be one) is its image's warning in the manifest."""
    labels = make_mri_folders(tmp_path, per_class=1, size=64, seed=4)
    out = "s3://shards/mri/sam"
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=out, boxes=str(labels), crop=True, segment="sam",
        sam_model=tiny_sam(tmp_path / "sam"), split="train=1.0", overwrite=True,
    )  # fmt: skip
    manifest, _ = run_ingest("images", cfg)
    assert manifest.counts() == {"ingested": 4, "skipped": 0, "failed": 0}
    crops = [m for m in _metas(manifest, out, "train", tmp_path) if m["crop"] is not None]
    assert len(crops) == 3 and all(isinstance(m["segmented"], bool) for m in crops)
    unfound = sum(not m["segmented"] for m in crops)
    assert sum(len(r.warnings) for r in manifest.inputs) == unfound


def test_a_detector_on_the_object_store_finds_the_boxes_the_workers_crop(stack, tmp_path):
    """Paper 004's classifier dataset has no boxes: ``--detector`` (a YOLO TorchScript export, here on S3) finds
    them in the Ray workers, which crop and segment there; a re-run with another confidence is another dataset."""
    make_mri_folders(tmp_path, per_class=2, size=64, seed=6)  # its YOLO labels unused
    model = "s3://shards/models/mri/best.torchscript"
    storage.put_file(yolo_export(tmp_path / "best.torchscript", ["tumor"]), model)
    out = "s3://shards/mri/detected"
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=out, detector=model, crop=True, segment="grabcut",
        split="train=1.0", images_per_task=3, overwrite=True,
    )  # fmt: skip
    manifest, _ = run_ingest("images", cfg)
    assert manifest.counts() == {"ingested": 8, "skipped": 0, "failed": 0}
    assert manifest.config["detector"] == model and len(manifest.config["detector_sha256"]) == 64
    assert "torch" in manifest.rendered_with  # a model decides what the samples hold
    metas = _metas(manifest, out, "train", tmp_path)
    crops = [m for m in metas if m["crop"] is not None]
    assert len(crops) == 6 and all(m["box_score"] == 0.9 and m["segmented"] for m in crops)
    assert [len(r.warnings) for r in manifest.inputs if r.label == manifest.classes.index("notumor")] == [1, 1]
    again = cfg.model_copy(update={"detect_confidence": 0.95, "overwrite": False})
    with pytest.raises(ValueError, match=r"detect_confidence 0\.25 -> 0\.95"):
        run_ingest("images", again)


def test_image_folders_on_s3_give_the_samples_of_the_same_folders_on_disk(stack, tmp_path):
    """Batches of images on the object store are read ahead of their use (ingest.read_ahead), a broken image
    among them failing alone, with the same images as from local disk."""
    make_mri_folders(tmp_path, per_class=5, size=48, seed=8)
    (tmp_path / "images" / "notumor" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    src = "s3://shards/mri-src"
    for f in sorted(p for p in (tmp_path / "images").rglob("*") if p.is_file()):
        storage.put_file(f, f"{src}/{f.relative_to(tmp_path / 'images').as_posix()}")
    samples, statuses = {}, {}
    for name, source in (("local", str(tmp_path / "images")), ("s3", src)):
        out = f"s3://shards/mri-from/{name}"
        cfg = ImagesIngestConfig(sources=[source], out=out, split="train=1.0", images_per_task=8, read_ahead=4)
        manifest, _ = run_ingest("images", cfg)
        statuses[name] = sorted((r.status, r.reason or "") for r in manifest.inputs)
        samples[name] = {}
        for url in manifest.shard_urls(out, "train"):
            for s in read_tar_samples(storage.get_file(url, tmp_path / "x.tar")):
                samples[name][s["__key__"]] = s["jpg"]
    assert statuses["s3"] == statuses["local"]
    assert ("failed", "ImageError: not a decodable image (22 bytes)") in statuses["s3"]
    # the same images (each sample's key is a pseudonym of its source, so it names the place it came from)
    assert len(samples["s3"]) == 20 and sorted(samples["s3"].values()) == sorted(samples["local"].values())
