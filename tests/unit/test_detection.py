"""Paper 004's detector trained in Tessera (``task: detect``): boxes from the samples' metadata, the hits and
misses against hand-counted ones, COCO mAP on hand-made detections, what a detector's recipe refuses, two steps
and a validation through the real loop (DALI, DeepSpeed), and an export that ingest's ``--detector`` reads,
finding what the trained model finds."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.datasets import make_dataset, small_recipe
from training import detection
from training.config import RecipeError, load_recipe
from training.loop import Trainer

CLASSES = ["none", "glioma", "meningioma"]


def test_targets_are_the_metadata_boxes_in_input_pixels_labelled_a_lesion_or_with_the_image_class():
    metas = [{"boxes": [[0.25, 0.5, 0.75, 1.0, "1"], [0.1, 0.1, 0.1, 0.2, "1"]]}, {"boxes": []}, {}]
    t = detection.targets(metas, np.array([2, 0, 1]), 64, "cpu", by_image=True)
    assert t[0]["boxes"].tolist() == [[16, 32, 48, 64]] and t[0]["labels"].tolist() == [2]  # the empty one dropped
    assert [len(x["boxes"]) for x in t[1:]] == [0, 0] and t[1]["boxes"].shape == (0, 4)
    assert detection.targets(metas, np.array([2, 0, 1]), 64, "cpu")[0]["labels"].tolist() == [0]  # one lesion class
    # Faster R-CNN's class 0 is its background: ours start at 1 there
    assert detection.targets(metas, np.array([2, 0, 1]), 64, "cpu", True, slot=1)[0]["labels"].tolist() == [3]
    assert [detection.background_slot(n) for n in ("fasterrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn")] == [1, 0]


def _found(boxes, scores, labels):
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
            "labels": np.array(labels)}  # fmt: skip


def test_matches_count_hits_false_alarms_and_misses_as_by_hand():
    true = {"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32),
            "labels": np.array([1, 1, 2])}  # fmt: skip
    found = _found(
        [[0, 0, 10, 9], [1, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50], [60, 60, 70, 70]],
        [0.9, 0.8, 0.7, 0.6, 0.1],
        [1, 1, 1, 1, 2],
    )
    # the first hits box 0, the second finds it taken (a false alarm), the third hits box 1, the fourth is of the
    # wrong class (a false alarm; box 2 missed), the fifth scores under the threshold
    assert detection.matches(found, true, 0.5) == (2, 2, 1)
    assert detection.matches(found, true, 0.95) == (0, 0, 3)
    assert detection.matches(_found([], [], []), {"boxes": np.zeros((0, 4)), "labels": np.zeros(0)}, 0.5) == (0, 0, 0)


def test_metrics_on_hand_made_detections():
    true = [{"boxes": np.array([[0, 0, 10, 10]], np.float32), "labels": np.array([1])},
            {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}]  # fmt: skip
    perfect = {"found": [_found([[0, 0, 10, 10]], [0.9], [1]), _found([], [], [])], "true": true, "metas": []}
    m = detection.metrics(perfect, CLASSES, 0.5)
    assert (m["val_map"], m["val_map50"], m["val_precision"], m["val_recall"], m["val_f1"]) == (1, 1, 1, 1, 1)
    assert m["val_image_accuracy"] == 1  # the lesion found in the first image, nothing found in the second
    assert m["val_ap50_glioma"] == 1 and "val_ap50_none" not in m  # no true box of its class
    alarm = {"found": [_found([[0, 0, 10, 10]], [0.9], [1]), _found([[5, 5, 9, 9]], [0.95], [1])], "true": true}
    m = detection.metrics(alarm | {"metas": []}, CLASSES, 0.5)
    # precision 1/2, recall 1; AP at 0.5: the false alarm ranks first, so precision is 1/2 at recall 1
    assert (m["val_precision"], m["val_recall"]) == (0.5, 1.0) and m["val_f1"] == pytest.approx(2 / 3)
    assert m["val_image_accuracy"] == 0.5  # the second image has no lesion but a box found in it
    missed = {"found": [_found([[30, 30, 40, 40]], [0.9], [1]), _found([[5, 5, 9, 9]], [0.1], [1])], "true": true}
    assert detection.metrics(missed | {"metas": []}, CLASSES, 0.5)["val_image_accuracy"] == 0.5
    # the first image's lesion missed (its box lies elsewhere), the second's box scores under the threshold
    assert m["val_map50"] == pytest.approx(0.5, abs=0.01)


def test_a_detection_recipe_refuses_what_a_detector_cannot_take():
    base = ["data.dataset=/tmp/x", "model.pretrained=false"]
    moving = load_recipe("brain_tumor_detect", [*base, "data.augment.rotate_p=0.5", "data.augment.zoom_p=0.5"])
    assert moving.data.augment.rotate_p == 0.5  # moves its boxes too (training.box_augment)
    with pytest.raises(RecipeError, match=r"eval\.monitor: .val_loss. is not a detector.s"):
        load_recipe("brain_tumor_detect", [*base, "eval.monitor=val_loss"])
    with pytest.raises(RecipeError, match=r"swa\.enabled: not for task detect"):
        load_recipe("brain_tumor_detect", [*base, "swa.enabled=true"])
    from training.models import check_model

    with pytest.raises(RecipeError, match=r"model\.name: task detect takes a torchvision detector or an .*retinanet"):
        check_model(load_recipe("brain_tumor_detect", [*base, "model.name=retinanet"]).model, "detect")
    check_model(load_recipe("brain_tumor_detect", [*base, "model.name=tf_efficientdet_d1"]).model, "detect")
    with pytest.raises(RecipeError, match=r"data\.image_size: an EfficientDet takes a multiple of 128 px.* not 200"):
        load_recipe("brain_tumor_detect", [*base, "model.name=tf_efficientdet_d0", "data.image_size=200"])


def _recipe(tmp_path, *extra):
    return small_recipe("brain_tumor_detect", tmp_path, "model.name=fcos_resnet50_fpn", "data.epoch_samples=4", *extra)


# Each family's own losses: FCOS's three; EfficientDet's two (effdet's weighted box loss: training.efficientdet)
LOSSES = {
    "fcos_resnet50_fpn": ("classification", "bbox_regression", "bbox_ctrness"),
    "tf_efficientdet_d0": ("classification", "bbox_regression"),
}


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_the_detector_trains_two_steps_and_reports_its_metrics(tmp_path, process_group, name):
    size = ["data.image_size=128"] if name.startswith("tf_efficientdet_") else []  # a multiple of its stride
    recipe = _recipe(tmp_path, f"model.name={name}", *size)
    reports = []
    trainer = Trainer({"recipe": recipe.model_dump()}, rank=0, world=1)
    before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
    trainer.run(lambda metrics, folder: reports.append(metrics), mlflow=False)
    assert trainer.engine.global_steps == 2
    (metrics,) = reports
    assert math.isfinite(metrics["train_loss"]) and metrics["train_loss"] > 0
    # the model's own losses, each averaged over the samples as the total is
    assert sum(metrics[f"train_{k}"] for k in LOSSES[name]) == pytest.approx(metrics["train_loss"])
    for key in ("val_map", "val_map50", "val_mar100", "val_precision", "val_recall", "val_f1"):
        assert 0 <= metrics[key] <= 1, key
    after = trainer.engine.module.state_dict()
    assert any(not torch.equal(v, after[k]) for k, v in before.items() if v.is_floating_point())


def _raised(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with a head that calls boxes at all: an untrained one scores everything about 0.01. EfficientDet's
    scores vary by anchor (ties would leave the order of equal boxes to each suppression)."""
    with torch.no_grad():
        if hasattr(model, "head"):
            model.head.classification_head.cls_logits.bias.fill_(2.0)
        else:
            bias = model.model.class_net.predict.conv_pw.bias
            bias.copy_(2.0 + torch.randn_like(bias))
    return model


@pytest.mark.parametrize(("name", "size"), [("fcos_resnet50_fpn", 64), ("tf_efficientdet_d0", 128)])
def test_the_export_finds_in_ingest_what_the_trained_model_finds(tmp_path, name, size):
    from ingest.detector import YoloDetector
    from ingest.model_files import fetch_model

    recipe = load_recipe("brain_tumor_detect", [f"model.name={name}", "model.pretrained=false",
                                                f"data.image_size={size}", f"data.dataset={tmp_path}"])  # fmt: skip
    torch.manual_seed(0)
    model = _raised(detection.build_detector(recipe.model, len(CLASSES), size).eval())
    folder = detection.save_detector(model, tmp_path / "model", recipe.model, CLASSES, size)
    desc = json.loads((folder / "model.json").read_text())
    assert desc["task"] == "detect" and desc["torchscript"] == detection.EXPORT and desc["classes"] == CLASSES
    detector = YoloDetector(fetch_model(str(folder), "detector"), confidence=0.3)  # the export folder itself
    assert detector.place.__name__ == "stretched" and detector.end2end is True and detector.names == CLASSES
    rgb = np.random.default_rng(1).integers(0, 255, (96, 80, 3), dtype=np.uint8)
    found = detector.boxes(rgb)
    assert found, "the raised head found nothing"
    import cv2

    x = torch.from_numpy(cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)).permute(2, 0, 1).float() / 255
    x = (x - torch.tensor(detection.MEAN).view(3, 1, 1)) / torch.tensor(detection.STD).view(3, 1, 1)
    with torch.no_grad():
        (want,) = model([x])
    b, slot = want["boxes"], detection.background_slot(name)  # EfficientDet's classes count from 1
    keep = (want["scores"] > 0.3) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # ingest drops boxes of no area
    got = sorted((*(round(v * size, 2) for v in (x.x0, x.y0, x.x1, x.y1)), x.label, s) for x, s in found)
    wanted = sorted((*(round(float(v), 2) for v in box), CLASSES[int(c) - slot], round(float(s), 4))
                    for box, c, s in zip(b[keep], want["labels"][keep], want["scores"][keep], strict=True))  # fmt: skip
    assert got == wanted and len(got) > 10


@pytest.mark.parametrize("extra", [(), ("model.name=tf_efficientdet_d0", "data.image_size=128")])
def test_a_run_exports_its_detector_and_the_held_out_step_measures_the_export(
    mlflow_uri, tmp_path, process_group, extra
):
    """FCOS's export is scripted whole; EfficientDet's network traced and its decoding scripted around it."""
    from mlflow import MlflowClient

    from training.evaluation import held_out_outcome, held_out_plan, held_out_step

    uri = mlflow_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("detect", str(tmp_path / "artifacts"))).info.run_id
    recipe = _recipe(tmp_path, *extra)
    make_dataset(recipe.data.dataset, {"train": 4, "val": 4, "test": 4}, classes=3, size=64, boxes=True)
    plan = held_out_plan(recipe)
    config = {"recipe": recipe.model_dump(), "mlflow_uri": uri, "run_id": run_id, "held_out": plan}
    trainer = Trainer(config, rank=0, world=1)
    trainer.run(lambda metrics, folder: None)
    held_out_step(trainer)
    outcome, error = held_out_outcome(uri, run_id, recipe, plan)
    assert error is None and {"test_map50", "test_precision", "test_recall"} <= set(outcome.metrics)
    artifacts = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))
    assert {p.name for p in (artifacts / "model").iterdir()} == {"detector.torchscript", "model.json",
                                                                   "model.safetensors"}  # fmt: skip
    table = (artifacts / "detections.csv").read_text().splitlines()
    assert table[0] == "image,patient,true_boxes,found_boxes,hits,false_alarms,misses" and len(table) == 5
    assert (artifacts / "test_detections.csv").exists()


def test_a_detector_resumed_from_its_checkpoint_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, process_group):
    """The flips, DALI's order and seeds and the optimiser's state come back with the epoch (CPU, fixed seeds)."""
    import shutil

    from training.engine import checkpoint_weights

    recipe = _recipe(tmp_path, "epochs=2", "data.augment.vflip=0.5")
    saved = []

    def keep(metrics, folder):
        saved.append(shutil.copytree(folder, tmp_path / f"epoch{metrics['epoch']}"))

    Trainer({"recipe": recipe.model_dump()}, 0, 1).run(keep, mlflow=False)
    resumed = Trainer({"recipe": recipe.model_dump()}, 0, 1, str(saved[0]))
    assert resumed.start == 1
    again = []
    resumed.run(lambda metrics, folder: again.append(checkpoint_weights(folder)), mlflow=False)
    want = checkpoint_weights(saved[1])
    assert again[0].keys() == want.keys()
    for name, value in want.items():
        torch.testing.assert_close(again[0][name], value, rtol=0, atol=0, msg=name)


def test_local_detector_weights_load_every_tensor_that_fits(tmp_path):
    """``model.weights``: a detector's state dict on local disk (a COCO one, saved where the cluster reads it); a
    detector of other classes takes all but its class layers; one of nothing alike is refused."""
    cfg = load_recipe("brain_tumor_detect", ["model.name=fcos_resnet50_fpn", "model.pretrained=false",
                                             f"data.dataset={tmp_path}"]).model  # fmt: skip
    torch.manual_seed(1)
    coco = detection.build_detector(cfg, 90, 64)  # 90 classes (COCO's, as torchvision counts them)
    torch.save(coco.state_dict(), tmp_path / "coco.pth")
    local = cfg.model_copy(update={"pretrained": True, "weights": str(tmp_path / "coco.pth")})
    torch.manual_seed(2)
    mine = detection.build_detector(local, 1, 64).state_dict()
    theirs = coco.state_dict()
    differ = [k for k, v in mine.items() if not torch.equal(v, theirs[k])]
    assert differ == ["head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"]
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"model\.weights .*other\.pth: none of its tensors fits FCOS"):
        detection.build_detector(cfg.model_copy(update={"pretrained": True, "weights": str(tmp_path / "other.pth")}),
                                 1, 64)  # fmt: skip


def test_an_efficientdet_takes_effdets_own_checkpoint_of_other_classes(tmp_path):
    """An EfficientDet's ``model.weights``: effdet's checkpoint of its network (a COCO one, without this adapter's
    prefix); all but the class layer load."""
    from effdet import EfficientDet, get_efficientdet_config

    cfg = load_recipe("brain_tumor_detect", ["model.name=tf_efficientdet_d0", "model.pretrained=false",
                                             "data.image_size=128", f"data.dataset={tmp_path}"]).model  # fmt: skip
    torch.manual_seed(1)
    coco = EfficientDet(get_efficientdet_config("tf_efficientdet_d0"), pretrained_backbone=False)  # 90 classes
    torch.save(coco.state_dict(), tmp_path / "coco.pth")
    torch.manual_seed(2)
    local = cfg.model_copy(update={"pretrained": True, "weights": str(tmp_path / "coco.pth")})
    mine, theirs = detection.build_detector(local, 1, 128).model.state_dict(), coco.state_dict()
    differ = {k.rsplit(".", 1)[0] for k, v in mine.items() if not torch.equal(v, theirs[k])}
    assert differ == {"class_net.predict.conv_pw"}


def test_effdets_targets_are_y_first_and_padded_with_a_class_it_skips():
    from training.efficientdet import padded

    t = [{"boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]), "labels": torch.tensor([1, 2])},
         {"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.long)}]  # fmt: skip
    boxes, cls = padded(t)
    assert boxes.tolist() == [[[2, 1, 4, 3], [6, 5, 8, 7]], [[0, 0, 0, 0], [0, 0, 0, 0]]]
    assert cls.tolist() == [[1, 2], [-1, -1]]
    empty = padded(t[1:])  # a batch of negatives: one padded slot, as effdet's labeler needs
    assert empty[0].shape == (1, 1, 4) and empty[1].tolist() == [[-1]]
