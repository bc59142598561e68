"""The operating point: a threshold chosen on validation, its held-out rates and their intervals."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from training.config import RecipeError, TrainRecipe, recipe_from_tree
from training.levels import operating_points, read_validation, thresholds
from training.metas import Metas
from training.operating import choose_threshold, parse_rule, rates_at
from training.predictions import prediction_table


def test_rules_choose_the_threshold_they_name():
    #          scores: 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 0.9 0.95
    positive = np.array([0, 0, 1, 0, 0, 1, 0, 1, 1, 1], bool)
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    # sensitivity 0.8 (4 of 5 positives) is first reached at 0.6, the highest such threshold
    assert choose_threshold(positive, scores, "sensitivity:0.8") == 0.6
    assert rates_at(positive, scores, 0.6)["sensitivity"] == 0.8
    assert choose_threshold(positive, scores, "sensitivity:1") == 0.3  # every positive called
    # specificity 0.8 (4 of 5 negatives not called, 0.7 the one left): the lowest such threshold is 0.6 (at 0.5, the
    # negatives 0.5 and 0.7 are called: 0.6)
    assert choose_threshold(positive, scores, "specificity:0.8") == 0.6
    assert rates_at(positive, scores, 0.5)["specificity"] == 0.6
    # specificity 1: above the highest negative, at the next score
    assert choose_threshold(positive, scores, "specificity:1.0") == 0.8
    # Youden's J, by brute force over every score
    j = [sum(rates_at(positive, scores, t)[k] for k in ("sensitivity", "specificity")) - 1 for t in scores]
    assert choose_threshold(positive, scores, "youden") == scores[int(np.argmax(j))]
    # a rule no score meets but by calling nothing: above the highest score
    assert choose_threshold(np.array([1, 0], bool), np.array([0.2, 0.9]), "specificity:1") > 0.9
    with pytest.raises(ValueError, match="positives are absent"):
        choose_threshold(np.zeros(4, bool), scores[:4], "youden")
    with pytest.raises(ValueError, match="youden, sensitivity:S"):
        parse_rule("sensitivity=0.9")


def test_rates_at_a_threshold_equal_scikit_learns():
    rng = np.random.default_rng(1)
    for _ in range(20):
        positive = rng.random(40) < 0.4
        scores = np.round(rng.random(40), 1)
        t = float(rng.choice(scores))
        called = scores >= t
        r = rates_at(positive, scores, t)
        assert r["sensitivity"] == pytest.approx(skm.recall_score(positive, called))
        assert r["specificity"] == pytest.approx(skm.recall_score(~positive, ~called))
        assert r["ppv"] == pytest.approx(skm.precision_score(positive, called, zero_division=np.nan), nan_ok=True)
        assert r["npv"] == pytest.approx(skm.precision_score(~positive, ~called, zero_division=np.nan), nan_ok=True)
    assert math.isnan(rates_at(np.zeros(3, bool), np.ones(3), 0.5)["sensitivity"])


def _recipe(**eval_):
    tree = {"name": "t", "data": {"dataset": "/tmp/x"}, "model": {"name": "resnet18"}, "eval": eval_}
    return TrainRecipe.model_validate(tree)


def test_a_recipe_names_its_positive_class_for_an_operating_point():
    with pytest.raises(RecipeError, match=r"eval\.operating_point: needs eval\.positive"):
        recipe_from_tree({"name": "t", "data": {"dataset": "/x"}, "model": {"name": "resnet18"},
                          "eval": {"operating_point": "youden"}}, "t")  # fmt: skip
    with pytest.raises(RecipeError, match=r"eval\.operating_point.*give youden, sensitivity:S or specificity:S"):
        recipe_from_tree({"name": "t", "data": {"dataset": "/x"}, "model": {"name": "resnet18"},
                          "eval": {"operating_point": "sensitivity:1.5", "positive": "a"}}, "t")  # fmt: skip
    assert _recipe(operating_point="sensitivity:0.9", positive="LAA").eval.positive == "LAA"


def _pred(rng, patients: int, tiles: int = 4):
    ids = [f"p{i}" for i in range(patients) for _ in range(tiles)]
    y = np.array([int(pt[1:]) % 2 for pt in ids])
    score = np.clip(0.5 * y + rng.normal(0.25, 0.2, len(y)), 0.001, 0.999)
    return {"probs": np.stack([1 - score, score], 1), "labels": y, "metas": Metas.of({"patient": p} for p in ids)}


def test_the_validation_threshold_is_applied_to_the_held_out_split_at_each_level():
    rng = np.random.default_rng(4)
    recipe = _recipe(operating_point="sensitivity:0.9", positive="LAA", levels=["patient"], bootstrap=200)
    outputs = ["CE", "LAA"]
    val, test = _pred(rng, 20), _pred(rng, 16)
    tables = {}
    for level, groups in (("sample", None), ("patient", [m["patient"] for m in val["metas"]])):
        if groups is None:
            ids, p, y = [str(i) for i in range(len(val["labels"]))], val["probs"], val["labels"]
        else:
            ids = sorted(set(groups))
            p = np.array([val["probs"][[g == i for g in groups]].mean(0) for i in ids])
            y = np.array([val["labels"][[g == i for g in groups]][0] for i in ids])
        tables[level] = prediction_table({level: ids}, p, y, outputs, False)
    chosen, notes = thresholds(recipe, outputs, read_validation(tables))
    out, table = operating_points(test, recipe, outputs, "test_", chosen)
    assert notes == []
    rows = list(csv.DictReader(table.splitlines()))
    # by hand: the highest threshold with 90 % of the validation's LAA samples called, from the table's values
    v = list(csv.DictReader(tables["sample"].splitlines()))
    laa = sorted((float(r["p_LAA"]) for r in v if r["label"] == "LAA"), reverse=True)
    cut = laa[math.ceil(0.9 * len(laa)) - 1]
    assert out["test_op_threshold_LAA"] == cut
    called = test["probs"][:, 1] >= cut
    assert out["test_op_sensitivity_LAA"] == pytest.approx(called[test["labels"] == 1].mean())
    assert out["test_op_specificity_LAA"] == pytest.approx(1 - called[test["labels"] == 0].mean())
    assert (
        out["test_op_sensitivity_LAA_ci_low"]
        <= out["test_op_sensitivity_LAA"]
        <= out["test_op_sensitivity_LAA_ci_high"]
    )
    sample_rows = {r["metric"]: r for r in rows if r["level"] == "sample"}
    assert float(sample_rows["sensitivity"]["validation"]) >= 0.9  # what the rule asked of validation
    # a patient's tiles resampled together; the patients' proportions, Clopper-Pearson's
    assert {r["method"] for r in rows if r["level"] == "sample"} == {"bootstrap"}
    assert {r["method"] for r in rows if r["level"] == "patient"} == {"exact binomial"}
    assert {"test_patient_op_threshold_LAA", "test_patient_op_npv_LAA_ci_high"} <= set(out)
    # a level validation has no table of: said, not guessed
    chosen2, notes2 = thresholds(recipe, outputs, read_validation({"sample": tables["sample"]}))
    out2, _ = operating_points(test, recipe, outputs, "test_", chosen2)
    assert "test_patient_op_threshold_LAA" not in out2 and notes2 == [
        "patient: none (the run logged no validation predictions at this level)"
    ]
    # none asked: nothing
    assert thresholds(_recipe(), outputs, read_validation(tables)) == ({}, [])
    assert operating_points(test, _recipe(), outputs, "test_", {}) == ({}, "")


def test_each_label_of_a_multilabel_task_gets_its_own_threshold():
    rng = np.random.default_rng(2)
    names = ["any", "epidural"]
    recipe = TrainRecipe.model_validate(
        {"name": "t", "task": "multilabel", "data": {"dataset": "/x"}, "model": {"name": "resnet18"},
         "eval": {"operating_point": "youden", "levels": [], "bootstrap": 0}}
    )  # fmt: skip
    y_val = (rng.random((40, 2)) < np.array([0.5, 0.2])).astype(np.int64)
    p = np.clip(np.array([0.4, 0.1]) * y_val + rng.random((40, 2)) * 0.6, 0, 1)
    val = prediction_table({"image": [str(i) for i in range(40)]}, p, y_val, names, True)
    y = y_val.copy()
    y[:, 1] = 0  # no epidural positives held out: its sensitivity undefined
    test = {"probs": p, "labels": y, "metas": Metas.of({"patient": str(i)} for i in range(40))}
    chosen, notes = thresholds(recipe, names, read_validation({"sample": val}))
    out, table = operating_points(test, recipe, names, "test_", chosen)
    stored = np.array([[float(f"{v:.6g}") for v in row] for row in p])  # as the table holds them
    cuts = [choose_threshold(y_val[:, j] == 1, stored[:, j], "youden") for j in range(2)]
    assert [out["test_op_threshold_any"], out["test_op_threshold_epidural"]] == cuts and cuts[0] != cuts[1]
    assert out["test_op_sensitivity_any"] == pytest.approx((p[y[:, 0] == 1, 0] >= cuts[0]).mean())
    assert math.isnan(out["test_op_sensitivity_epidural"]) and notes == []
    assert not any(k.endswith("_ci_low") for k in out)  # eval.bootstrap 0: the values alone
    assert {r["output"] for r in csv.DictReader(table.splitlines())} == set(names)


def test_the_positive_class_must_be_one_of_a_binary_datasets_two(tmp_path):
    from tests.datasets import make_dataset
    from training.config import load_recipe
    from training.preflight import check_against

    manifest = make_dataset(str(tmp_path / "d"), {"train": 4, "val": 4})
    point = ["eval.operating_point=sensitivity:0.9", f"data.dataset={tmp_path / 'd'}"]
    check_against(load_recipe("demo_tiles", [*point, "eval.positive=class1"]), manifest)
    with pytest.raises(RecipeError, match=r"eval\.positive: 'LAA' is not one of the two classes of .* class0, class1"):
        check_against(load_recipe("demo_tiles", [*point, "eval.positive=LAA"]), manifest)
    # evaluated on another cohort (not trained on it), its classes are the model's, checked there
    check_against(load_recipe("demo_tiles", [*point, "eval.positive=LAA"]), manifest, trains=False)


def test_the_summary_gives_each_outputs_operating_point_under_its_level():
    from training.eval_summary import summary
    from training.evaluation import EvalOutcome

    metrics = {"test_accuracy": 0.75, "test_patient_accuracy": 0.8, "test_patient_op_threshold_LAA": 0.4312}
    metrics |= {"test_patient_op_sensitivity_LAA": 0.9, "test_patient_op_sensitivity_LAA_ci_low": 0.7}
    metrics |= {"test_patient_op_sensitivity_LAA_ci_high": 1.0, "test_patient_op_specificity_LAA": 0.5}
    outcome = EvalOutcome("r", "test_", "s3://x", "test", metrics, ["patient"], None, None, "sensitivity:0.9")
    assert summary(outcome).splitlines()[1:] == [
        "  sample: accuracy 0.7500",
        "  patient: accuracy 0.8000",
        "    LAA called at p >= 0.4312 (sensitivity:0.9 on validation): sensitivity 0.9000 [0.7000, 1.0000], "
        "specificity 0.5000",
    ]


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_a_study_may_compare_the_held_out_intervals_and_operating_points_it_logs(task):
    """What `compare.metrics` is checked against (training.preflight.held_out_reports) is what the held-out
    evaluation logs, name for name."""
    from training.levels import by_level, intervals
    from training.preflight import held_out_reports, validation_metrics

    names = ["any", "epidural"] if task == "multilabel" else ["class0", "class1"]
    point = {"operating_point": "youden"} | ({"positive": "class1"} if task == "multiclass" else {})
    recipe = TrainRecipe.model_validate(
        {"name": "t", "task": task, "data": {"dataset": "/x"}, "model": {"name": "resnet18"},
         "eval": point | {"levels": ["slide", "patient"], "how": "max", "bootstrap": 50}}
    )  # fmt: skip
    rng = np.random.default_rng(0)
    patients = [f"p{i // 4}" for i in range(40)]
    y = np.array([[int(p[1:]) % 2, int(p[1:]) % 3 == 0] for p in patients]).astype(np.int64)
    y = y if task == "multilabel" else y[:, 0]
    p = rng.random((40, 2))
    p = p if task == "multilabel" else p / p.sum(1, keepdims=True)
    pred = {"probs": p, "labels": y, "metas": Metas.of({"patient": q, "slide": q + "s"} for q in patients)}
    multilabel = task == "multilabel"
    tables = {"sample": prediction_table({"x": list(range(40))}, p, y, names, multilabel)}
    tables |= {lv: prediction_table({lv: i}, gp, gy, names, multilabel) for lv, i, gp, gy in by_level(pred, recipe)}
    chosen = thresholds(recipe, names, read_validation(tables))[0]
    made = set(intervals(pred, recipe, names, "")[0]) | set(operating_points(pred, recipe, names, "", chosen)[0])
    assert made == held_out_reports(recipe, names, validation_metrics(recipe, names))


def test_the_prediction_tables_add_the_calls_at_the_operating_point():
    probs = np.array([[0.7, 0.3], [0.45, 0.55], [0.2, 0.8]])
    table = prediction_table(
        {"patient": ["a", "b", "c"]}, probs, np.array([0, 1, 1]), ["CE", "LAA"], False, None, {1: 0.5}
    )
    assert table.splitlines() == [
        "patient,label,predicted,op_predicted,p_CE,p_LAA",
        "a,CE,CE,CE,0.7,0.3",
        "b,LAA,LAA,LAA,0.45,0.55",
        "c,LAA,LAA,LAA,0.2,0.8",
    ]
    # a threshold of 0.6 for LAA: b, called LAA by the argmax, is CE at the operating point
    low = prediction_table({"patient": ["a", "b"]}, probs[:2], None, ["CE", "LAA"], False, None, {1: 0.6})
    assert [r["op_predicted"] for r in csv.DictReader(low.splitlines())] == ["CE", "CE"]
    # CE as the positive class at 0.4: a (0.7) and b (0.45) are CE
    ce = prediction_table({"patient": ["a", "b", "c"]}, probs, None, ["CE", "LAA"], False, None, {0: 0.4})
    assert [r["op_predicted"] for r in csv.DictReader(ce.splitlines())] == ["CE", "CE", "LAA"]
    multi = prediction_table(
        {"image": ["x"]}, np.array([[0.3, 0.2]]), None, ["any", "sub dural"], True, 0.5, {0: 0.25, 1: 0.25}
    )
    assert multi.splitlines() == [
        "image,predicted_any,predicted_sub_dural,op_predicted_any,op_predicted_sub_dural,p_any,p_sub_dural",
        "x,0,0,1,0,0.3,0.2",
    ]


def test_an_evaluation_without_intervals_or_operating_point_shows_none_of_an_earlier_ones(mlflow_uri):
    """Metrics stay in an MLflow run: `tessera evaluate RUN eval.bootstrap=0` after an evaluation with intervals
    must not show the earlier intervals (nor an earlier operating point) as its own."""
    from mlflow import MlflowClient

    from training.eval_summary import summary
    from training.evaluation import _outcome

    client = MlflowClient(mlflow_uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    earlier = {"test_accuracy": 0.75, "test_accuracy_ci_low": 0.5, "test_accuracy_ci_high": 0.9}
    earlier |= {"test_patient_accuracy": 0.8, "test_patient_op_threshold_LAA": 0.4, "test_op_sensitivity_LAA": 0.9}
    for key, value in earlier.items():
        client.log_metric(run_id, key, value, step=0)
    point = {"operating_point": "youden", "positive": "LAA", "levels": ["patient"]}
    both = _outcome(client, run_id, _recipe(**point), "test", "test_", "sha")
    assert both.intervals.startswith("95% intervals of 1000") and both.operating_point == "youden"
    assert "accuracy 0.7500 [0.5000, 0.9000]" in summary(both)
    neither = _outcome(client, run_id, _recipe(bootstrap=0, levels=["patient"]), "test", "test_", "sha")
    assert set(neither.metrics) == {"test_accuracy", "test_patient_accuracy"}
    assert (neither.intervals, neither.operating_point) == (None, None)
    assert "[" not in summary(neither) and "called at" not in summary(neither)
