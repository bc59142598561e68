"""Held-out evaluation on the real stack: `tessera train` ends by evaluating the run's selected model on the test
split, and `tessera evaluate` does it for another dataset; the logged metrics are checked against the exported
TorchScript model run outside Tessera on the same shards."""

import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from sklearn.metrics import accuracy_score, log_loss

from tests.datasets import make_dataset
from training.config import load_recipe
from training.evaluation import evaluate_run, summary
from training.launch import run_training


@pytest.fixture(scope="module")
def trained(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("evaluate")
    make_dataset(str(work / "ds"), {"train": 16, "val": 8, "test": 12}, size=32, shard_samples=4, width_um=64.0)
    overrides = [f"data.dataset={work / 'ds'}", "data.image_size=32", "epochs=2", "batch_size=4", "workers=2"]
    recipe = load_recipe("demo_tiles", [*overrides, "eval.levels=[patient]"])
    return work, run_training(recipe, stack.mlflow_url, str(work / "ckpt"))


def _reference(client, run_id: str, shards: Path, tmp: Path) -> dict[str, float]:
    """Accuracy, loss and patient accuracy (mean probabilities) of the run's exported TorchScript model on every
    sample of ``shards``, decoded with PIL and normalised by hand."""
    model = torch.jit.load(client.download_artifacts(run_id, "model/model.ts", str(tmp)))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    probs, labels, patients = [], [], []
    for shard in sorted(shards.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for sample in members.values():
            rgb = np.asarray(Image.open(io.BytesIO(sample["png"])).convert("RGB")) / 255.0
            x = torch.tensor(((rgb - mean) / std).transpose(2, 0, 1)[None], dtype=torch.float32)
            with torch.no_grad():
                probs.append(torch.softmax(model(x), 1)[0].numpy())
            labels.append(int(sample["cls"]))
            patients.append(json.loads(sample["json"])["patient"])
    p, y = np.array(probs), np.array(labels)
    groups = sorted(set(patients))
    gp = np.array([p[[q == g for q in patients]].mean(0) for g in groups])
    gy = np.array([y[[q == g for q in patients]][0] for g in groups])
    return {
        "accuracy": accuracy_score(y, p.argmax(1)),
        "loss": log_loss(y, p, labels=[0, 1]),
        "patient_accuracy": accuracy_score(gy, gp.argmax(1)),
        "patients": {g: gp[i] for i, g in enumerate(groups)},
    }


def test_training_evaluates_its_selected_model_on_the_test_split(trained, stack, tmp_path):
    work, out = trained
    assert out.error is None and out.held_out_error is None
    assert out.held_out.prefix == "test_" and out.held_out.split == "test"
    assert out.held_out.warning is None  # its own dataset: the scale it trained on
    client = MlflowClient(stack.mlflow_url)
    run = client.get_run(out.run_id)
    logged = run.data.metrics
    ref = _reference(client, out.run_id, work / "ds" / "test", tmp_path)
    patients = ref.pop("patients")
    for key, value in ref.items():
        assert logged[f"test_{key}"] == pytest.approx(value, abs=1e-4), key
        assert out.held_out.metrics[f"test_{key}"] == pytest.approx(value, abs=1e-4), key
    assert run.data.tags["test_dataset"] == str(work / "ds")
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"test_confusion_sample.png", "test_confusion_patient.png", "test_roc_patient.png"} <= artifacts
    assert {"confusion_sample.png", "roc_patient.png"} <= artifacts  # validation's own, still there
    table = client.download_artifacts(out.run_id, "test_predictions_patient.csv", str(tmp_path))
    rows = list(csv.DictReader(Path(table).read_text().splitlines()))
    assert sorted(r["patient"] for r in rows) == sorted(patients)
    for r in rows:
        expected = patients[r["patient"]]
        assert [float(r["p_class0"]), float(r["p_class1"])] == pytest.approx(expected.tolist(), abs=1e-4)
        assert r["predicted"] == f"class{int(expected.argmax())}"
    samples = client.download_artifacts(out.run_id, "test_predictions_sample.csv", str(tmp_path))
    assert len(Path(samples).read_text().splitlines()) == 1 + 12  # a header and every test sample


def test_evaluate_takes_another_dataset_under_its_own_prefix_and_refuses_other_classes(trained, stack, tmp_path):
    """Also on another number of workers than the run trained with."""
    work, out = trained
    make_dataset(str(work / "ext"), {"test": 8}, size=32, shard_samples=4, seed=3, width_um=256.0)
    one = ["workers=1"]  # the run trained on two: a sample's prediction does not depend on the worker count
    ext = evaluate_run(out.run_id, stack.mlflow_url, str(work / "ckpt"), "test", str(work / "ext"), overrides=one)
    assert ext.prefix == "external_test_"
    # tiles four times as wide as the training's: said, and kept with the run's metrics
    scale = "these samples show 256 µm of specimen each and the model's training samples 64 µm (4x)"
    assert ext.warning.startswith(scale) and f"  warning: {scale}" in summary(ext)
    tags = MlflowClient(stack.mlflow_url).get_run(out.run_id).data.tags
    assert tags["external_test_scale_warning"] == ext.warning and "test_scale_warning" not in tags
    logged = MlflowClient(stack.mlflow_url).get_run(out.run_id).data.metrics
    ref = _reference(MlflowClient(stack.mlflow_url), out.run_id, work / "ext" / "test", tmp_path)
    assert logged["external_test_accuracy"] == pytest.approx(ref["accuracy"], abs=1e-4)
    assert logged["test_accuracy"] == pytest.approx(out.held_out.metrics["test_accuracy"])  # not overwritten

    make_dataset(str(work / "three"), {"test": 6}, classes=3, size=32)
    with pytest.raises(ValueError, match=r"classes \['class0', 'class1', 'class2'\] are not the model's"):
        evaluate_run(out.run_id, stack.mlflow_url, str(work / "ckpt"), "test", str(work / "three"))
    with pytest.raises(ValueError, match=r"has no holdout split \(has \['test', 'train', 'val'\]\)"):
        evaluate_run(out.run_id, stack.mlflow_url, str(work / "ckpt"), "holdout")


def test_evaluating_the_val_split_adds_nothing_to_the_training_curves(trained, stack, tmp_path):
    """Training logs ``val_*`` per epoch: the selected model on the val split goes under ``eval_val_``."""
    work, out = trained
    client = MlflowClient(stack.mlflow_url)
    before = [(m.step, m.value) for m in client.get_metric_history(out.run_id, "val_accuracy")]
    val = evaluate_run(out.run_id, stack.mlflow_url, str(work / "ckpt"), "val", overrides=["workers=1"])
    assert val.prefix == "eval_val_"
    assert [(m.step, m.value) for m in client.get_metric_history(out.run_id, "val_accuracy")] == before
    ref = _reference(client, out.run_id, work / "ds" / "val", tmp_path)
    assert val.metrics["eval_val_accuracy"] == pytest.approx(ref["accuracy"], abs=1e-4)
    # the exported model is the one the run validated at its selected epoch (val_loss, min), on every rank: each
    # rank's BatchNorm statistics had followed its own batches, and rank 1's half of the split was scored by
    # another model than the one exported
    selected = min(m.value for m in client.get_metric_history(out.run_id, "val_loss"))
    assert val.metrics["eval_val_loss"] == pytest.approx(selected, rel=1e-6)
    assert "eval_val_confusion_sample.png" in {a.path for a in client.list_artifacts(out.run_id)}
    # test_patient_* would share names with the held-out step's test_ metrics (test_patient_accuracy)
    with pytest.raises(ValueError, match=r"metrics test_patient_\* would mix with those of its evaluation test_\*"):
        evaluate_run(out.run_id, stack.mlflow_url, str(work / "ckpt"), "test", name="test patient")
