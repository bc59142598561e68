"""Held-out evaluation on the real stack: `tessera train` ends by evaluating the run's selected model on the test
split, and `tessera evaluate` does it for another dataset; the logged metrics are checked against the exported
TorchScript model run outside Tessera on the same shards."""

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from scipy.stats import binomtest
from sklearn.metrics import accuracy_score, log_loss, roc_curve

from cluster.cli_predict import score_texts as score
from ingest.synthetic import make_slides
from shards import manifest as mf
from tests.datasets import make_dataset
from tests.integration.commands import ingest_wsi_cmd
from training.config import load_recipe
from training.eval_summary import summary
from training.evaluation import evaluate_run
from training.heatmaps import HEADER, OPACITY
from training.inference import predict_run
from training.launch import run_training
from training.submissions import strip_ai


@pytest.fixture(scope="module")
def trained(stack, tmp_path_factory):
    work = tmp_path_factory.mktemp("evaluate")
    splits = {"train": 16, "val": 8, "test": 12}
    # seed 1: validation holds a patient of each class, whose predictions choose the operating point
    make_dataset(str(work / "ds"), splits, size=32, shard_samples=4, width_um=64.0, sites=2, seed=1)
    overrides = [f"data.dataset={work / 'ds'}", "data.image_size=32", "epochs=2", "batch_size=4", "workers=2"]
    point = ["eval.operating_point=youden", "eval.positive=class1"]
    recipe = load_recipe("demo_tiles", [*overrides, *point, "eval.levels=[patient]"])
    return work, run_training(recipe, stack.mlflow_url, str(work / "ckpt"))


def _outputs(client, run_id: str, shards: Path, tmp: Path) -> tuple[np.ndarray, list[int | None], list[dict]]:
    """Probabilities, labels (None without ``.cls``) and metadata of the run's exported TorchScript model on every
    sample of ``shards``, decoded with PIL and normalised by hand."""
    model = torch.jit.load(client.download_artifacts(run_id, "model/model.ts", str(tmp)))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    probs, labels, metas = [], [], []
    for shard in sorted(shards.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for sample in members.values():
            image = sample.get("png") or sample["jpg"]
            rgb = np.asarray(Image.open(io.BytesIO(image)).convert("RGB")) / 255.0
            x = torch.tensor(((rgb - mean) / std).transpose(2, 0, 1)[None], dtype=torch.float32)
            with torch.no_grad():
                probs.append(torch.softmax(model(x), 1)[0].numpy())
            labels.append(int(sample["cls"]) if "cls" in sample else None)
            metas.append(json.loads(sample["json"]))
    return np.array(probs), labels, metas


def _reference(client, run_id: str, shards: Path, tmp: Path, site: str | None = None) -> dict[str, float]:
    """Accuracy, loss and patient accuracy (mean probabilities) of the run's exported TorchScript model on every
    sample of ``shards`` (of ``site`` alone, where given)."""
    p, labels, metas = _outputs(client, run_id, shards, tmp)
    if site:
        at = [i for i, m in enumerate(metas) if m["site"] == site]
        p, labels, metas = p[at], [labels[i] for i in at], [metas[i] for i in at]
    y, patients = np.array(labels), [m["patient"] for m in metas]
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
    # each metric's confidence interval, of 1000 resamples of the test split's 3 patients, brackets it
    intervals = client.download_artifacts(out.run_id, "test_intervals.csv", str(tmp_path))
    rows = list(csv.DictReader(Path(intervals).read_text().splitlines()))
    assert {(r["level"], r["clusters"], r["resampled"], r["resamples"]) for r in rows} == {
        ("sample", "3", "patients", "1000"),
        ("patient", "3", "patients", "1000"),
    }
    for key in ("test_accuracy", "test_patient_accuracy", "test_weighted_log_loss"):
        assert logged[f"{key}_ci_low"] <= logged[key] <= logged[f"{key}_ci_high"], key
    assert "in brackets, 95% intervals of 1000 bootstrap resamples of patients" in summary(out.held_out)
    # the operating point: Youden's threshold on the validation split's predictions, applied to the test split's
    val = client.download_artifacts(out.run_id, "predictions_sample.csv", str(tmp_path / "val"))
    val_rows = list(csv.DictReader(Path(val).read_text().splitlines()))
    truth, scores = [r["label"] == "class1" for r in val_rows], [float(r["p_class1"]) for r in val_rows]
    fpr, tpr, cuts = roc_curve(truth, scores, drop_intermediate=False)
    cut = cuts[int(np.argmax(tpr - fpr))]
    assert logged["test_op_threshold_class1"] == pytest.approx(cut)
    p, labels, _ = _outputs(client, out.run_id, work / "ds" / "test", tmp_path)
    y = np.array(labels)
    assert logged["test_op_sensitivity_class1"] == pytest.approx((p[y == 1, 1] >= cut).mean(), abs=1e-6)
    assert logged["test_op_specificity_class1"] == pytest.approx((p[y == 0, 1] < cut).mean(), abs=1e-6)
    assert "test_patient_op_threshold_class1" in logged and "test_operating_point.csv" in {
        a.path for a in client.list_artifacts(out.run_id)
    }
    assert f"class1 called at p >= {cut:.4f} (youden on validation): sensitivity " in summary(out.held_out)
    held = client.download_artifacts(out.run_id, "test_predictions_sample.csv", str(tmp_path / "held"))
    held_rows = list(csv.DictReader(Path(held).read_text().splitlines()))  # each call at that threshold too
    assert [r["op_predicted"] for r in held_rows] == [
        "class1" if float(r["p_class1"]) >= cut else "class0" for r in held_rows
    ]
    artifacts = {a.path for a in client.list_artifacts(out.run_id)}
    assert {"test_confusion_sample.png", "test_confusion_patient.png", "test_roc_patient.png"} <= artifacts
    assert {"test_calibration_sample.png", "calibration_patient.png"} <= artifacts  # reliability: held out, val
    assert {"confusion_sample.png", "roc_patient.png"} <= artifacts  # validation's own, still there
    table = client.download_artifacts(out.run_id, "test_predictions_patient.csv", str(tmp_path))
    rows = list(csv.DictReader(Path(table).read_text().splitlines()))
    assert sorted(r["patient"] for r in rows) == sorted(patients)
    for r in rows:
        expected = patients[r["patient"]]
        assert [float(r["p_class0"]), float(r["p_class1"])] == pytest.approx(expected.tolist(), abs=1e-4)
        assert r["predicted"] == f"class{int(expected.argmax())}"
    samples = client.download_artifacts(out.run_id, "test_predictions_sample.csv", str(tmp_path))
    sample_rows = list(csv.DictReader(Path(samples).read_text().splitlines()))
    assert len(sample_rows) == 12 and {r["site"] for r in sample_rows} == {"1", "2"}  # every test sample's row

    # Each centre's metrics (the test split's patients are of sites 1, 2, 1): logged, tabled and summed up.
    by_site = client.download_artifacts(out.run_id, "test_by_site.csv", str(tmp_path))
    table = {(r["site"], r["level"]): r for r in csv.DictReader(Path(by_site).read_text().splitlines())}
    assert sorted(table) == [("1", "patient"), ("1", "sample"), ("2", "patient"), ("2", "sample")]
    for site, samples, patients_there in (("1", 8, 2), ("2", 4, 1)):
        ref = _reference(client, out.run_id, work / "ds" / "test", tmp_path, site)
        assert logged[f"test_site_{site}_samples"] == samples
        assert logged[f"test_site_{site}_patient_count"] == patients_there
        assert logged[f"test_site_{site}_accuracy"] == pytest.approx(ref["accuracy"], abs=1e-4)
        assert logged[f"test_site_{site}_patient_accuracy"] == pytest.approx(ref["patient_accuracy"], abs=1e-4)
        assert float(table[site, "sample"]["accuracy"]) == pytest.approx(ref["accuracy"], abs=1e-4)
        row = table[site, "patient"]
        assert int(row["count"]) == int(row["n_class0"]) + int(row["n_class1"]) == patients_there
        # a site's patient accuracy, with its own patients' interval (Clopper-Pearson's, a proportion of patients)
        exact = binomtest(round(ref["patient_accuracy"] * patients_there), patients_there).proportion_ci(0.95)
        bounds = (
            logged[f"test_site_{site}_patient_accuracy_ci_low"],
            logged[f"test_site_{site}_patient_accuracy_ci_high"],
        )
        assert bounds == pytest.approx((exact.low, exact.high), abs=1e-6)
        assert float(row["accuracy_ci_low"]) == pytest.approx(exact.low, abs=1e-5)
        line = f"  site {site} ({samples} samples, {patients_there} patient(s)): patient accuracy "
        assert f"{line}{ref['patient_accuracy']:.4f} [{exact.low:.4f}, {exact.high:.4f}], " in summary(out.held_out)
    worst = min(logged["test_site_1_patient_accuracy"], logged["test_site_2_patient_accuracy"])
    assert logged["test_worst_site_patient_accuracy"] == worst
    assert "by_site.csv" in artifacts  # the validation split's, of its own patients' sites
    # and each epoch, its centres' curves (its patients are of sites 1 and 2), the worst's among them
    curves = {k: client.get_metric_history(out.run_id, f"val_{k}") for k in ("site_1_loss", "accuracy")}
    assert not curves["site_1_loss"] and len(curves["accuracy"]) == 2  # no loss per site; two epochs
    for key in ("accuracy", "patient_weighted_log_loss"):
        one, two, worst = (
            {m.step: m.value for m in client.get_metric_history(out.run_id, f"val_{k}")}
            for k in (f"site_1_{key}", f"site_2_{key}", f"worst_site_{key}")
        )
        pick = max if key.endswith("loss") else min
        assert sorted(worst) == [0, 1] and worst == {e: pick(one[e], two[e]) for e in worst}, key


def test_evaluate_takes_another_dataset_under_its_own_prefix_and_refuses_other_classes(
    trained, stack, tmp_path, capsys
):
    """Also on another number of workers than the run trained with; and on a dataset of one of its classes (an
    external cohort of one diagnosis), whose labels are read in the model's order."""
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

    # class1 alone: its label 0 is the model's 1, read so (not as the model's 0, which scores otherwise)
    make_dataset(str(work / "one"), {"test": 8}, classes=1, size=32, shard_samples=4, seed=4)
    mf.save(mf.load(str(work / "one")).model_copy(update={"classes": ["class1"]}), str(work / "one"))
    capsys.readouterr()
    one = evaluate_run(out.run_id, stack.mlflow_url, str(work / "ckpt"), "test", str(work / "one"), "one class")
    assert "holds 1 of the model's 2 classes; without class0: their precision, recall" in capsys.readouterr().out
    p, labels, _ = _outputs(MlflowClient(stack.mlflow_url), out.run_id, work / "one" / "test", tmp_path)
    assert set(labels) == {0}
    truth = np.ones(len(labels), np.int64)
    assert one.metrics["one_class_accuracy"] == pytest.approx(accuracy_score(truth, p.argmax(1)), abs=1e-4)
    assert one.metrics["one_class_loss"] == pytest.approx(log_loss(truth, p, labels=[0, 1]), abs=1e-4)
    assert one.metrics["one_class_accuracy"] != pytest.approx(accuracy_score(truth * 0, p.argmax(1)), abs=1e-4)
    assert one.metrics["one_class_recall_class1"] == one.metrics["one_class_accuracy"]


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


def test_a_paired_comparison_reads_the_runs_held_out_predictions(trained, stack):
    """`tessera compare A B --paired`: here the run with itself, whose every difference is 0, through MLflow's
    tables of its held-out step; a split it was not evaluated on is refused, naming the command that makes one."""
    from tune.paired import run_paired

    _, out = trained
    results, report, run_id = run_paired(
        stack.mlflow_url, out.run_id, out.run_id, ["accuracy", "brier_loss"], "test", "patient", 0.05
    )
    assert [(r.metric, r.diff, r.p) for r in results] == [("accuracy", 0.0, 1.0), ("brier_loss", 0.0, 1.0)]
    assert results[0].a == pytest.approx(out.held_out.metrics["test_patient_accuracy"])
    assert "paired on the test split's 3 patient(s)" in report
    client = MlflowClient(stack.mlflow_url)
    logged = client.get_run(run_id)
    assert logged.data.metrics["accuracy_diff"] == 0.0 and logged.data.tags["tessera.kind"] == "comparison"
    assert {a.path for a in client.list_artifacts(run_id, "comparison")} == {
        "comparison/report.md",
        "comparison/paired.json",
    }
    with pytest.raises(ValueError, match=rf"run {out.run_id}: no nosuch evaluation .*`tessera evaluate"):
        run_paired(stack.mlflow_url, out.run_id, out.run_id, ["auc"], "nosuch", "patient", 0.05)


def test_predict_calls_the_inputs_of_a_dataset_without_labels(trained, stack, tmp_path):
    """Slides ingested with a table of patients and no labels, as paper 000's STRIP AI test set (its test.csv):
    `tessera predict` calls each tile and each patient, a patient's slides together, with the run's model. The
    run keeps the tables pseudonymous; --reveal names the slides' files and the patients in the caller's copy, from
    the private map the ingest kept. The slides read at another scale than the model's training tiles: a warning,
    as evaluation gives. (The demo calls slides ingested without any table.)"""
    work, out = trained
    slides, _ = make_slides(tmp_path / "slides", n=3, size=1024, seed=9)
    files = slides[:2]  # the third is not in the table: not taken
    table = tmp_path / "test.csv"
    table.write_text(
        "image_id,center_id,patient_id,image_num\n" + "".join(f"{f.stem},7,P-A,{i}\n" for i, f in enumerate(files))
    )
    ds, preds = tmp_path / "unlabelled", tmp_path / "preds"
    cli = [sys.executable, "-m", "cluster.cli"]
    ingest = subprocess.run(
        [*ingest_wsi_cmd(tmp_path / "slides", ds), "--labels", str(table), "--split", "test=1.0", "--mpp", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ingest.returncode == 0, ingest.stderr[-2000:]
    predict = [*cli, "predict", out.run_id, "--dataset", str(ds), "--out", str(preds), "--reveal", "--heatmaps"]
    predict += ["--submission", str(tmp_path / "submission.csv"), "workers=1"]
    run = subprocess.run(predict, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    manifest = json.loads((ds / "manifest.json").read_text())
    n = manifest["splits"]["test"]["num_samples"]
    assert manifest["classes"] == [] and n > 0
    assert sorted(r["status"] for r in manifest["inputs"]) == ["ingested", "ingested", "skipped"]
    assert f"{n} samples of the test split of {ds} (without labels):" in run.stdout
    assert f"patient: 1 row -> {preds}/predictions_patient.csv" in run.stdout
    # read at 1 µm/px, 128 px tiles show twice the specimen of the model's training tiles: said, not refused
    scale = "these samples show 128 µm of specimen each and the model's training samples 64 µm (2x): its calls may"
    assert f"warning: {scale}" in run.stdout

    shown = list(csv.DictReader((preds / "predictions_sample.csv").read_text().splitlines()))
    columns = ["site", "patient", "slide", "x", "y", "size0", "predicted", "op_predicted", "p_class0", "p_class1"]
    assert list(shown[0]) == columns and {r["site"] for r in shown} == {"7"}  # no label; the table's center_id
    assert {r["slide"] for r in shown} == {str(f) for f in files}  # the files, revealed
    assert {r["patient"] for r in shown} == {"P-A"}  # the table's patient ID
    assert (preds / "predictions_sample.csv").stat().st_mode & 0o777 == 0o600
    # the model's own probabilities, outside Tessera: each tile once, whichever worker read it
    client = MlflowClient(stack.mlflow_url)
    cut = client.get_run(out.run_id).data.metrics["test_op_threshold_class1"]
    probs, labels, metas = _outputs(client, out.run_id, ds / "test", tmp_path / "ref")
    assert labels == [None] * n and len(shown) == n
    expected = {(m["slide"], m["x"], m["y"]): p for m, p in zip(metas, probs, strict=True)}
    kept = client.download_artifacts(out.run_id, "predictions/external_test/predictions_sample.csv", str(tmp_path))
    pseudonymous = list(csv.DictReader(Path(kept).read_text().splitlines()))
    assert {r["slide"] for r in pseudonymous} == {m["slide"] for m in metas}  # the run's copy: pseudonyms only
    for r in pseudonymous:
        p = expected[(r["slide"], int(r["x"]), int(r["y"]))]
        assert [float(r["p_class0"]), float(r["p_class1"])] == pytest.approx(p.tolist(), abs=1e-4)
        assert r["predicted"] == f"class{int(p.argmax())}"
        # and at the operating point the run chose on its validation split (youden, class1)
        assert r["op_predicted"] == ("class1" if p[1] >= cut else "class0")
    # the caller's copy is the run's, row for row, with the names in place of the pseudonyms
    patient_of = {}
    for mine, theirs in zip(shown, pseudonymous, strict=True):
        assert [mine[k] for k in ("x", "y", "p_class1")] == [theirs[k] for k in ("x", "y", "p_class1")]
        patient_of[theirs["slide"]] = mine["patient"]
    _check_heatmaps(run.stdout, preds, ds, files, manifest, pseudonymous, (client, out.run_id), tmp_path)
    patients = list(csv.DictReader((preds / "predictions_patient.csv").read_text().splitlines()))
    assert [r["patient"] for r in patients] == ["P-A"]  # both slides' tiles
    for r in patients:  # each patient's mean over its tiles (the recipe's eval.how)
        tiles = [p for m, p in zip(metas, probs, strict=True) if patient_of[m["slide"]] == r["patient"]]
        assert float(r["p_class1"]) == pytest.approx(np.mean(tiles, axis=0)[1], abs=1e-4)
    # STRIP AI's submission layout: the same patients and probabilities, by the patients' IDs, 0600
    submission = tmp_path / "submission.csv"
    assert f"submission (STRIP AI): 1 patient -> {submission}" in run.stdout
    assert submission.read_text() == "patient_id,class0,class1\n" + "".join(
        f"{r['patient']},{r['p_class0']},{r['p_class1']}\n" for r in patients
    )
    assert submission.stat().st_mode & 0o777 == 0o600

    # its own test split: the labels beside the calls, the same patients' calls as the held-out step's table
    own = predict_run(out.run_id, stack.mlflow_url, str(work / "ckpt"), overrides=["workers=1"])
    assert own.labelled and own.name == "test" and own.split == "test" and own.samples == 12
    held_out = client.download_artifacts(out.run_id, "test_predictions_patient.csv", str(tmp_path))
    assert own.tables["patient"] == Path(held_out).read_text()
    assert "label" in own.tables["sample"].splitlines()[0].split(",")
    # its STRIP AI submission, scored against the patients' labels (`tessera score`), is the held-out step's loss
    rows = list(csv.DictReader(own.tables["patient"].splitlines()))
    labels = "patient,label\n" + "".join(f"{r['patient']},{r['label']}\n" for r in rows)
    loss = client.get_run(out.run_id).data.metrics["test_patient_weighted_log_loss"]
    assert score(strip_ai(own.tables["patient"]), labels).value == pytest.approx(loss, abs=1e-4)


def _check_heatmaps(stdout, preds, ds, files, manifest, rows, run, tmp_path):
    """--heatmaps: a PNG per slide, named by its file in the caller's copy (0600) and by its pseudonym in the run;
    each tile's place on the preview (the manifest's scale) painted by its probability of class1."""
    client, run_id = run
    assert f"heatmaps: 2 slides -> {preds}/heatmaps/" in stdout
    named = sorted(p.name for p in (preds / "heatmaps").iterdir())
    assert named == sorted(f"{f.name}.png" for f in files)
    assert all((preds / "heatmaps" / name).stat().st_mode & 0o777 == 0o600 for name in named)
    kept = Path(client.download_artifacts(run_id, "predictions/external_test/heatmaps", str(tmp_path / "hm")))
    scale = {r["item"]: r["preview_scale"] for r in manifest["inputs"] if r["status"] == "ingested"}
    assert sorted(p.stem for p in kept.iterdir()) == sorted(scale)
    for slide in scale:
        image = cv2.imread(str(kept / f"{slide}.png"))
        preview = cv2.imread(str(ds / "previews" / f"{slide}.png"))
        h, w = preview.shape[:2]
        panel = image[HEADER : HEADER + h, w + 4 :]
        for r in [r for r in rows if r["slide"] == slide][:5]:
            f, size0 = scale[slide], int(r["size0"])
            cx, cy = round((int(r["x"]) + size0 / 2) * f), round((int(r["y"]) + size0 / 2) * f)
            level = np.array([[round(float(r["p_class1"]) * 255)]], np.uint8)
            colour = cv2.applyColorMap(level, cv2.COLORMAP_VIRIDIS)[0, 0]
            expected = np.round(OPACITY * colour + (1 - OPACITY) * preview[cy, cx])
            assert np.abs(panel[cy, cx].astype(int) - expected).max() <= 1


def test_a_calibrated_evaluation_scales_the_models_probabilities_by_temperatures_fitted_on_validation(
    trained, stack, tmp_path
):
    """`tessera evaluate RUN eval.calibration=temperature`: at each level, the temperature that minimises the
    weighted log loss on the run's validation table scales the exported model's probabilities of the held-out
    split (the patients' aggregated from the tiles' unscaled ones); the calls, and the accuracy, stay."""
    from training.predictions import read_table

    work, out = trained
    client = MlflowClient(stack.mlflow_url)
    options = ["workers=1", "eval.calibration=temperature", "eval.bootstrap=0"]
    hot = evaluate_run(out.run_id, stack.mlflow_url, str(work / "ckpt"), "test", name="calibrated", overrides=options)
    m, pre = hot.metrics, hot.prefix
    temps = {"sample": m[f"{pre}temperature"], "patient": m[f"{pre}patient_temperature"]}
    p, labels, metas = _outputs(client, out.run_id, work / "ds" / "test", tmp_path)
    y, patients = np.array(labels), [x["patient"] for x in metas]
    groups = sorted(set(patients))
    gp = np.array([p[[q == g for q in patients]].mean(0) for g in groups])
    gy = np.array([y[[q == g for q in patients]][0] for g in groups])

    def scaled(q, t):  # written out: softmax of log p / T
        z = np.exp(np.log(np.clip(q, 1e-15, 1)) / t)
        return z / z.sum(1, keepdims=True)

    def strip_ai(y_true, q):  # the competition's loss, written out: each class's mean -log p, averaged
        return np.mean([-np.log(q[y_true == c, c]).mean() for c in np.unique(y_true)])

    assert m[f"{pre}weighted_log_loss"] == pytest.approx(strip_ai(y, scaled(p, temps["sample"])), rel=1e-4)
    assert m[f"{pre}patient_weighted_log_loss"] == pytest.approx(strip_ai(gy, scaled(gp, temps["patient"])), rel=1e-4)
    hot_p = scaled(p, temps["sample"])  # the held-out loss (no class weights) is the scaled probabilities' too
    assert m[f"{pre}loss"] == pytest.approx(-np.log(hot_p[np.arange(len(y)), y]).mean(), rel=1e-4)
    assert m[f"{pre}accuracy"] == out.held_out.metrics["test_accuracy"]
    # each temperature is the validation table's best (or the search's edge, where the loss falls toward it)
    for level, t in temps.items():
        table = read_table(
            Path(client.download_artifacts(out.run_id, f"predictions_{level}.csv", str(tmp_path))).read_text(), level
        )
        vy = np.array([["class0", "class1"].index(label) for label in table.labels])
        at = {f: strip_ai(vy, scaled(table.probs, t * f)) for f in (1 / 1.05, 1.0, 1.05)}
        edge = t < 0.05 * 1.01 or t > 20.0 / 1.01  # the search's bounds (training.calibration.BOUNDS_T)
        assert at[1.0] <= min(at.values()) + 1e-9 or edge, (level, t)
    assert "probabilities scaled by temperatures fitted on validation: sample " in summary(hot)
    # `tessera predict` writes the same scaled probabilities, and says at which temperatures
    called = predict_run(out.run_id, stack.mlflow_url, str(work / "ckpt"), split="test", overrides=options[:2])
    rows = list(csv.DictReader(called.tables["patient"].splitlines()))
    assert [r["patient"] for r in rows] == groups
    found = np.array([[float(r["p_class0"]), float(r["p_class1"])] for r in rows])
    assert found == pytest.approx(scaled(gp, temps["patient"]), abs=1e-4)
