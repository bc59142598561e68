"""Two runs compared on the same held-out patients (tune.paired): the paired bootstrap and McNemar's test."""

from __future__ import annotations

import numpy as np
import pytest

from training.predictions import prediction_table, read_table
from tune.paired import RESAMPLES, compare_paired, markdown

CLASSES = ["CE", "LAA"]


def _table(patients, labels, probs, order=None) -> str:
    order = list(range(len(labels))) if order is None else order
    columns = {"patient": [patients[i] for i in order], "slide": [f"{patients[i]}s{i}" for i in order]}
    return prediction_table(columns, probs[order], labels[order], CLASSES, False)


def _cohort(rng, patients: int = 40, tiles: int = 3):
    ids = [f"p{i}" for i in range(patients) for _ in range(tiles)]
    y = np.array([i % 2 for i in range(patients) for _ in range(tiles)])
    return ids, y


def _probs(y, rng, skill: float) -> np.ndarray:
    """P(LAA): the label with weight ``skill``, noise otherwise."""
    p1 = np.clip(skill * y + (1 - skill) * rng.random(len(y)), 0.001, 0.999)
    return np.stack([1 - p1, p1], 1)


def test_a_model_compared_with_itself_differs_by_nothing():
    rng = np.random.default_rng(0)
    ids, y = _cohort(rng)
    p = _probs(y, rng, 0.3)
    a = read_table(_table(ids, y, p), "a")
    b = read_table(_table(ids, y, p, order=list(reversed(range(len(y))))), "b")  # rows in another order
    for r in compare_paired(a, b, ["accuracy", "auc", "brier_loss", "recall_LAA"]):
        assert (r.diff, r.low, r.high, r.p) == (0.0, 0.0, 0.0, 1.0) and r.a == r.b
        assert r.verdict == "no difference shown at alpha 0.05 (p = 1)"
    assert compare_paired(a, b, ["accuracy"])[0].mcnemar_p == 1.0


def test_a_better_model_is_named_and_a_loss_counts_lower_as_better():
    rng = np.random.default_rng(1)
    ids, y = _cohort(rng)
    a = read_table(_table(ids, y, _probs(y, rng, 0.05)), "a")  # near chance
    b = read_table(_table(ids, y, _probs(y, rng, 0.8)), "b")  # near perfect
    found = {r.metric: r for r in compare_paired(a, b, ["accuracy", "auc", "brier_loss"], names=("resnet", "convnext"))}
    assert found["auc"].diff > 0.3 and found["auc"].low > 0 and found["auc"].p < 0.01
    assert found["auc"].verdict.startswith("convnext better (p = ")
    assert found["brier_loss"].diff < 0 and found["brier_loss"].verdict.startswith("convnext better")
    assert found["accuracy"].mcnemar_p < 0.01 and found["accuracy"].defined == RESAMPLES
    # and the other way round, the same with the sign turned
    back = {r.metric: r for r in compare_paired(b, a, ["auc"], names=("convnext", "resnet"))}
    assert back["auc"].diff == pytest.approx(-found["auc"].diff) and back["auc"].verdict.startswith("convnext better")
    report = markdown(list(found.values()), ("resnet", "convnext"), "patient", "test", 40, 0.05)
    assert "| auc |" in report and "(McNemar " in report


def test_a_patients_tiles_count_once():
    """40 patients of 10 identical tiles each: the tile-level paired test is the patient-level one (same draws),
    not ten times as sure. McNemar's test, which takes tiles as independent, is not."""
    rng = np.random.default_rng(2)
    ids, y = _cohort(rng, 40, 1)
    pa, pb = _probs(y, rng, 0.1), _probs(y, rng, 0.25)
    one = compare_paired(read_table(_table(ids, y, pa), "a"), read_table(_table(ids, y, pb), "b"), ["auc", "accuracy"])
    many = [i for i in ids for _ in range(10)]
    rep = np.repeat(np.arange(40), 10)
    tiles = compare_paired(
        read_table(_table(many, y[rep], pa[rep]), "a"),
        read_table(_table(many, y[rep], pb[rep]), "b"),
        ["auc", "accuracy"],
    )
    for o, t in zip(one, tiles, strict=True):
        assert (t.diff, t.low, t.high, t.p) == pytest.approx((o.diff, o.low, o.high, o.p))
    # McNemar's test, which takes the tiles as independent, grows surer with each copy: why the verdict is the
    # bootstrap's, McNemar's only beside it (valid at the patient level)
    assert one[1].mcnemar_p < 1 and tiles[1].mcnemar_p < one[1].mcnemar_p


def test_tables_of_other_units_labels_or_classes_are_refused():
    rng = np.random.default_rng(3)
    ids, y = _cohort(rng, 6, 2)
    p = _probs(y, rng, 0.5)
    a = read_table(_table(ids, y, p), "a")
    with pytest.raises(ValueError, match=r"evaluated on other units \(2 of A's not in B's, 0 the other way\)"):
        compare_paired(a, read_table(_table(ids, y, p, order=list(range(10))), "b"), ["auc"])
    flipped = y.copy()
    flipped[0] = 1 - flipped[0]
    with pytest.raises(ValueError, match="label the same units otherwise"):
        compare_paired(a, read_table(_table(ids, flipped, p), "b"), ["auc"])
    with pytest.raises(ValueError, match=r"metric\(s\) \['val_auc'\]: a paired comparison takes accuracy, auc"):
        compare_paired(a, a, ["val_auc"])
    twice = read_table(prediction_table({"patient": ids}, p, y, CLASSES, False), "b")  # 2 rows a patient
    with pytest.raises(ValueError, match="B's table names 6 of its rows as another"):
        compare_paired(a, twice, ["auc"])
    unlabelled = prediction_table({"patient": ids}, p, None, CLASSES, False)
    with pytest.raises(ValueError, match="run x's table: a paired comparison needs a table with labels"):
        read_table(unlabelled, "run x's table")


def test_multilabel_models_compare_label_by_label_each_with_its_own_calls():
    """RSNA's six labels: a model whose scores follow the labels against one of noise, on the same slices."""
    rng = np.random.default_rng(4)
    names = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]
    ids = [f"p{i // 4}" for i in range(160)]  # 40 patients of 4 slices
    y = (rng.random((160, 6)) < 0.3).astype(np.int64)
    good, noise = np.clip(0.6 * y + 0.4 * rng.random((160, 6)), 0, 1), rng.random((160, 6))
    columns = {"patient": ids, "image": [str(i) for i in range(160)]}
    a = read_table(prediction_table(columns, noise, y, names, True), "a")
    b = read_table(prediction_table(columns, good, y, names, True, 0.3), "b")  # its calls at 0.3
    assert a.multilabel and a.labels[0] == tuple(y[0]) and b.calls[0] == tuple(int(v >= 0.3) for v in good[0])
    found = {r.metric: r for r in compare_paired(a, b, ["rsna_log_loss", "auc_any", "recall_epidural", "accuracy"])}
    assert found["auc_any"].diff > 0.3 and found["auc_any"].verdict.startswith("B better")
    assert found["rsna_log_loss"].diff < 0 and found["rsna_log_loss"].verdict.startswith("B better")
    # B's sensitivity from its own calls (0.3): every epidural slice scores at least 0.6
    assert found["recall_epidural"].b == 1.0
    assert found["accuracy"].mcnemar_p is None  # McNemar's test is of one call a unit
    with pytest.raises(ValueError, match="have other classes"):
        compare_paired(a, read_table(_table(ids[:12], np.zeros(12, int), np.full((12, 2), 0.5)), "c"), ["auc"])


def test_classes_whose_names_are_not_metric_names_pair():
    """A class named with a space ("no hemorrhage"): its probability column is p_no_hemorrhage, its label the name."""
    rng = np.random.default_rng(5)
    ids, y = _cohort(rng, 20, 1)
    names = ["no hemorrhage", "hemorrhage"]
    table = read_table(prediction_table({"patient": ids}, _probs(y, rng, 0.5), y, names, False), "a")
    assert table.outputs == ["no_hemorrhage", "hemorrhage"] and table.labels[0] == "no hemorrhage"
    found = compare_paired(table, table, ["accuracy", "recall_no_hemorrhage"])
    assert [(r.metric, r.diff) for r in found] == [("accuracy", 0.0), ("recall_no_hemorrhage", 0.0)]
    assert found[0].a == pytest.approx(
        np.mean([c == label for c, label in zip(table.calls, table.labels, strict=True)])
    )
