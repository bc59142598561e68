"""Competition submission files from a run's revealed prediction tables, so that its calls are scored as the
papers' were: the Mayo Clinic STRIP AI layout (paper 000: a row per patient, a probability per class) and the RSNA
Intracranial Hemorrhage Detection layout (paper 003: a row per image and label, ``ID_<image>_<label>,Label``)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from training.metrics import metric_name
from training.predictions import lines_of

if TYPE_CHECKING:
    from training.config import TrainRecipe

# RSNA 2019's six labels: an image's rows in a submission (written in ID order). The same as ingest's
# RSNA_SUBTYPES, which training does not import.
RSNA_LABELS = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")


def strip_ai(patient_table: str) -> str:
    """STRIP AI's layout from a patient-level prediction table: ``patient_id`` then each class's probability
    under the class's name (``patient_id,CE,LAA``), by patient ID."""
    reader = csv.DictReader(lines_of(patient_table))
    header = reader.fieldnames or []
    if "patient" not in header:
        raise ValueError("a submission lists patients: this table has no patient column")
    classes = [c for c in header if c.startswith("p_")]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["patient_id", *(c.removeprefix("p_") for c in classes)])
    for row in sorted(reader, key=lambda r: r["patient"]):
        writer.writerow([row["patient"], *(row[c] for c in classes)])
    return out.getvalue()


def rsna(sample_table: str) -> str:
    """RSNA 2019's layout from a multi-label table of single slices: ``ID,Label``, a row per image and label
    (``ID_000012eaf_any,0.91``), the images named by their SOP Instance UIDs, rows in ID order."""
    reader = csv.DictReader(lines_of(sample_table))
    header = reader.fieldnames or []
    if "image" not in header:
        raise ValueError(
            "an RSNA submission lists images: these samples name none (a DICOM dataset ingested with --mode slice "
            "names each slice's sample by its SOP instance; one ingested before Tessera did is to be ingested again)"
        )
    columns = {label: f"p_{metric_name(label)}" for label in RSNA_LABELS}
    if missing := [label for label, column in columns.items() if column not in header]:
        raise ValueError(f"an RSNA submission gives each image a probability per label; the table lacks {missing}")
    rows, seen = [], set()
    for row in reader:
        if row["image"] in seen:  # Kaggle refuses a file that scores an image twice
            raise ValueError(f"image {row['image']} has two samples in the table: an RSNA submission scores it once")
        seen.add(row["image"])
        rows += [(f"{row['image']}_{label}", row[column]) for label, column in columns.items()]
    rows.sort()
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ID", "Label"])
    writer.writerows(rows)
    return out.getvalue()


@dataclass(frozen=True)
class Layout:
    """A competition's submission layout: the level of the prediction table it is written from, and the writer."""

    name: str
    level: str  # the table's: sample or patient
    item: str  # what a row of that table is
    write: Callable[[str], str]


STRIP_AI = Layout("STRIP AI", "patient", "patient", strip_ai)
RSNA = Layout("RSNA", "sample", "image", rsna)


def layout_for(recipe: TrainRecipe, outputs: list[str], labels: list[str] | None = None) -> Layout:
    """The layout of a run of ``recipe`` whose model has ``outputs``, on a dataset of multi-label ``labels`` (or
    none): RSNA's for a multi-label model of its six labels, STRIP AI's for a multi-class one whose recipe
    aggregates to patients, but not on RSNA's labels (a binary call per slice, whose patient table RSNA does not
    score); a ValueError saying what each needs where neither fits."""
    task, levels = recipe.task, recipe.eval.levels
    if task == "multilabel" and set(RSNA_LABELS) <= set(outputs):
        return RSNA
    if task == "multiclass" and set(RSNA_LABELS) <= set(labels or []):
        raise ValueError(
            f"this run calls each sample {' or '.join(outputs)} on a dataset of RSNA's labels: RSNA's submission "
            f"gives each image a probability of each of {', '.join(RSNA_LABELS)}, which a multi-label run of them "
            "makes (recipe rsna_ich_subtypes)"
        )
    if task == "multiclass" and "patient" in levels:
        return STRIP_AI
    raise ValueError(
        f"no submission layout fits this run: STRIP AI's lists patients (a multi-class recipe whose eval.levels "
        f"include patient; this {task} one's: {levels}), RSNA's each image's probability of {', '.join(RSNA_LABELS)} "
        f"(a multi-label model of them; this one's outputs: {', '.join(outputs)})"
    )
