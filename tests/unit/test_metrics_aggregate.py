import math

import numpy as np
import pytest

from training.aggregate import aggregate, any_positive, mixed_groups
from training.metrics import classification_metrics, confusion, multilabel_metrics, rsna_log_loss, weighted_log_loss


def _direct_strip_loss(y, p):
    """The competition's formula written out term by term."""
    p = [[min(max(v, 1e-15), 1 - 1e-15) for v in row] for row in p]
    p = [[v / sum(row) for v in row] for row in p]
    terms = []
    for c in range(len(p[0])):
        members = [i for i, t in enumerate(y) if t == c]
        terms.append(-sum(math.log(p[i][c]) for i in members) / len(members))
    return sum(terms) / len(terms)


def test_weighted_log_loss_equals_the_formula():
    y = np.array([0, 0, 0, 1])
    p = np.array([[0.9, 0.1], [0.6, 0.4], [1.0, 0.0], [0.3, 0.7]])
    assert weighted_log_loss(y, p) == pytest.approx(_direct_strip_loss(y.tolist(), p.tolist()), abs=1e-12)
    # class-balanced: one rare-class sample weighs as much as all common-class samples together
    expected = 0.5 * (-(math.log(0.9) + math.log(0.6) + math.log(1 - 1e-15)) / 3) + 0.5 * -math.log(0.7)
    assert weighted_log_loss(y, p) == pytest.approx(expected, abs=1e-12)


def test_classification_metrics_by_hand():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.2], [0.4, 0.6], [0.3, 0.7], [0.1, 0.9]])
    m = classification_metrics(y, p, prefix="val_")
    assert m["val_accuracy"] == pytest.approx(0.75)
    # class 0: precision 1/1, recall 1/2; class 1: precision 2/3, recall 1
    assert m["val_precision"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["val_recall"] == pytest.approx((0.5 + 1) / 2)
    assert m["val_auc"] == pytest.approx(1.0)
    assert confusion(y, p).tolist() == [[1, 1], [0, 2]]
    # class 0's specificity: of class 1's two samples none called 0; class 1's: one of class 0's two called 1
    assert (m["val_specificity_0"], m["val_specificity_1"]) == (1.0, 0.5)
    # Brier: the positive class's squared distance from 0/1, averaged: 0.2², 0.6², 0.3², 0.1²
    assert m["val_brier_loss"] == pytest.approx((0.04 + 0.36 + 0.09 + 0.01) / 4)
    three = classification_metrics(np.array([2]), np.array([[0.2, 0.3, 0.5]]))  # of more classes: the sum
    assert three["brier_loss"] == pytest.approx(0.2**2 + 0.3**2 + 0.5**2)


def test_auc_is_nan_when_a_class_is_missing():
    m = classification_metrics(np.array([0, 0]), np.array([[0.9, 0.1], [0.8, 0.2]]))
    assert math.isnan(m["auc"]) and m["accuracy"] == 1.0


def test_aggregate_to_slides():
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    ids, gp, gy = aggregate(probs, np.array([0, 0, 1, 1]), ["s1", "s1", "s2", "s2"])
    assert ids == ["s1", "s2"] and gy.tolist() == [0, 1]
    np.testing.assert_allclose(gp, [[0.8, 0.2], [0.3, 0.7]])
    _, gmax, _ = aggregate(probs, np.array([0, 0, 1, 1]), ["s1", "s1", "s2", "s2"], "max")
    assert gmax[0].tolist() == pytest.approx([0.9 / 1.2, 0.3 / 1.2])
    with pytest.raises(ValueError, match="mixes labels"):
        aggregate(probs, np.array([0, 1, 1, 1]), ["s1", "s1", "s2", "s2"])


def test_any_positive():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2]])
    assert any_positive(probs, ["a", "a", "b"]) == {"a": True, "b": False}


def _direct_rsna_loss(y, p, w=(2, 1, 1, 1, 1, 1)):
    """RSNA 2019's formula term by term: per sample, weighted mean of the labels' binary log losses."""
    total = 0.0
    for yi, pi in zip(y, p, strict=True):
        terms = [
            -wj * (t * math.log(min(max(q, 1e-15), 1 - 1e-15)) + (1 - t) * math.log(1 - min(max(q, 1e-15), 1 - 1e-15)))
            for t, q, wj in zip(yi, pi, w, strict=True)
        ]
        total += sum(terms) / sum(w)
    return total / len(y)


def test_rsna_log_loss_equals_the_formula():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, (7, 6))
    p = rng.random((7, 6))
    p[0, 0] = 1.0  # clipped, not infinite
    assert rsna_log_loss(y, p) == pytest.approx(_direct_rsna_loss(y.tolist(), p.tolist()), abs=1e-12)


def test_per_class_metrics_and_threshold():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.2], [0.6, 0.4], [0.7, 0.3], [0.1, 0.9]])
    m = classification_metrics(y, p, classes=["CE", "LAA"])
    assert m["recall_CE"] == 1.0 and m["recall_LAA"] == 0.5 and m["precision_LAA"] == 1.0
    assert m["precision_CE"] == pytest.approx(2 / 3)
    low = classification_metrics(y, p, classes=["CE", "LAA"], threshold=0.25)  # 0.4 and 0.3 become positive
    assert low["recall_LAA"] == 1.0 and low["recall_CE"] == 0.5


def test_multilabel_metrics_by_hand():
    y = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    p = np.array([[0.9, 0.2], [0.2, 0.1], [0.7, 0.8], [0.8, 0.3]])
    m = multilabel_metrics(y, p, ["any", "epidural"], prefix="val_")
    assert m["val_accuracy_any"] == 0.75 and m["val_auc_any"] == 0.75  # one negative (0.8) outranks one positive (0.7)
    assert m["val_f1_epidural"] == pytest.approx(2 / 3)  # tp 1, fn 1, fp 0
    assert m["val_auc"] == pytest.approx((0.75 + 1.0) / 2)


def test_any_positive_and_multilabel_aggregation():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2], [0.95, 0.05]])
    ids, gp, gy = aggregate(probs, np.array([1, 1, 0, 0]), ["a", "a", "b", "b"], "any")
    assert ids == ["a", "b"] and gp[:, 1].tolist() == [0.7, 0.2] and gy.tolist() == [1, 0]
    assert (gp[:, 1] >= 0.5).tolist() == [True, False]
    ml = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 0]])
    _, gp, gy = aggregate(np.array([[0.2, 0.9, 0.1], [0.6, 0.1, 0.3], [0.1, 0.1, 0.1]]), ml, ["s", "s", "t"], "max")
    assert gy.tolist() == [[1, 1, 1], [0, 0, 0]] and gp[0].tolist() == [0.6, 0.9, 0.3]


def test_prediction_tables_name_each_row_and_its_call():
    from training.predictions import prediction_table, sample_columns

    metas = [
        {"patient": "p1", "slide": "s1", "x": 0, "y": 600, "tissue": 0.9},
        {"patient": "p2", "slide": "s2", "x": 600, "y": 0},
    ]
    columns = sample_columns(metas)
    assert columns == {"patient": ["p1", "p2"], "slide": ["s1", "s2"], "x": [0, 600], "y": [600, 0]}
    assert sample_columns([{"series": "a", "slices": [3, 4, 5]}]) == {"series": ["a"], "slices": ["3 4 5"]}
    probs = np.array([[0.7, 0.3], [0.45, 0.55]])
    assert prediction_table(columns, probs, np.array([0, 0]), ["CE", "LAA"], False) == (
        "patient,slide,x,y,label,predicted,p_CE,p_LAA\np1,s1,0,600,CE,CE,0.7,0.3\np2,s2,600,0,CE,LAA,0.45,0.55\n"
    )
    # a binary threshold makes the call, as in the confusion matrix
    assert prediction_table({"patient": ["p1", "p2"]}, probs, np.array([0, 1]), ["neg", "pos"], False, 0.25) == (
        "patient,label,predicted,p_neg,p_pos\np1,neg,pos,0.7,0.3\np2,pos,pos,0.45,0.55\n"
    )
    multi = prediction_table({"series": ["a"]}, np.array([[0.9, 0.2]]), np.array([[1, 0]]), ["any", "sub dural"], True)
    assert (
        multi == "series,label_any,label_sub_dural,predicted_any,predicted_sub_dural,p_any,p_sub_dural\n"
        "a,1,0,1,0,0.9,0.2\n"
    )


def test_a_group_of_mixed_labels_is_positive_under_any_and_undefined_otherwise():
    probs = np.array([[0.9, 0.1], [0.3, 0.7], [0.8, 0.2]])
    ids, gp, gy = aggregate(probs, np.array([0, 1, 0]), ["s", "s", "t"], "any")  # one bleeding slice of s
    assert ids == ["s", "t"] and gy.tolist() == [1, 0] and gp[:, 1].tolist() == [0.7, 0.2]
    for how in ("mean", "max"):
        with pytest.raises(ValueError, match=rf"group 's' mixes labels \[0, 1\]: aggregating by '{how}' needs one"):
            aggregate(probs, np.array([0, 1, 0]), ["s", "s", "t"], how)
    assert mixed_groups([("a", 0), ("b", 1), ("a", 2), ("b", 1), ("a", 0)]) == {"a": [0, 2]}


def test_tables_of_samples_without_labels_give_calls_and_probabilities_only():
    from training.aggregate import aggregate_probs
    from training.predictions import prediction_table

    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    ids, gp = aggregate_probs(probs, ["s1", "s1", "s2", "s2"])
    assert ids == ["s1", "s2"]
    np.testing.assert_allclose(gp, aggregate(probs, np.array([0, 0, 1, 1]), ["s1", "s1", "s2", "s2"])[1])
    assert prediction_table({"slide": ids}, gp, None, ["CE", "LAA"], False) == (
        "slide,predicted,p_CE,p_LAA\ns1,CE,0.8,0.2\ns2,LAA,0.3,0.7\n"
    )
    multi = prediction_table({"series": ["a"]}, np.array([[0.9, 0.2]]), None, ["any", "epidural"], True, 0.5)
    assert multi == "series,predicted_any,predicted_epidural,p_any,p_epidural\na,1,0,0.9,0.2\n"


def test_reveal_names_each_pseudonym_by_what_the_private_map_says():
    from training.predictions import original_name, reveal

    private = {
        "aa": "patient 006388",
        "bb": "/data/strip/006388_0.tif",
        "cc": "series 1.2.3 in /data/ct/ID_9",
        "dd": "study 4.5",
        "ee": "instance ID_000012eaf",
    }
    names = ["006388", "/data/strip/006388_0.tif", "1.2.3", "4.5", "ID_000012eaf"]
    assert [original_name(v) for v in private.values()] == names
    table = "patient,slide,x,y,predicted,p_CE\naa,bb,0,600,CE,0.9\naa,zz,600,0,CE,0.8\n"
    shown, unknown = reveal(table, private)
    assert shown == (
        "patient,slide,x,y,predicted,p_CE\n006388,/data/strip/006388_0.tif,0,600,CE,0.9\n006388,zz,600,0,CE,0.8\n"
    )
    assert unknown == 1  # zz: not in the map, left as it is; coordinates and calls are never looked up
    assert reveal("series,predicted\ncc,1\n", private) == ("series,predicted\n1.2.3,1\n", 0)


def test_reveal_keeps_a_large_table_row_for_row():
    """Blocks of rows written as they are named: across block edges, with quoted names and a last line without
    its end, the table is the one a whole-table rewrite gives."""
    from training.predictions import reveal

    private = {"aa": "patient 00,1", "bb": '/data/a "b"/c,d.svs'}
    rows = [f"aa,{'bb' if i % 3 else 'zz'},{i}" for i in range(10_000)]
    shown, unknown = reveal("patient,slide,x\n" + "\n".join(rows), private)
    lines = shown.splitlines()
    assert len(lines) == 10_001 and unknown == 1  # zz
    assert lines[1] == '"00,1",zz,0' and lines[2] == '"00,1","/data/a ""b""/c,d.svs",1'
    assert lines[-2:] == ['"00,1","/data/a ""b""/c,d.svs",9998', '"00,1",zz,9999'] and shown.endswith("\n")


def test_a_tables_rows_are_counted_below_its_header_a_quoted_line_break_within_its_row():
    from training.predictions import row_count

    assert row_count('patient,slide\n"a\nb",s1\nc,s2') == 2  # the last line without its end
    assert row_count("patient,slide\n") == 0 and row_count("") == 0


def test_a_submission_lists_each_patients_probabilities_by_class():
    """STRIP AI's layout: patient_id, then a column per class named by it; the patients in ID order."""
    from training.submissions import strip_ai

    table = "patient,label,predicted,p_CE,p_LAA\n006388,CE,CE,0.7,0.3\n00c058,LAA,LAA,0.2,0.8\n0068d4,CE,LAA,0.4,0.6\n"
    assert strip_ai(table) == "patient_id,CE,LAA\n006388,0.7,0.3\n0068d4,0.4,0.6\n00c058,0.2,0.8\n"
    with pytest.raises(ValueError, match="a submission lists patients: this table has no patient column"):
        strip_ai("slide,predicted,p_CE,p_LAA\ns,CE,0.9,0.1\n")


RSNA_HEADER = "series,slices,image,predicted_any,p_any,p_epidural,p_intraparenchymal,p_intraventricular"


def test_an_rsna_submission_scores_each_image_once_per_label():
    """RSNA 2019's layout: ``ID,Label``, a row per image and label named ``ID_<image>_<label>``, in ID order, the
    table's probabilities as they are."""
    from training.submissions import rsna

    header = RSNA_HEADER + ",p_subarachnoid,p_subdural"
    table = f"{header}\ns1,3,ID_b2,1,0.9,0.1,0.2,0.3,0.4,0.5\ns1,4,ID_a1,0,0.01,0.02,0.03,0.04,0.05,0.06\n"
    expected = [
        "ID,Label", "ID_a1_any,0.01", "ID_a1_epidural,0.02", "ID_a1_intraparenchymal,0.03",
        "ID_a1_intraventricular,0.04", "ID_a1_subarachnoid,0.05", "ID_a1_subdural,0.06", "ID_b2_any,0.9",
        "ID_b2_epidural,0.1", "ID_b2_intraparenchymal,0.2", "ID_b2_intraventricular,0.3", "ID_b2_subarachnoid,0.4",
        "ID_b2_subdural,0.5",
    ]  # fmt: skip
    assert rsna(table) == "\n".join(expected) + "\n"
    twice = table + "s1,5,ID_a1,0,0.01,0.02,0.03,0.04,0.05,0.06\n"
    with pytest.raises(ValueError, match="image ID_a1 has two samples in the table"):
        rsna(twice)
    with pytest.raises(ValueError, match=r"the table lacks \['subarachnoid', 'subdural'\]"):
        rsna(f"{RSNA_HEADER}\ns1,3,ID_b2,1,0.9,0.1,0.2,0.3\n")
    with pytest.raises(ValueError, match=r"these samples name none .* --mode slice"):
        rsna(header.replace("image,", "") + "\ns1,3,1,0.9,0.1,0.2,0.3,0.4,0.5\n")


def test_a_run_is_submitted_in_its_competitions_layout():
    from training.config import load_recipe
    from training.submissions import RSNA, RSNA_LABELS, STRIP_AI, layout_for

    strip = load_recipe("strip_ai_resnet50")
    assert layout_for(strip, ["CE", "LAA"]) is STRIP_AI
    subtypes = load_recipe("rsna_ich_subtypes")
    assert layout_for(subtypes, ["any", *RSNA_LABELS[:5]]) is RSNA
    with pytest.raises(ValueError, match=r"this multilabel one's: \['series'\]\), .* outputs: any, epidural\)"):
        layout_for(subtypes, ["any", "epidural"])
    binary = load_recipe("rsna_ich_binary")  # its patient table is not what RSNA scores
    with pytest.raises(ValueError, match="calls each sample no hemorrhage or hemorrhage on a dataset of RSNA's"):
        layout_for(binary, ["no hemorrhage", "hemorrhage"], ["any", *RSNA_LABELS[:5]])
    series = load_recipe("demo_tiles", ["eval.levels=[series]"])  # a call per series: neither's rows
    with pytest.raises(ValueError, match="no submission layout fits this run"):
        layout_for(series, ["CE", "LAA"])


def test_what_a_prediction_reads_of_a_dataset(tmp_path):
    from tests.datasets import make_dataset
    from training.inference import default_split, labels_for, prediction_name

    unlabelled = make_dataset(str(tmp_path / "u"), {"test": 4}, labelled=False)
    labelled = make_dataset(str(tmp_path / "l"), {"train": 4, "test": 4})
    rsna = make_dataset(str(tmp_path / "r"), {"test": 4}, multilabel=True)
    assert labels_for(["class0", "class1"], unlabelled, "multiclass") == (False, None)
    assert labels_for(["class0", "class1"], labelled, "multiclass") == (True, None)
    assert labels_for(["CE", "LAA"], labelled, "multiclass") == (
        False,
        "its labels (class0, class1) are not the model's classes; the tables leave them out",
    )
    assert labels_for(["class0", "class1", "class2"], labelled, "multiclass") == (True, None)  # some of its classes
    assert labels_for(list(rsna.multilabel), rsna, "multilabel") == (True, None)
    assert default_split(unlabelled) == "test" and default_split(labelled) == "test"
    only = make_dataset(str(tmp_path / "o"), {"new": 4}, labelled=False)
    assert default_split(only) == "new"
    assert prediction_name("test", True) == "test" and prediction_name("test", False) == "external_test"
    assert prediction_name("f0+f1", True) == "f0_f1" and prediction_name("x", True, "../mayo 2026") == "mayo_2026"


def test_mismatched_lengths_say_which_inputs_and_their_lengths():
    from training.aggregate import aggregate_probs

    probs = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"probs and labels must have the same length \(3 and 2\)"):
        aggregate(probs, np.array([0, 1]), ["a", "a", "b"])
    with pytest.raises(ValueError, match=r"probs and groups must have the same length \(3 and 1\)"):
        aggregate(probs, np.array([0, 1, 1]), ["a"])
    with pytest.raises(ValueError, match=r"probs and groups must have the same length \(3 and 4\)"):
        aggregate_probs(probs, ["a"] * 4)
