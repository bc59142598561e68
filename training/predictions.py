"""Prediction tables: one row per sample or per slide/patient/series, for reading a model's errors one by one."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.metrics import metric_name, predicted_classes

# What names and places a sample in its metadata (pseudonyms; its centre as the label table named it; a tile's
# level-0 x, y and width, size0; a sequence's slices), never a source path.
IDENTITY = ("site", "patient", "slide", "series", "image", "x", "y", "size0", "slices")


def sample_columns(metas: Sequence[dict[str, Any]]) -> dict[str, list]:
    """The identifying metadata fields (:data:`IDENTITY`) that every sample has, as columns (``metas``: a
    :class:`~training.metas.Metas` or a list of dicts)."""
    from training.metas import values

    columns = {k: values(metas, k) for k in IDENTITY} if len(metas) else {}
    return {
        k: [" ".join(map(str, v)) if isinstance(v, list) else v for v in column]
        for k, column in columns.items()
        if all(v is not None for v in column)
    }


def prediction_table(
    columns: dict[str, list],
    probs: np.ndarray,
    labels: np.ndarray | None,
    outputs: list[str],
    multilabel: bool,
    threshold: float | None = None,
    operating: dict[int, float] | None = None,
) -> str:
    """CSV: the ``columns``, then the true label (none where ``labels`` is None: samples without labels), the call
    (multi-class: the class; multi-label: 0/1 per label at ``threshold``), the call at the operating point of
    each output ``operating`` gives a threshold for (:func:`training.levels.thresholds`: ``op_predicted``, the
    positive class or the other; a label's ``op_predicted_<label>``, 0/1) and a probability per output."""
    names = [metric_name(o) for o in outputs]
    if multilabel:
        cut = 0.5 if threshold is None else threshold
        header = [f"predicted_{n}" for n in names]
        calls = [list(map(int, p >= cut)) for p in probs]
        if labels is not None:
            header = [f"label_{n}" for n in names] + header
            calls = [list(map(int, y)) + c for y, c in zip(labels, calls, strict=True)]
    else:
        header = ["predicted"]
        calls = [[outputs[c]] for c in predicted_classes(probs, threshold)]
        if labels is not None:
            header = ["label", *header]
            calls = [[outputs[y], *c] for y, c in zip(labels, calls, strict=True)]
    for k, cut in sorted((operating or {}).items()):
        at = np.asarray(probs)[:, k] >= cut
        if multilabel:
            header.append(f"op_predicted_{names[k]}")
            calls = [[*c, int(a)] for c, a in zip(calls, at, strict=True)]
        else:  # a binary classifier's positive class, or its other
            header.append("op_predicted")
            calls = [[*c, outputs[k] if a else outputs[1 - k]] for c, a in zip(calls, at, strict=True)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*columns, *header, *(f"p_{n}" for n in names)])
    for i, (call, p) in enumerate(zip(calls, probs, strict=True)):
        writer.writerow([*(c[i] for c in columns.values()), *call, *(f"{v:.6g}" for v in p)])
    return out.getvalue()


@dataclass
class LabelledTable:
    """A labelled prediction table read back (:func:`read_table`): each unit's key (its identity columns),
    label(s), call(s), probabilities; ``outputs`` as the probability columns name them (metric names)."""

    keys: list[tuple[str, ...]]
    patients: list[str | None]
    labels: list  # a multi-class unit's class, a multi-label one's 0/1 per label (a tuple)
    calls: list
    probs: np.ndarray
    outputs: list[str]
    multilabel: bool = False


def read_table(text: str, source: str) -> LabelledTable:
    """A labelled prediction table (:func:`training.predictions.prediction_table`): the columns before the
    labels name each unit; a multi-class one's ``label`` and ``predicted``, a multi-label one's ``label_<l>`` and
    ``predicted_<l>`` per label; ``p_<output>`` the probabilities. One without labels is refused naming ``source``."""
    rows = list(csv.DictReader(text.splitlines()))
    header = list(rows[0]) if rows else []
    outputs = [h.removeprefix("p_") for h in header if h.startswith("p_")]
    if "label" in header and "predicted" in header:
        ids, multilabel = header[: header.index("label")], False
        labels, calls = [r["label"] for r in rows], [r["predicted"] for r in rows]
    elif outputs and all(f"label_{o}" in header and f"predicted_{o}" in header for o in outputs):
        ids, multilabel = header[: header.index(f"label_{outputs[0]}")], True
        labels = [tuple(int(r[f"label_{o}"]) for o in outputs) for r in rows]
        calls = [tuple(int(r[f"predicted_{o}"]) for o in outputs) for r in rows]
    else:
        raise ValueError(f"{source}: a paired comparison needs a table with labels (label or label_<l>, and calls)")
    return LabelledTable(
        keys=[tuple(r[c] for c in ids) for r in rows],
        patients=[r.get("patient") for r in rows],
        labels=labels,
        calls=calls,
        probs=np.array([[float(r[f"p_{o}"]) for o in outputs] for r in rows]),
        outputs=outputs,
        multilabel=multilabel,
    )


# The columns whose values are pseudonyms of the private map; what each stands for there starts with its kind
# (``patient 006388``, ``study 1.2.840...``, ``series 1.2.840... in /data/ct``, a DICOM slice's ``instance
# 1.2.840...``) or is a file (a slide, an image).
PSEUDONYMS = ("patient", "slide", "series", "image", "study")


def original_name(means: str) -> str:
    """The name a private-map entry gives: a patient's or study's ID, a series' or DICOM slice's UID, a slide's or
    image's file."""
    for kind in ("patient", "study", "instance"):
        if means.startswith(f"{kind} "):
            return means.removeprefix(f"{kind} ")
    if means.startswith("series "):
        return means.removeprefix("series ").split(" in ", 1)[0]
    return means


def lines_of(text: str) -> Iterator[str]:
    """The lines of ``text`` one at a time (what ``csv.reader`` reads), without the copies of the whole that
    ``io.StringIO`` (4 bytes a character) or ``splitlines`` would make of a cohort's table."""
    start = 0
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def row_count(table: str) -> int:
    """How many rows CSV ``table`` has below its header (a quoted field may span lines)."""
    return max(sum(1 for _ in csv.reader(lines_of(table))) - 1, 0)


def header_of(table: str) -> list[str]:
    """The column names of CSV ``table``, read from its first line alone."""
    return next(csv.reader(lines_of(table)), [])


def reveal(table: str, private: dict[str, str]) -> tuple[str, int]:
    """``table`` (CSV) with each pseudonym of its :data:`PSEUDONYMS` columns replaced by the name it stands for
    in ``private``, and how many distinct pseudonyms the map does not have (left as they are). A row at a time,
    written out in blocks: a table of millions of tiles is held twice, as text, and no more."""
    reader = csv.reader(lines_of(table))
    header = next(reader, None)
    if header is None:
        return table, 0
    named = [i for i, column in enumerate(header) if column in PSEUDONYMS]
    unknown: set[str] = set()
    blocks, block = [], io.StringIO()
    writer = csv.writer(block, lineterminator="\n")
    writer.writerow(header)
    for n, row in enumerate(reader, 1):
        for i in named:
            if row[i] in private:
                row[i] = original_name(private[row[i]])
            else:
                unknown.add(row[i])
        writer.writerow(row)
        if n % 4096 == 0:
            blocks.append(block.getvalue())
            block.seek(0)
            block.truncate()
    blocks.append(block.getvalue())
    return "".join(blocks), len(unknown)
