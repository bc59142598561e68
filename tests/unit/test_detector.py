"""Paper 004's first stage: a YOLO detector's TorchScript export finds the boxes of images that have none. The
letterbox and its inverse, decoding both output layouts (suppression, thresholds), the export's metadata, and an
image folder cropped and segmented at the boxes found, with what the dataset records."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ingest.config import ImagesIngestConfig
from ingest.detector import YoloDetector, decode, letterbox, read_metadata, to_image
from ingest.images import Box
from ingest.model_files import fetch_model, model_url, put_model, recording
from ingest.plan import make_plan
from ingest.synthetic import make_mri_folders, mri_image
from ingest.units import Work, work_samples
from tests.checkpoints import yolo_export

KEY = b"k" * 32


def _iou(a: Box, b: Box) -> float:
    w = max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0))
    h = max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))
    inter = w * h
    return inter / ((a.x1 - a.x0) * (a.y1 - a.y0) + (b.x1 - b.x0) * (b.y1 - b.y0) - inter)


@pytest.mark.parametrize(("h", "w"), [(100, 50), (50, 100), (64, 64), (33, 97)])
def test_letterbox_places_the_image_centred_and_to_image_brings_its_boxes_back(h, w):
    rgb = np.zeros((h, w, 3), np.uint8)
    x0, y0, x1, y1 = w // 4, h // 4, w // 2, h // 2
    rgb[y0:y1, x0:x1] = 255
    placed_rgb, placed = letterbox(rgb, 64, 64)
    assert placed_rgb.shape == (64, 64, 3)
    new_w, new_h = round(w * min(64 / h, 64 / w)), round(h * min(64 / h, 64 / w))
    assert (placed.scale_x, placed.scale_y) == (new_w / w, new_h / h)  # the rounded size's: back to the pixel
    assert placed.left == (64 - new_w) // 2 and placed.top == (64 - new_h) // 2  # centred, the odd pixel after
    if placed.left:
        assert (placed_rgb[:, : placed.left] == 114).all()  # Ultralytics' grey
    ys, xs = np.nonzero(placed_rgb[..., 0] > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], float)
    back = to_image(found, placed, w, h)[0]
    assert np.abs(back - [x0, y0, x1, y1]).max() <= 1.5 / min(placed.scale_x, placed.scale_y)  # an input pixel


def test_a_square_detectors_input_is_resized_as_the_loaders_resized_its_training_images():
    from ingest.detector import stretched
    from shards.cpu_kernels import resized

    for h, w in ((40, 50), (96, 80), (40, 90)):  # enlarged, shrunk, both
        rgb = np.random.default_rng(h).integers(0, 255, (h, w, 3), dtype=np.uint8)
        out, placed = stretched(rgb, 64, 64)
        assert np.array_equal(out, resized(rgb, 64)) and (placed.scale_x, placed.scale_y) == (64 / w, 64 / h)


def test_to_image_clips_to_the_image():
    placed = letterbox(np.zeros((100, 50, 3), np.uint8), 64, 64)[1]
    assert to_image(np.array([[0.0, -5, 64, 70]]), placed, 50, 100).tolist() == [[0, 0, 50, 100]]


def _v8(rows):
    """A YOLOv8 output of one image from rows ``(cx, cy, w, h, score of class 0, score of class 1)``."""
    return torch.tensor(rows, dtype=torch.float32).T


def test_decode_keeps_the_best_of_overlapping_boxes_of_a_class_above_the_confidence():
    out = _v8([
        (21.5, 21.5, 10, 10, 0.6, 0.0),  # overlaps the next of its class (IoU 0.82), scores less: suppressed
        (21, 21, 10, 10, 0.9, 0.1),
        (21, 21, 10, 10, 0.0, 0.5),  # the same place, another class: kept
        (50, 50, 8, 8, 0.2, 0.1),  # under the confidence
        (50, 10, 6, 4, 0.3, 0.0),
    ])  # fmt: skip
    xyxy, scores, ids = decode(out, classes=2, confidence=0.25, iou=0.7)
    assert scores.tolist() == pytest.approx([0.9, 0.5, 0.3]) and ids.tolist() == [0, 1, 0]
    assert xyxy.tolist() == [[16, 16, 26, 26], [16, 16, 26, 26], [47, 8, 53, 12]]
    assert len(decode(out, classes=2, confidence=0.25, iou=0.05)[1]) == 3  # other places do not overlap


def test_decode_reads_an_end_to_end_output_and_names_a_shape_it_does_not_know():
    out = torch.tensor([[1, 2, 5, 6, 0.3, 1], [10, 10, 20, 30, 0.8, 0], [0, 0, 1, 1, 0.1, 0]], dtype=torch.float32)
    xyxy, scores, ids = decode(out, classes=3, confidence=0.25, iou=0.7)
    assert xyxy.tolist() == [[10, 10, 20, 30], [1, 2, 5, 6]] and ids.tolist() == [0, 1]
    assert scores.tolist() == pytest.approx([0.8, 0.3])  # best first, the one under the confidence left out
    with pytest.raises(ValueError, match=r"shape \[5, 100\] is neither YOLO's \[4 \+ 3 classes"):
        decode(torch.zeros(5, 100), classes=3, confidence=0.25, iou=0.7)


def test_the_export_must_be_torchscript_with_ultralytics_detection_metadata(tmp_path):
    with pytest.raises(ValueError, match=r"detector x\.pt: not TorchScript that loads here \("):
        read_metadata(b"not a model", "x.pt")
    torch.jit.script(torch.nn.Identity()).save(str(tmp_path / "bare.ts"))
    with pytest.raises(ValueError, match=r"without Ultralytics' metadata .*yolo export model=best\.pt"):
        read_metadata((tmp_path / "bare.ts").read_bytes(), "bare.ts")
    seg = yolo_export(tmp_path / "seg.torchscript", ["tumor"], task="segment")
    with pytest.raises(ValueError, match="a YOLO segment model, not a detection one"):
        read_metadata(Path(seg).read_bytes(), "seg")
    with pytest.raises(FileNotFoundError, match=r"detector .*nowhere\.torchscript: no such file"):
        fetch_model(str(tmp_path / "nowhere.torchscript"), "detector")


@pytest.mark.parametrize("end2end", [False, True])
def test_the_detector_finds_the_lesion_of_a_non_square_image_where_it_is(tmp_path, end2end):
    export = yolo_export(tmp_path / "best.torchscript", ["tumor", "other"], imgsz=96, end2end=end2end)
    detector = YoloDetector(fetch_model(export, "detector"))
    assert (detector.height, detector.width, detector.names) == (96, 96, ["tumor", "other"])
    img, (cx, cy, bw, bh) = mri_image(160, "glioma", np.random.default_rng(3))
    rgb = cv2.cvtColor(np.ascontiguousarray(img[:, 16:136]), cv2.COLOR_GRAY2RGB)  # 160 high, 120 wide
    truth = Box((cx - bw / 2) * 160 / 120 - 16 / 120, cy - bh / 2, (cx + bw / 2) * 160 / 120 - 16 / 120, cy + bh / 2)
    (found, score), *rest = detector.boxes(rgb)
    assert rest == [] and score == 0.9 and found.label == "tumor"  # the near-copy suppressed, the faint one under
    assert _iou(found, truth) > 0.85
    assert detector.boxes(np.full((160, 120, 3), 60, np.uint8)) == []


def test_config_takes_boxes_or_a_detector_and_crop_needs_one_of_them(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="give boxes or a detector, not both"):
        ImagesIngestConfig(sources=["a"], out="o", boxes="b.csv", detector="d.torchscript")
    with pytest.raises(ValidationError, match=r"crop needs boxes .* or a detector"):
        ImagesIngestConfig(sources=["a"], out="o", crop=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.torchscript").write_bytes(b"")
    cfg = ImagesIngestConfig(sources=["a"], out="o", detector="d.torchscript", crop=True)
    assert cfg.detector == str(tmp_path / "d.torchscript") and cfg.uses_models()  # the workers' path too
    elsewhere = ImagesIngestConfig(sources=["a"], out="o", detector="runs:/abc/best.torchscript")
    assert elsewhere.detector == "runs:/abc/best.torchscript"  # an MLflow artifact, not a path here


def test_an_image_folder_cropped_and_segmented_at_the_boxes_the_detector_finds(tmp_path):
    from cluster.cli_dataset import dataset_lines, made_with
    from ingest.runner import _merge
    from ingest.staging import process_work
    from ingest.units import batch_images
    from shards import manifest as mf

    make_mri_folders(tmp_path, per_class=1, size=96, seed=4)  # its YOLO labels unused: the detector's boxes
    export = yolo_export(tmp_path / "best.torchscript", ["tumor"], imgsz=96)
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=str(tmp_path / "out"), detector=export, crop=True,
        segment="grabcut", split="train=1.0", format="png",
    )  # fmt: skip
    plan = make_plan("images", cfg, KEY)
    cfg, line = recording(cfg, plan.model)  # as the run: the model's sha256 recorded, its bytes staged
    assert line.startswith(f"detector: {export}, sha256 ") and cfg.detector_sha256 == plan.model.sha256
    put_model(plan.model, model_url(cfg))
    truth = {}
    for u in plan.units:
        name = plan.classes[u.label]
        img = cv2.imread(u.sources[0], cv2.IMREAD_GRAYSCALE)
        truth[u.id] = (name, img)
    (work,) = batch_images(plan.units, cfg.images_per_task)
    record = process_work(work, cfg)
    per = {r.unit: r for r in record.per_unit()}
    nothing = "the detector found no box scoring above 0.25; the image is kept whole"
    for u in plan.units:
        name = truth[u.id][0]
        assert per[u.id].status == "ingested" and per[u.id].samples == 1
        assert per[u.id].warnings == ([nothing] if name == "notumor" else [])
    for u in plan.units:
        (sample,) = work_samples(Work(u), cfg)
        meta = json.loads(sample["json"])
        if truth[u.id][0] == "notumor":
            assert meta["boxes"] == [] and meta["crop"] is None and meta["box_scores"] == []
            continue
        (box,) = meta["boxes"]
        assert box[4] == "tumor" and meta["box_score"] == 0.9 and meta["box_scores"] == [0.9]
        assert meta["segmented"] is True
        img = truth[u.id][1]
        ys, xs = np.nonzero(img > 180)  # the drawn lesion (JPEG-blurred edges aside)
        lesion = Box(xs.min() / 96, ys.min() / 96, (xs.max() + 1) / 96, (ys.max() + 1) / 96)
        assert _iou(Box(*box), lesion) > 0.8
    inputs = [_merge(u, ([], [], None, None), [per[u.id]]) for u in plan.units]
    manifest = mf.Manifest(
        dataset="s3://b/mri", kind="images", classes=plan.classes, config=cfg.public(), inputs=inputs
    )
    lines = dataset_lines(manifest, b"{}")
    assert f"detector: {export} (sha256 {plan.model.sha256[:16]}), its boxes scoring above 0.25 kept, overlaps " \
        "above IoU 0.7 suppressed" in lines  # fmt: skip
    assert "detector" not in made_with(cfg.public()) and f"  1: {nothing}" in lines


def test_the_command_line_names_the_detector_in_a_dry_run_and_refuses_a_wrong_one(capsys, tmp_path, monkeypatch):
    from cluster.cli import main

    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TESSERA_PSEUDONYM_KEY", "k")
    make_mri_folders(tmp_path, per_class=1, size=64)
    export = yolo_export(tmp_path / "best.torchscript", ["tumor"])
    args = ["ingest", "images", str(tmp_path / "images"), "--out", str(tmp_path / "out"), "--crop"]
    assert main([*args, "--detector", export, "--detect-confidence", "0.5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"detector: {export}, sha256 " in out and "4 images to ingest" in out
    assert not (tmp_path / "out").exists()
    torch.jit.script(torch.nn.Identity()).save(str(tmp_path / "plain.ts"))
    assert main([*args, "--detector", str(tmp_path / "plain.ts")]) == 1  # before any image is read
    assert "without Ultralytics' metadata" in capsys.readouterr().err
    assert main([*args, "--detector", export, "--boxes", str(tmp_path / "labels")]) == 1
    assert "give boxes or a detector, not both" in capsys.readouterr().err
