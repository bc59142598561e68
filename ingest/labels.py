"""Label tables: the Mayo STRIP AI layout or a generic ``slide,label,patient`` CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass

from ingest.sources import stem


@dataclass(frozen=True)
class LabelRow:
    """One labelled item: ``item`` matches a file's stem (slide) or a series/patient id."""

    item: str
    label: str | None  # None: a table of patients without labels
    patient: str | None
    site: str | None = None  # the centre it came from (STRIP AI's center_id; a site, center or centre column)


# The columns that name an item's centre, in the order looked for: STRIP AI's, then a generic table's.
SITE_COLUMNS = ("center_id", "site", "center", "centre")


def table_text(data: bytes, source: str) -> str:
    """A table file's text: UTF-8 (with or without the byte-order mark Excel writes), or UTF-16 with its mark
    (Excel's "Unicode Text"). Other bytes are refused naming the file, where Python's own error named neither
    the file nor the remedy."""
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{source}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): save it as UTF-8 (Excel: "
            "CSV UTF-8)"
        ) from None


def read_label_csv(text: str, source: str = "labels") -> list[LabelRow]:
    """Parse a label CSV; STRIP AI (``image_id,center_id,patient_id,image_num,label``) or generic. Without a
    ``label`` column, a table of patients (STRIP AI's ``test.csv``; ``slide,patient``): rows of label None,
    which name the inputs to take and the patient of each, for a dataset to predict on.

    Column names are read as their lower case, stripped (``Slide, Label`` as a spreadsheet may write them);
    columns are separated by commas, or by semicolons or tabs where the header has no comma. A
    site column (:data:`SITE_COLUMNS`, the first there) gives each row its centre. Raises ``ValueError`` naming
    ``source`` and the line when a column is missing, or when a row repeats an item with another label, patient or
    site (a row repeated alike is read once).
    """
    header = text.split("\n", 1)[0]
    delimiter = next((d for d in (",", ";", "\t") if d in header), ",")  # as spreadsheets of other locales write
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    reader.fieldnames = [name.strip().lower() for name in reader.fieldnames or []]
    cols = set(reader.fieldnames)
    labelled = "label" in cols
    if {"image_id", "patient_id"} <= cols:
        item_col, patient_col = "image_id", "patient_id"
    elif labelled and "patient" in cols and not cols & {"slide", "image", "series"}:
        item_col, patient_col = "patient", "patient"
    elif item_col := next((c for c in ("slide", "image", "series") if c in cols), None):
        patient_col = "patient" if "patient" in cols else None
    else:
        item_col = patient_col = None
    if item_col is None or not (labelled or patient_col):
        raise ValueError(
            f"{source}: unknown label CSV columns {sorted(cols)}; expected the STRIP AI layout "
            "(image_id,center_id,patient_id,image_num,label) or slide|image|series|patient,label[,patient]; "
            "without a label column, a table of patients (STRIP AI's test.csv, or slide|image|series,patient)"
        )
    site_col = next((c for c in SITE_COLUMNS if c in cols), None)
    rows: dict[str, tuple[int, LabelRow]] = {}
    for n, row in enumerate(reader, start=2):
        if not (row.get(item_col) or "").strip() or (labelled and not (row.get("label") or "").strip()):  # blank too
            raise ValueError(f"{source}: line {n} lacks {item_col!r}" + (" or 'label'" if labelled else ""))
        patient = row.get(patient_col) if patient_col else None
        label = row["label"].strip() if labelled else None
        site = (row.get(site_col) or "").strip() or None if site_col else None
        one = LabelRow(row[item_col].strip(), label, patient.strip() if patient else None, site)
        if (seen := rows.get(one.item)) and seen[1] != one:
            raise ValueError(
                f"{source}: line {n} gives {one.item} label {one.label!r}, patient {one.patient!r} and site "
                f"{one.site!r}, where line {seen[0]} gave {seen[1].label!r}, {seen[1].patient!r} and {seen[1].site!r}"
            )
        rows.setdefault(one.item, (n, one))
    one_spelling(((row.label, f"line {n}") for n, row in rows.values() if row.label is not None), f"{source}: ")
    return [row for _, row in rows.values()]


def label_table(
    text: str | None, source: str | None, exts: tuple[str, ...] = ()
) -> tuple[dict[str, LabelRow], list[str]]:
    """A generic or STRIP AI label table keyed by item (by its stem where it names a file of ``exts`` or a path:
    :func:`by_file_stem`), and its class names (empty without a CSV)."""
    if text is None:
        return {}, []
    rows = read_label_csv(text, source=source or "labels")
    return by_file_stem({r.item: r for r in rows}, exts, source), class_names(rows)


def by_file_stem(table: dict[str, LabelRow], exts: tuple[str, ...], source: str | None) -> dict[str, LabelRow]:
    """``table`` keyed as the files it names are: a row may name a slide's file (``001000_0.tif``,
    ``train/001000_0.tif``), keyed by its stem as the file is (no ``exts``: as it is, a series' or patient's id).
    Two rows that then name one file, labelled or placed otherwise, are refused naming both."""
    out: dict[str, tuple[str, LabelRow]] = {}
    for item, row in table.items():
        key = stem(item) if exts and (item.lower().endswith(exts) or "/" in item) else item
        seen = out.setdefault(key, (item, row))
        if seen[1] != row:
            raise ValueError(f"{source}: rows {seen[0]} and {item} name one file, {key}, with other labels or patients")
    return {key: row for key, (_, row) in out.items()}


def one_spelling(labels: Iterable[tuple[str, str]], source: str = "") -> None:
    """Raise ``ValueError`` where two class names differ in case alone (``CE`` on one line, ``ce`` on another),
    naming where each is (``labels``: each name with its line or folder). Classes are told apart by their exact
    names, so a class spelt two ways would train as two, each with part of the other's samples. ``source``
    prefixes the message (the table's name)."""
    seen: dict[str, tuple[str, str]] = {}
    for label, where in labels:
        first, at = seen.setdefault(label.casefold(), (label, where))
        if first != label:
            raise ValueError(
                f"{source}{where} names class {label!r} and {at} {first!r}: one class spelt two ways? Classes are told "
                "apart by their exact names: write them alike"
            )


def class_names(rows: list[LabelRow]) -> list[str]:
    """Sorted distinct label names (none of a table without labels); a label's class index is its position here.
    Names that differ in case alone are refused (:func:`one_spelling`), each row named by its item."""
    one_spelling((r.label, r.item) for r in rows if r.label is not None)
    return sorted({r.label for r in rows if r.label is not None})


RSNA_SUBTYPES = ("any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")


def is_rsna_csv(text: str) -> bool:
    """True for the RSNA hemorrhage layout: ``ID,Label`` with ids ``ID_<SOPInstanceUID>_<subtype>``."""
    head = text.lstrip("\ufeff").split("\n", 1)[0].strip().replace(" ", "")
    return head.lower() == "id,label"


def read_rsna_csv(text: str, source: str = "labels") -> dict[str, list[int]]:
    """SOPInstanceUID -> 6-way multi-label ``[any, epidural, intraparenchymal, intraventricular, subarachnoid,
    subdural]`` from the RSNA CSV. A missing subtype stays 0; an unknown subtype or value names the line, and so
    does a row that repeats an image's label with another value (the competition's file repeats some rows, alike)."""
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
        vector, k, value = out.setdefault(ident, [-1] * len(RSNA_SUBTYPES)), RSNA_SUBTYPES.index(subtype), int(row[1])
        if vector[k] not in (-1, value):
            earlier = f"which an earlier line gave {vector[k]}"
            raise ValueError(f"{source}: line {n} gives {row[0].strip()} {value}, {earlier}")
        vector[k] = value
    for vector in out.values():  # a subtype without a row: 0
        vector[:] = [max(v, 0) for v in vector]
    return out
