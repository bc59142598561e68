"""Temperature scaling of a model's probabilities (training.calibration): fitted on validation at each level, it
recovers a known over-confidence, keeps every call and ranking, and lowers the held-out log loss."""

import numpy as np
import pytest
from scipy.special import expit, softmax

from training.calibration import calibrated, fit_temperature, scaled, temperatures
from training.config import TrainRecipe
from training.levels import by_level, evaluate, read_validation, thresholds
from training.metas import Metas
from training.metrics import weighted_log_loss
from training.predictions import prediction_table


def _recipe(task: str = "multiclass", **evaluation) -> TrainRecipe:
    return TrainRecipe.model_validate(
        {"name": "t", "task": task, "data": {"dataset": "/x"}, "model": {"name": "resnet18"},
         "eval": {"levels": ["patient"], "calibration": "temperature"} | evaluation}
    )  # fmt: skip


def _overconfident(n: int, classes: int, factor: float, seed: int = 0):
    """Labels drawn from softmax(z), and the probabilities of a model ``factor`` times as sure: softmax(z * factor)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    labels = np.array([rng.choice(classes, p=row) for row in softmax(z, axis=1)])
    return softmax(z * factor, axis=1), labels


def test_scaling_keeps_each_call_and_order_and_t_1_changes_nothing():
    probs, _ = _overconfident(500, 3, 2.0)
    assert scaled(probs, 1.0, False) is probs
    for t in (0.5, 2.0):
        out = scaled(probs, t, False)
        assert np.allclose(out.sum(axis=1), 1) and (out.argmax(axis=1) == probs.argmax(axis=1)).all()
    two, _ = _overconfident(500, 2, 2.0)  # of two classes, a class's ranking of the samples too (its AUC)
    assert (np.argsort(scaled(two, 0.4, False)[:, 1]) == np.argsort(two[:, 1])).all()
    assert np.allclose(scaled(probs, 2.0, False), softmax(np.log(probs) / 2.0, axis=1))
    labels = np.random.default_rng(1).uniform(0.01, 0.99, (50, 6))
    out = scaled(labels, 3.0, True)
    assert np.allclose(out, expit(np.log(labels / (1 - labels)) / 3.0))
    assert (np.argsort(out[:, 2]) == np.argsort(labels[:, 2])).all()  # each label's ranking: its AUC
    assert np.abs(out - 0.5).max() < np.abs(labels - 0.5).max()  # T > 1 softens


@pytest.mark.parametrize("factor", [0.5, 2.5])
def test_the_fit_recovers_a_known_over_or_under_confidence(factor):
    probs, labels = _overconfident(20000, 3, factor)
    t = fit_temperature(probs, labels, multilabel=False)
    assert t == pytest.approx(factor, rel=0.1)
    assert weighted_log_loss(labels, scaled(probs, t, False)) < weighted_log_loss(labels, probs)
    rng = np.random.default_rng(2)
    z = rng.normal(0, 1.5, (20000, 2))
    y = (rng.random(z.shape) < expit(z)).astype(int)
    assert fit_temperature(expit(z * factor), y, multilabel=True) == pytest.approx(factor, rel=0.1)
    with pytest.raises(ValueError, match="one class only"):
        fit_temperature(probs[labels == 0], labels[labels == 0], multilabel=False)


def test_each_level_is_fitted_on_its_validation_table_and_scales_its_groups_aggregated_unscaled():
    recipe = _recipe()
    outputs = ["CE", "LAA"]
    rng = np.random.default_rng(3)
    labels = np.repeat(rng.integers(0, 2, 100), 4)  # 100 patients of 4 tiles, each patient of one class
    z = rng.normal(0, 1.5, (400, 2)) + np.eye(2)[labels]  # a tile's scores lean to its patient's class
    probs = softmax(3.0 * z, axis=1)  # three times as sure as they should be
    metas = Metas.of({"patient": f"p{i // 4}"} for i in range(400))
    pred = {"probs": probs, "labels": labels, "metas": metas, "loss": 0.0}
    # the run's validation tables, as the training logged them: the same predictions here
    tables = {"sample": prediction_table({"x": list(range(400))}, probs, labels, outputs, False)}
    tables |= {lv: prediction_table({lv: i}, p, y, outputs, False) for lv, i, p, y in by_level(pred, recipe)}
    temps, notes = temperatures(recipe, outputs, read_validation(tables))
    assert not notes and set(temps) == {"sample", "patient"}
    assert temps["sample"] == pytest.approx(fit_temperature(probs, labels, False), rel=1e-6)
    [(_, _, patient_probs, patient_labels)] = by_level(pred, recipe)
    assert temps["patient"] == pytest.approx(fit_temperature(patient_probs, patient_labels, False), rel=1e-6)
    hot = calibrated(pred, temps, multilabel=False)
    assert np.allclose(hot["probs"], scaled(probs, temps["sample"], False)) and hot["uncalibrated"] is probs
    [(_, _, scaled_groups, _)] = by_level(hot, recipe)  # aggregated from the unscaled tiles, then scaled
    assert np.allclose(scaled_groups, scaled(patient_probs, temps["patient"], False))
    before, after = evaluate(pred, recipe, outputs, "test_"), evaluate(hot, recipe, outputs, "test_")
    assert after["test_accuracy"] == before["test_accuracy"] and after["test_auc"] == before["test_auc"]
    assert after["test_weighted_log_loss"] < before["test_weighted_log_loss"]
    assert after["test_patient_weighted_log_loss"] < before["test_patient_weighted_log_loss"]
    # no table at a level, or a recipe that asks for none
    assert temperatures(recipe, outputs, read_validation({"sample": tables["sample"]}))[1] == [
        "patient: none (the run logged no validation predictions at this level)"
    ]
    assert temperatures(_recipe(calibration="none"), outputs, read_validation(tables)) == ({}, [])
    assert calibrated(pred, {}, False) is pred


def test_the_operating_point_is_chosen_on_validation_scaled_as_the_held_out_probabilities():
    recipe = _recipe(operating_point="sensitivity:0.9", positive="LAA", levels=[])
    probs, labels = _overconfident(300, 2, 3.0)
    table = {"sample": prediction_table({"x": list(range(300))}, probs, labels, ["CE", "LAA"], False)}
    raw = thresholds(recipe, ["CE", "LAA"], read_validation(table))[0]["sample"][1]
    hot = thresholds(recipe, ["CE", "LAA"], read_validation(table), {"sample": 2.0})[0]["sample"][1]
    assert hot[0] == pytest.approx(scaled(np.array([[1 - raw[0], raw[0]]]), 2.0, False)[0, 1])
    assert hot[1] == raw[1]  # the same samples called: the same rates on validation


def test_a_study_may_compare_the_temperatures_the_held_out_step_logs():
    from training.preflight import held_out_reports, validation_metrics

    recipe = _recipe()
    names = held_out_reports(recipe, ["CE", "LAA"], validation_metrics(recipe, ["CE", "LAA"]))
    assert {"temperature", "patient_temperature"} <= names
    plain = _recipe(calibration="none")
    assert not {
        n for n in held_out_reports(plain, ["CE", "LAA"], validation_metrics(plain, ["CE", "LAA"])) if "temp" in n
    }


@pytest.mark.parametrize("multilabel", [False, True])
def test_the_held_out_loss_is_the_losss_own_of_the_scaled_logits(multilabel):
    """A calibrated split's loss is the one :class:`training.losses.Loss` gives the model's logits divided by
    the temperature (a class's log-probability or a label's logit, as :func:`scaled` divides it)."""
    import torch

    from training.losses import Loss

    rng = np.random.default_rng(4)
    outputs = 6 if multilabel else 3
    logits = torch.tensor(rng.normal(0, 3, (200, outputs)), dtype=torch.float32)
    labels = (rng.random((200, outputs)) < 0.3).astype(np.int64) if multilabel else rng.integers(0, outputs, 200)
    loss = Loss(multilabel, None, outputs)
    pred = {"probs": loss.probabilities(logits), "labels": labels, "metas": [{}] * 200, "loss": 0.0}
    for t in (0.5, 1.0, 3.0):
        hot = calibrated(pred, {"sample": t}, multilabel)
        expected = float(loss(logits / t, torch.as_tensor(labels), class_weighted=False))
        assert hot["loss"] == pytest.approx(expected, rel=1e-4), t
    assert calibrated(pred, {"patient": 2.0}, multilabel)["loss"] == 0.0  # the samples' unscaled: their own loss
