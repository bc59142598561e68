"""A competition submission scored against labels, as its competition scored it: Mayo Clinic STRIP AI's weighted
multi-class log loss over patients (paper 000), RSNA 2019's weighted multi-label log loss over images (paper 003).
For a submission ``tessera predict --submission`` wrote: checked before it is uploaded, or scored on a held-out set
whose labels the user has (a split of the competition's training labels, or a test set's once they are out). The
labels come read (``cluster.cli_predict.score_texts`` reads them with ingest's label readers)."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from training.metrics import rsna_log_loss, weighted_log_loss
from training.predictions import lines_of
from training.submissions import RSNA_LABELS

RSNA_ORDER = ("any", *(label for label in RSNA_LABELS if label != "any"))  # metrics.RSNA_WEIGHTS' order


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


def layout(submission: str, source: str = "the submission") -> str:
    """The competition whose layout ``submission`` (CSV text) has: ``STRIP AI`` (``patient_id`` then a
    probability per class) or ``RSNA`` (``ID,Label``); ``ValueError`` naming ``source`` otherwise."""
    header = next(csv.reader(lines_of(submission)), [])
    if header == ["ID", "Label"]:
        return "RSNA"
    if header[:1] == ["patient_id"] and len(header) > 2:
        return "STRIP AI"
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


def _rows(text: str) -> Iterator[tuple[int, dict[str, str]]]:
    """The rows of a CSV (column names lower-cased and stripped), with their line numbers."""
    reader = csv.DictReader(lines_of(text))
    reader.fieldnames = [c.strip().lower() for c in reader.fieldnames or []]
    for n, row in enumerate(reader, 2):
        yield n, {k: (v or "").strip() for k, v in row.items() if k is not None}


def patient_labels(rows: Iterable, source: str = "the labels") -> dict[str, str]:
    """Each patient's label from label-table rows (``.item``, ``.patient``, ``.label``: a slide's, or a
    patient's); a patient given two labels, or a row of no patient, raises."""
    out: dict[str, str] = {}
    for row in rows:
        if row.patient is None or row.label is None:
            raise ValueError(f"{source}: {row.item} has no patient or no label: a submission is scored by patient")
        if out.setdefault(row.patient, row.label) != row.label:
            raise ValueError(f"{source}: patient {row.patient} is {row.label} at {row.item} and {out[row.patient]}")
    return out


def score_strip_ai(submission: str, truth: dict[str, str], source: str = "the submission") -> Score:
    """A STRIP AI submission's weighted log loss over its patients, each of ``truth`` (patient -> label name)."""
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
    for n, row in _rows(text):
        image, _, label = row.get("id", "").rpartition("_")
        if label not in RSNA_LABELS or not image:
            raise ValueError(f"{source}, line {n}: {row.get('id')!r} is not ID_<image>_<{'|'.join(RSNA_LABELS)}>")
        if label in out.setdefault(image, {}):
            raise ValueError(f"{source}, line {n}: {image}_{label} is given twice")
        out[image][label] = (row.get("label", ""), n)
    return out


def score_rsna(submission: str, truth: dict[str, list[int]], source: str = "the submission") -> Score:
    """An RSNA submission's weighted log loss over its images, each of ``truth`` (image ID -> its six labels,
    ``any`` first, as :func:`ingest.labels.read_rsna_csv` reads them)."""
    called = _image_rows(submission, source)
    probs, y = [], []
    for image, values in called.items():
        if missing := [label for label in RSNA_ORDER if label not in values]:
            raise ValueError(f"{source}: image {image} has no row for {', '.join(missing)}")
        if image not in truth:
            raise ValueError(f"the labels give image {image} no label")
        probs.append([_probability(*values[label], source) for label in RSNA_ORDER])
        y.append(truth[image])
    if not probs:
        raise ValueError(f"{source}: it calls no image")
    value = rsna_log_loss(np.array(y), np.array(probs))
    return Score("RSNA", "weighted log loss", value, len(probs), "image", len(truth) - len(probs))
