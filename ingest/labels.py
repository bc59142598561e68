"""Label tables: the Mayo STRIP AI layout or a generic ``slide,label,patient`` CSV."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass


@dataclass(frozen=True)
class LabelRow:
    """One labelled item: ``item`` matches a file's stem (slide) or a series/patient id."""

    item: str
    label: str
    patient: str | None


def read_label_csv(text: str, source: str = "labels") -> list[LabelRow]:
    """Parse a label CSV; STRIP AI (``image_id,center_id,patient_id,image_num,label``) or generic.

    Raises ``ValueError`` naming ``source`` and the line when a column is missing.
    """
    reader = csv.DictReader(io.StringIO(text))
    cols = set(reader.fieldnames or [])
    if {"image_id", "patient_id", "label"} <= cols:
        item_col, patient_col = "image_id", "patient_id"
    elif {"slide", "label"} <= cols:
        item_col, patient_col = "slide", "patient" if "patient" in cols else None
    elif {"image", "label"} <= cols:
        item_col, patient_col = "image", "patient" if "patient" in cols else None
    elif {"series", "label"} <= cols:
        item_col, patient_col = "series", "patient" if "patient" in cols else None
    elif {"patient", "label"} <= cols:
        item_col, patient_col = "patient", "patient"
    else:
        raise ValueError(
            f"{source}: unknown label CSV columns {sorted(cols)}; expected the STRIP AI layout "
            "(image_id,center_id,patient_id,image_num,label) or slide|image|series|patient,label[,patient]"
        )
    rows = []
    for n, row in enumerate(reader, start=2):
        if not row.get(item_col) or not row.get("label"):
            raise ValueError(f"{source}: line {n} lacks {item_col!r} or 'label'")
        patient = row.get(patient_col) if patient_col else None
        rows.append(LabelRow(row[item_col].strip(), row["label"].strip(), patient.strip() if patient else None))
    return rows


def class_names(rows: list[LabelRow]) -> list[str]:
    """Sorted distinct label names; a label's class index is its position here."""
    return sorted({r.label for r in rows})


RSNA_SUBTYPES = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


def is_rsna_csv(text: str) -> bool:
    """True for the RSNA hemorrhage layout: ``ID,Label`` with ids ``ID_<SOPInstanceUID>_<subtype>``."""
    head = text.lstrip("\ufeff").split("\n", 1)[0].strip().replace(" ", "")
    return head.lower() == "id,label"


def read_rsna_csv(text: str, source: str = "labels") -> dict[str, list[int]]:
    """SOPInstanceUID -> 6-way multi-label ``[any, epidural, intraparenchymal, intraventricular, subarachnoid,
    subdural]`` from the RSNA CSV. A missing subtype stays 0; an unknown subtype or value names the line."""
    out: dict[str, list[int]] = {}
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    next(reader, None)
    for n, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 2 or "_" not in row[0]:
            raise ValueError(f"{source}: line {n} is not 'ID_<uid>_<subtype>,<0|1>'")
        ident, subtype = row[0].strip().rsplit("_", 1)
        if subtype not in RSNA_SUBTYPES or row[1].strip() not in ("0", "1"):
            raise ValueError(f"{source}: line {n}: unknown subtype {subtype!r} or label {row[1]!r}")
        # The competition's UIDs are 'ID_<hex>'; its files carry the same value as SOPInstanceUID.
        out.setdefault(ident, [0] * len(RSNA_SUBTYPES))[RSNA_SUBTYPES.index(subtype)] = int(row[1])
    return out
