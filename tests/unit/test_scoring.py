"""`tessera score`: a submission as `tessera predict --submission` writes it, scored against labels by its
competition's metric, checked against the formulas written out."""

import math

import numpy as np
import pytest

from cluster.cli import main
from cluster.cli_predict import score_texts as score
from training.submissions import rsna, strip_ai

# STRIP AI's train.csv: a row per slide; p4 is labelled but not called by the submission.
STRIP_LABELS = """image_id,center_id,patient_id,image_num,label
a_0,11,p1,0,CE
a_1,11,p1,1,CE
b_0,4,p2,0,CE
c_0,4,p3,0,LAA
d_0,4,p4,0,LAA
"""


def _strip_submission(rows=(("p1", 0.8, 0.2), ("p2", 0.6, 0.4), ("p3", 0.5, 0.5))) -> str:
    """As `tessera predict --submission` writes it, from a revealed patient table."""
    table = "patient,predicted,p_CE,p_LAA\n" + "".join(f"{p},CE,{ce},{laa}\n" for p, ce, laa in rows)
    return strip_ai(table)


def test_a_strip_ai_submission_is_scored_by_the_weighted_log_loss_over_its_patients():
    found = score(_strip_submission(), STRIP_LABELS)
    # per class, the mean of -log p(true class); then the mean over classes (equal weights)
    expected = ((-math.log(0.8) - math.log(0.6)) / 2 + -math.log(0.5)) / 2
    assert found.value == pytest.approx(expected, abs=1e-12)
    assert (found.competition, found.scored, found.unscored) == ("STRIP AI", 3, 1)
    assert found.line() == (
        f"STRIP AI weighted log loss {expected:.6f} over 3 patient(s) (the labels name 1 more, which it does not call)"
    )
    # a generic table of patients scores the same; rows not summing to 1 are re-normalised, as the competition did
    generic = "patient,label\np1,CE\np2,CE\np3,LAA\n"
    assert score(_strip_submission([("p1", 0.4, 0.1), ("p2", 0.6, 0.4), ("p3", 0.5, 0.5)]), generic).value == (
        pytest.approx(expected, abs=1e-12)
    )


@pytest.mark.parametrize(
    ("submission", "labels", "error"),
    [
        ("patient_id,CE,LAA\np9,0.5,0.5\n", STRIP_LABELS, "line 2: the labels give patient p9 no label"),
        ("patient_id,CE,LAA\np1,0.5,0.5\np1,0.5,0.5\n", STRIP_LABELS, "line 3: patient p1 is called twice"),
        ("patient_id,CE,LAA\np1,0.5,x\n", STRIP_LABELS, "line 2: 'x' is not a probability"),
        ("patient_id,CE,LAA\np1,0.5,1.5\n", STRIP_LABELS, "line 2: '1.5' is not a probability"),
        ("patient_id,CE,LAA\np1,0.5\n", STRIP_LABELS, "line 2: 2 values, where its header names 3"),
        ("patient_id,CE,Other\np3,0.5,0.5\n", STRIP_LABELS, "patient p3 is LAA, not one of CE, Other"),
        ("patient_id,CE,LAA\np1,0.5,0.5\n", "patient,label\np1,CE\np1,LAA\n", "line 3 gives p1 label 'LAA'"),
        ("patient_id,CE,LAA\n", STRIP_LABELS, "it calls no patient"),
        ("slide,CE\na,1\n", STRIP_LABELS, r"not a submission of a known layout \(its header slide,CE\)"),
        ("ID,Label\nID_x_any,0.5\n", "ID,Label\n", "image ID_x has no row for epidural"),
    ],
)
def test_a_submission_that_cannot_be_scored_says_where(submission, labels, error):
    with pytest.raises(ValueError, match=error):
        score(submission, labels, "sub.csv")


ORDER = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]


def test_an_rsna_submission_is_scored_by_the_weighted_log_loss_over_its_images():
    probs = {"ID_a": [0.9, 0.1, 0.7, 0.2, 0.3, 0.4], "ID_b": [0.2, 0.05, 0.1, 0.1, 0.15, 0.1]}
    truth = {"ID_a": [1, 0, 1, 0, 0, 1], "ID_b": [0, 0, 0, 0, 0, 0], "ID_c": [1, 1, 0, 0, 0, 0]}
    table = "image," + ",".join(f"p_{k}" for k in ORDER) + "\n"
    table += "".join(f"{image}," + ",".join(map(str, p)) + "\n" for image, p in probs.items())
    labels = "ID,Label\n" + "".join(
        f"{image}_{k},{v}\n" for image, values in truth.items() for k, v in zip(ORDER, values, strict=True)
    )
    found = score(rsna(table), labels)
    # each row's binary log loss, weighted 2 for `any` and 1 for each subtype, over all rows of the called images
    rows = [
        (y, p, 2.0 if j == 0 else 1.0) for i in probs for j, (y, p) in enumerate(zip(truth[i], probs[i], strict=True))
    ]
    expected = sum(-w * math.log(p if y else 1 - p) for y, p, w in rows) / sum(w for *_, w in rows)
    assert found.value == pytest.approx(expected, abs=1e-12)
    assert (found.competition, found.scored, found.item, found.unscored) == ("RSNA", 2, "image", 1)
    with pytest.raises(ValueError, match="the labels give image ID_z no label"):
        score(rsna(table.replace("ID_b", "ID_z")), labels)
    with pytest.raises(ValueError, match="the labels: line 2: unknown subtype 'any' or label '2'"):
        score(rsna(table), labels.replace("ID_a_any,1", "ID_a_any,2"))
    with pytest.raises(ValueError, match=r"sub\.csv, line 2: 'ID_a_nothing' is not ID_<image>"):
        score("ID,Label\nID_a_nothing,0.5\n", labels, "sub.csv")
    assert np.isfinite(score(rsna(table.replace("0.9", "1.0")), labels).value)  # clipped, as the competition did
    # RSNA's own file repeats some rows alike: read as an ingest reads it (ingest.labels.read_rsna_csv)
    repeated = labels + "ID_a_any,1\n"
    assert score(rsna(table), repeated).value == pytest.approx(expected, abs=1e-12)


def test_a_patient_whose_slides_are_labelled_two_ways_cannot_be_scored():
    labels = STRIP_LABELS.replace("a_1,11,p1,1,CE", "a_1,11,p1,1,LAA")
    with pytest.raises(ValueError, match="the labels: patient p1 is LAA at a_1 and CE"):
        score(_strip_submission(), labels)


def test_tessera_score_prints_the_score_or_the_reason(tmp_path, capsys):
    (tmp_path / "sub.csv").write_text(_strip_submission())
    (tmp_path / "train.csv").write_text(STRIP_LABELS)
    assert main(["score", str(tmp_path / "sub.csv"), "--labels", str(tmp_path / "train.csv")]) == 0
    assert capsys.readouterr().out.startswith("STRIP AI weighted log loss 0.530066 over 3 patient(s)")
    (tmp_path / "bad.csv").write_text("patient_id,CE,LAA\np9,0.5,0.5\n")
    assert main(["score", str(tmp_path / "bad.csv"), "--labels", str(tmp_path / "train.csv")]) == 1
    assert f"tessera: error: {tmp_path / 'bad.csv'}, line 2: the labels give patient p9 no label" in (
        capsys.readouterr().err
    )
