"""A competition submission scored against labels, as its competition scored it: Mayo Clinic STRIP AI's weighted
multi-class log loss over patients (paper 000), RSNA 2019's weighted multi-label log loss over images (paper 003).
For a submission ``tessera predict --submission`` wrote: checked before it is uploaded, or scored on a held-out set
whose labels the user has (a split of the competition's training labels, or a test set's once they are out)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from training.metrics import rsna_log_loss, weighted_log_loss
from training.predictions import lines_of
from training.submissions import RSNA_LABELS

RSNA_ORDER = ("any", *(label for label in RSNA_LABELS if label != "any"))  # metrics.RSNA_WEIGHTS' order
PATIENT_COLUMNS = ("patient_id", "patient")  # a label table's patient column: STRIP AI's, or a generic table's


@dataclass(frozen=True)
class Score:
    competition: str
    metric: str
    value: float
    scored: int  # patients or images
    item: str  # what was scored: "patient", "image"
    unscored: int  # of the labels' patients or images, those the submission does not call

    def line(self) -> str:
        more = f" (the labels name {self.unscored} more, which it does not call)" if self.unscored else ""
        return f"{self.competition} {self.metric} {self.value:.6f} over {self.scored} {self.item}(s){more}"


def score(submission: str, labels: str, source: str = "the submission") -> Score:
    """Score ``submission`` (CSV text) against ``labels`` (CSV text): STRIP AI's layout (``patient_id`` then a
    probability per class) against a table of each patient's label (STRIP AI's ``train.csv``, or
    ``patient,label``), or RSNA's (``ID,Label``) against RSNA's label file of the same layout. Only what the
    submission calls is scored; each of it must have a label. Raises ``ValueError`` naming ``source`` and the row."""
    header = next(csv.reader(lines_of(submission)), [])
    if header == ["ID", "Label"]:
        return _rsna(submission, labels, source)
    if header[:1] == ["patient_id"] and len(header) > 2:
        return _strip_ai(submission, labels, source)
    raise ValueError(
        f"{source}: not a submission of a known layout (its header {','.join(header) or 'is empty'}): STRIP AI's "
        "is patient_id then a column per class, RSNA's is ID,Label"
    )


def _probability(text: str, line: int, source: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = math.nan
    if not 0.0 <= p <= 1.0:  # NaN too
        raise ValueError(f"{source}, line {line}: {text!r} is not a probability")
    return p


def _rows(text: str, source: str) -> Iterator[tuple[int, dict[str, str]]]:
    """The rows of a CSV (column names lower-cased and stripped), with their line numbers."""
    reader = csv.DictReader(lines_of(text))
    reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
    for n, row in enumerate(reader, 2):
        yield n, {k: (v or "").strip() for k, v in row.items() if k is not None}


def _patient_labels(labels: str) -> dict[str, str]:
    """Each patient's label in a label table; a patient given two labels raises."""
    out: dict[str, str] = {}
    for n, row in _rows(labels, "the labels"):
        column = next((c for c in PATIENT_COLUMNS if c in row), None)
        if column is None or "label" not in row:
            raise ValueError("the labels: a table of patients' labels has a patient_id (or patient) and a label column")
        patient, label = row[column], row["label"]
        if out.setdefault(patient, label) != label:
            raise ValueError(f"the labels, line {n}: patient {patient} is {label} here and {out[patient]} before")
    return out


def _strip_ai(submission: str, labels: str, source: str) -> Score:
    truth = _patient_labels(labels)
    reader = csv.reader(lines_of(submission))
    classes = next(reader)[1:]
    probs, y, seen = [], [], set()
    for n, row in enumerate(reader, 2):
        if len(row) != len(classes) + 1:
            raise ValueError(f"{source}, line {n}: {len(row)} values, where its header names {len(classes) + 1}")
        patient = row[0]
        if patient in seen:
            raise ValueError(f"{source}, line {n}: patient {patient} is called twice")
        seen.add(patient)
        if patient not in truth:
            raise ValueError(f"{source}, line {n}: the labels give patient {patient} no label")
        if truth[patient] not in classes:
            raise ValueError(f"the labels: patient {patient} is {truth[patient]}, not one of {', '.join(classes)}")
        probs.append([_probability(v, n, source) for v in row[1:]])
        y.append(classes.index(truth[patient]))
    if not probs:
        raise ValueError(f"{source}: it calls no patient")
    value = weighted_log_loss(np.array(y), np.array(probs))
    return Score("STRIP AI", "weighted log loss", value, len(probs), "patient", len(truth) - len(probs))


def _image_rows(text: str, source: str) -> dict[str, dict[str, tuple[str, int]]]:
    """``{image: {label: (value, line)}}`` of an ``ID,Label`` file (``ID_<image>_<label>`` rows); a row twice
    raises."""
    out: dict[str, dict[str, tuple[str, int]]] = {}
    for n, row in _rows(text, source):
        image, _, label = row.get("id", "").rpartition("_")
        if label not in RSNA_LABELS or not image:
            raise ValueError(f"{source}, line {n}: {row.get('id')!r} is not ID_<image>_<{'|'.join(RSNA_LABELS)}>")
        if label in out.setdefault(image, {}):
            raise ValueError(f"{source}, line {n}: {image}_{label} is given twice")
        out[image][label] = (row.get("label", ""), n)
    return out


def _truth(value: str, line: int) -> int:
    if value not in ("0", "1"):
        raise ValueError(f"the labels, line {line}: {value!r} is not a label (0 or 1)")
    return int(value)


def _rsna(submission: str, labels: str, source: str) -> Score:
    called, truth = _image_rows(submission, source), _image_rows(labels, "the labels")
    probs, y = [], []
    for image, values in called.items():
        if missing := [label for label in RSNA_ORDER if label not in values]:
            raise ValueError(f"{source}: image {image} has no row for {', '.join(missing)}")
        known = truth.get(image, {})
        if missing := [label for label in RSNA_ORDER if label not in known]:
            raise ValueError(f"the labels give image {image} no {', '.join(missing)} label")
        probs.append([_probability(*values[label], source) for label in RSNA_ORDER])
        y.append([_truth(*known[label]) for label in RSNA_ORDER])
    if not probs:
        raise ValueError(f"{source}: it calls no image")
    value = rsna_log_loss(np.array(y), np.array(probs))
    return Score("RSNA", "weighted log loss", value, len(probs), "image", len(truth) - len(probs))
