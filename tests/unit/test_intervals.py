"""Held-out confidence intervals: the patient bootstrap, its fast metrics against scikit-learn's, the levels."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from scipy.stats import binomtest

from training.config import TrainRecipe
from training.intervals import bootstrap, class_statistic, clusters_of, label_statistic, resamples
from training.levels import evaluate, intervals, with_interval
from training.metas import Metas
from training.metrics import classification_metrics, multilabel_metrics, predicted_classes


def _probs(rng, n: int, c: int, ties: bool = False) -> np.ndarray:
    p = rng.random((n, c))
    if ties:  # scores that repeat, as a model's rounded outputs do: AUC's ties
        p = np.round(p * 4) + 0.01
    return p / p.sum(axis=1, keepdims=True)


def _resampled(rng, n: int):
    """The whole split, then resamples of it: index arrays, and the weight of each sample in each."""
    for idx in [np.arange(n)] + [rng.integers(0, n, n) for _ in range(3)]:
        yield idx, np.bincount(idx, minlength=n).astype(np.float64)


@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("threshold", [None, 0.3])
def test_class_statistic_equals_scikit_learns_metrics_on_resamples(classes, threshold):
    """The weighted statistic of a resample (each sample weighted by how often it was drawn) against
    scikit-learn's metrics of the resample's samples, repeated as drawn."""
    rng = np.random.default_rng(classes)
    names = [f"c {k}" for k in range(classes)]
    for trial in range(20):
        n = int(rng.integers(8, 60))
        y = rng.integers(0, classes, n)
        p = _probs(rng, n, classes, ties=trial % 2 == 0)
        cut = threshold if classes == 2 else None
        stat = class_statistic(y, p, names, predicted_classes(p, cut))
        for idx, w in _resampled(rng, n):
            fast = stat(w)
            ref = classification_metrics(y[idx], p[idx], classes=names, threshold=cut)
            assert set(fast) == {k for k in ref if with_interval(k)}
            for key, value in fast.items():
                absent = key.startswith("recall_") and key.removeprefix("recall_").replace("_", " ") not in {
                    names[k] for k in y[idx]
                }
                if absent:
                    assert math.isnan(value) and ref[key] == 0  # no samples of the class: no sensitivity (sklearn: 0)
                else:
                    assert value == pytest.approx(ref[key], abs=1e-12, nan_ok=True), key


def test_label_statistic_equals_scikit_learns_multilabel_metrics():
    rng = np.random.default_rng(3)
    names = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
    for trial in range(12):
        n = int(rng.integers(5, 50))
        y = (rng.random((n, 6)) < rng.uniform(0.05, 0.6)).astype(np.int64)
        p = rng.random((n, 6))
        if trial % 3 == 0:
            p = np.round(p, 1)
        stat = label_statistic(y, p, names, 0.5)
        for idx, w in _resampled(rng, n):
            fast = stat(w)
            ref = multilabel_metrics(y[idx], p[idx], names, threshold=0.5)
            assert set(fast) == {k for k in ref if with_interval(k)}
            for key, value in fast.items():
                assert value == pytest.approx(ref[key], abs=1e-12, nan_ok=True), key


def test_resamples_draw_whole_patients_as_often_as_drawn():
    keys = ["a"] * 3 + ["b"] * 1 + ["c"] * 5 + [None, None]  # two samples without a patient: each its own
    clusters = clusters_of(keys)
    assert len(set(clusters.tolist())) == 5
    for w in resamples(clusters, 200, seed=1):
        # a patient's samples weigh alike, its draws: as many draws as the split has patients
        draws = [w[clusters == c] for c in range(5)]
        assert all(len(set(d.tolist())) == 1 for d in draws) and sum(d[0] for d in draws) == 5
    # the same seed draws the same resamples
    first = [w.tolist() for w in resamples(clusters, 5, seed=7)]
    assert first == [w.tolist() for w in resamples(clusters, 5, seed=7)]


def test_a_patients_identical_samples_give_the_patient_levels_interval_not_a_narrow_one():
    """30 patients of 40 identical tiles each: resampled by patient, the tiles' accuracy interval is the
    patients' (the same draws); resampled as independent tiles it is about sqrt(40) times narrower."""
    rng = np.random.default_rng(0)
    right = rng.random(30) < 0.7
    y_pat = rng.integers(0, 2, 30)
    calls_pat = np.where(right, y_pat, 1 - y_pat)
    p_pat = np.eye(2)[calls_pat] * 0.8 + 0.1
    y, p = np.repeat(y_pat, 40), np.repeat(p_pat, 40, axis=0)
    names = ["CE", "LAA"]

    def acc(y, p):
        return class_statistic(y, p, names, p.argmax(1))

    patients = np.repeat(np.arange(30), 40)
    tiles = bootstrap(acc(y, p), clusters_of(patients.tolist()), lambda m: m == "accuracy", 500, 0.95, seed=3)
    whole = bootstrap(acc(y_pat, p_pat), clusters_of(list(range(30))), lambda m: m == "accuracy", 500, 0.95, seed=3)
    assert (tiles[0].low, tiles[0].high) == pytest.approx((whole[0].low, whole[0].high))
    naive = bootstrap(acc(y, p), clusters_of([None] * len(y)), lambda m: m == "accuracy", 500, 0.95, seed=3)
    assert (naive[0].high - naive[0].low) < (whole[0].high - whole[0].low) / 3
    # and the patients' interval is near the binomial one: 1.96 sd of 30 draws
    sd = math.sqrt(whole[0].value * (1 - whole[0].value) / 30)
    assert whole[0].high - whole[0].low == pytest.approx(2 * 1.96 * sd, rel=0.25)
    assert whole[0].low <= whole[0].value <= whole[0].high


def test_a_metric_defined_in_too_few_resamples_gets_no_interval():
    """A class of one patient of 20 is absent from about e^-1 of the resamples, where its AUC and sensitivity are
    undefined: no interval. Of three patients, absent from about e^-3 (5 %): an interval."""
    p = np.stack([1 - np.linspace(0.1, 0.9, 20), np.linspace(0.1, 0.9, 20)], 1)[::-1]

    def found(positives: int):
        y = np.array([1] * positives + [0] * (20 - positives))
        stat = class_statistic(y, p, ["no", "yes"], p.argmax(1))
        return {iv.metric: iv for iv in bootstrap(stat, clusters_of(list(range(20))), with_interval, 400)}

    one = found(1)
    assert 0.55 * 400 < one["auc"].defined < 0.72 * 400 and one["auc"].value == 1.0
    assert math.isnan(one["auc"].low) and math.isnan(one["recall_yes"].high)
    assert one["accuracy"].defined == 400 and one["accuracy"].low <= one["accuracy"].value <= one["accuracy"].high
    three = found(3)
    assert three["auc"].defined > 0.9 * 400 and three["auc"].low <= three["auc"].value <= three["auc"].high


@pytest.fixture
def recipe():
    tree = {"name": "t", "data": {"dataset": "/tmp/x"}, "model": {"name": "resnet18"}, "eval": {"bootstrap": 300}}
    return TrainRecipe.model_validate(tree)


def _pred(rng, n_patients: int = 12, slides: int = 2, tiles: int = 5):
    patients = [f"p{i}" for i in range(n_patients) for _ in range(slides * tiles)]
    metas = Metas.of(
        {"patient": pt, "slide": f"{pt}s{(j // tiles)}"}
        for pt in dict.fromkeys(patients)
        for j in range(slides * tiles)
    )
    y = np.array([int(pt[1:]) % 2 for pt in patients])
    p = _probs(rng, len(y), 2) * 0.5 + np.eye(2)[y] * 0.5
    return {"probs": p, "labels": y, "metas": metas, "loss": 0.3}


def test_intervals_at_each_level_resample_the_patients_and_bracket_the_logged_values(recipe):
    pred = _pred(np.random.default_rng(5))
    logged = evaluate(pred, recipe, ["CE", "LAA"], "test_")
    bounds, table = intervals(pred, recipe, ["CE", "LAA"], "test_")
    rows = list(csv.DictReader(table.splitlines()))
    assert {r["level"] for r in rows} == {"sample", "slide", "patient"}
    units = {"sample": "120", "slide": "24", "patient": "12"}
    for r in rows:
        assert (r["units"], r["clusters"], r["resampled"]) == (units[r["level"]], "12", "patients")
        assert (r["confidence"], r["resamples"]) == ("0.95", "300")
        pre = "test_" if r["level"] == "sample" else f"test_{r['level']}_"
        key = pre + r["metric"]
        assert float(r["value"]) == pytest.approx(logged[key], abs=1e-12)
        assert bounds[f"{key}_ci_low"] <= logged[key] <= bounds[f"{key}_ci_high"], key
    assert {"test_patient_auc_ci_low", "test_recall_LAA_ci_high", "test_slide_specificity_CE_ci_low"} <= set(bounds)
    # a proportion of patients (one unit a patient) gets Clopper-Pearson's interval; the rest, the bootstrap's
    methods = {(r["level"], r["metric"]): r["method"] for r in rows}
    assert methods["patient", "accuracy"] == methods["patient", "recall_LAA"] == "exact binomial"
    assert methods["patient", "auc"] == methods["sample", "accuracy"] == methods["slide", "recall_LAA"] == "bootstrap"
    right = round(logged["test_patient_accuracy"] * 12)
    exact = binomtest(right, 12).proportion_ci(confidence_level=0.95, method="exact")
    assert (bounds["test_patient_accuracy_ci_low"], bounds["test_patient_accuracy_ci_high"]) == pytest.approx(
        (exact.low, exact.high)
    )
    # the same seed, the same intervals; none asked, none drawn; nor for samples without labels
    assert intervals(pred, recipe, ["CE", "LAA"], "test_")[0] == bounds
    none = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"bootstrap": 0})})
    assert intervals(pred, none, ["CE", "LAA"], "test_") == ({}, "")
    assert intervals(pred | {"labels": None}, recipe, ["CE", "LAA"], "test_") == ({}, "")


def test_patients_all_called_right_get_an_interval_below_1(recipe):
    """10 patients, each called right: a bootstrap of them is [1, 1] whatever their number; Clopper-Pearson's
    interval is [0.69, 1], as a diagnostic accuracy study reports 10 of 10."""
    patients = [f"p{i}" for i in range(10)]
    y = np.array([i % 2 for i in range(10)])
    pred = {"probs": np.eye(2)[y] * 0.8 + 0.1, "labels": y, "metas": Metas.of({"patient": q} for q in patients)}
    per_patient = recipe.model_copy(update={"eval": recipe.eval.model_copy(update={"levels": ["patient"]})})
    bounds, _ = intervals(pred | {"loss": 0.1}, per_patient, ["CE", "LAA"], "test_")
    assert bounds["test_patient_accuracy_ci_low"] == pytest.approx(0.6915, abs=1e-4)
    assert bounds["test_patient_accuracy_ci_high"] == 1.0
    assert bounds["test_patient_recall_LAA_ci_low"] == pytest.approx(0.4782, abs=1e-4)  # 5 of 5


def test_the_summary_shows_each_headline_metric_with_its_interval():
    from training.eval_summary import summary
    from training.evaluation import EvalOutcome

    metrics = {"test_accuracy": 0.75, "test_accuracy_ci_low": 0.5, "test_accuracy_ci_high": 0.9, "test_auc": 0.8}
    metrics |= {"test_auc_ci_low": math.nan, "test_auc_ci_high": math.nan}
    how = "95% intervals of 1000 bootstrap resamples of patients"
    lines = summary(EvalOutcome("r", "test_", "s3://x", "test", metrics, [], None, how)).splitlines()
    assert lines[0].endswith(f"in the run; in brackets, {how} (test_intervals.csv):")
    assert lines[1] == "  sample: accuracy 0.7500 [0.5000, 0.9000], auc 0.8000"
