"""Paper 004's first stage end to end on the local stack: a detector trained by Ray Train on images ingested with
their YOLO boxes finds the lesions of other images, which have none, and the ingest actors crop them there:
`tessera train brain_tumor_detect`, then `tessera ingest images --detector RUN_ID --crop`."""

import json

import cv2
import numpy as np
import pytest
from mlflow import MlflowClient

from ingest.config import ImagesIngestConfig
from ingest.runner import run_ingest
from shards import storage
from shards.writer import read_tar_samples
from training.config import load_recipe
from training.launch import run_training

# a small run: two epochs on two CPU workers, from scratch (the recipe file keeps RetinaNet from ImageNet weights at
# 512 px, SGD); whether it learns is not this test's question (from scratch on 24 images it may or may not). Its
# 50 best boxes of each image whatever their score, so that there are boxes to compare. The recipe's RetinaNet:
# its boxes (an anchor scaled by exp of a delta) always have an area, where an FCOS's regression ends in a ReLU, and
# once that dies every box is a point at its anchor, which ingest drops (a CI run compared nothing).
SMALL = ["model.pretrained=false", "data.image_size=64", "optim.name=adamw",
         "optim.lr=0.001", "schedule.name=constant", "early_stopping.enabled=false", "epochs=2", "batch_size=4",
         "workers=2", "model.options={score_thresh: 0.0, detections_per_img: 50}"]  # fmt: skip


def _lesion_folders(root, per_class: int, seed: int) -> dict[str, tuple[float, ...] | None]:
    """Class folders of dim 64 px images, a bright square lesion in each but the ``none`` ones, and a YOLO label
    file per lesion (``root/labels``); each image's lesion box ``(x0, y0, x1, y1)``, normalised, by its path."""
    rng, truth = np.random.default_rng(seed), {}
    (root / "labels").mkdir(parents=True)
    for c, name in enumerate(["lesion", "none"]):
        (root / "images" / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(rng.normal(50, 10, (64, 64)), 0, 255).astype(np.uint8)
            stem, box = f"{name}_{i:03d}", None
            if name == "lesion":
                side = int(rng.integers(16, 29))
                x0, y0 = (int(v) for v in rng.integers(0, 64 - side, 2))
                img[y0 : y0 + side, x0 : x0 + side] = 230
                box = (x0 / 64, y0 / 64, (x0 + side) / 64, (y0 + side) / 64)
                cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
                (root / "labels" / f"{stem}.txt").write_text(f"{c} {cx:.6f} {cy:.6f} {side / 64:.6f} {side / 64:.6f}\n")
            cv2.imwrite(str(root / "images" / name / f"{stem}.png"), img)
            truth[f"{name}/{stem}.png"] = box
    return truth


def test_a_trained_detectors_export_finds_the_boxes_the_ingest_workers_crop(stack, tmp_path):
    """The run trains, validates (its boxes' metrics each epoch), exports and registers the detector, and the
    held-out step measures the export; ingest by the run's id then crops, in its Ray workers, exactly the boxes that
    export finds in each image when loaded here, and `tessera predict` sends a detector's run there."""
    from ingest.detector import YoloDetector
    from ingest.model_files import fetch_model
    from training.inference import predict_run

    _lesion_folders(tmp_path / "boxed", per_class=20, seed=1)
    boxed, split = "s3://shards/detect/boxed", "train=0.6,val=0.2,test=0.2"
    images, labels = str(tmp_path / "boxed" / "images"), str(tmp_path / "boxed" / "labels")
    run_ingest("images", ImagesIngestConfig(sources=[images], out=boxed, boxes=labels, split=split, format="png"))
    recipe = load_recipe("brain_tumor_detect", [f"data.dataset={boxed}", *SMALL])
    outcome = run_training(recipe, stack.mlflow_url, str(tmp_path / "ckpt"))
    assert outcome.error is None and outcome.model_version == "1" and outcome.model_name == "brain_tumor_detect"
    client = MlflowClient(stack.mlflow_url)
    for key in ("train_loss", "train_classification", "val_map50", "val_map", "val_recall", "val_precision"):
        assert len(client.get_metric_history(outcome.run_id, key)) == 2, key
    assert {"test_map50", "test_recall"} <= set(outcome.held_out.metrics)  # its export, on the held-out images
    with pytest.raises(ValueError, match=f"run {outcome.run_id} trained a detector: .* --detector {outcome.run_id}"):
        predict_run(outcome.run_id, stack.mlflow_url, str(tmp_path / "ckpt"))

    truth = _lesion_folders(tmp_path / "new", per_class=4, seed=9)  # as the classifier's set: no boxes used
    out = "s3://shards/detect/found"
    cfg = ImagesIngestConfig(sources=[str(tmp_path / "new" / "images")], out=out, detector=outcome.run_id,
                             detect_confidence=1e-9, crop=True, split="train=1.0")  # fmt: skip
    private: dict[str, str] = {}  # pseudonym -> file, as `tessera ingest` keeps it on this machine
    manifest, _ = run_ingest("images", cfg, on_private=private.update)
    assert manifest.counts() == {"ingested": 8, "skipped": 0, "failed": 0}
    assert manifest.config["detector_sha256"] and manifest.config["detector"].startswith(outcome.run_id)
    crops: dict[str, list] = {}
    for url in manifest.shard_urls(out, "train"):
        for sample in read_tar_samples(storage.get_file(url, tmp_path / "s.tar")):
            meta = json.loads(sample["json"])
            crops.setdefault(private[meta["image"]], []).append(meta)
    here = YoloDetector(fetch_model(outcome.run_id, "detector"), confidence=1e-9)
    assert here.names == ["lesion"]
    compared = 0
    for path in truth:
        source = str(tmp_path / "new" / "images" / path)
        want = [b.as_list() for b, _ in here.boxes(cv2.cvtColor(cv2.imread(source), cv2.COLOR_BGR2RGB))]
        metas = sorted(crops[source], key=lambda m: m["crop"] if m["crop"] is not None else -1)
        assert [m["crop"] for m in metas] == (list(range(len(want))) or [None])  # a crop per box, or the image
        got = metas[0]["boxes"]  # the workers' boxes are the export's (to its arithmetic on another thread count)
        assert len(got) == len(want) and all(b[4] == "lesion" for b in got)
        if want:
            np.testing.assert_allclose([b[:4] for b in got], [b[:4] for b in want], atol=1e-4)
        compared += len(want)
    assert compared >= 8  # boxes, not none, were compared
