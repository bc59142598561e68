"""Turn sources and a label table into units, skipped records and class names (driver side)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ingest.config import DicomIngestConfig, IngestConfig, WsiIngestConfig
from ingest.dicom import group_series, read_headers
from ingest.labels import RSNA_SUBTYPES, LabelRow, class_names, is_rsna_csv, read_label_csv, read_rsna_csv
from ingest.pseudonym import pseudonym
from ingest.sources import SLIDE_EXTS, expand, stem
from ingest.splits import assign_splits, parse_fractions
from ingest.units import Unit, local_copy
from shards import storage
from shards.manifest import InputRecord


@dataclass
class Plan:
    """Units to process, inputs already decided (skipped), and the label classes."""

    units: list[Unit]
    skipped: list[InputRecord] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    multilabel: list[str] | None = None
    private: dict[str, str] = field(default_factory=dict)  # pseudonym -> location, kept off object storage


def _label_text(cfg: IngestConfig) -> str | None:
    return storage.get_bytes(cfg.labels).decode("utf-8-sig") if cfg.labels else None


def _table(text: str | None, source: str | None) -> tuple[dict[str, LabelRow], list[str]]:
    """A generic or STRIP AI label table keyed by item, and its class names (empty without a CSV)."""
    if text is None:
        return {}, []
    rows = read_label_csv(text, source=source or "labels")
    return {r.item: r for r in rows}, class_names(rows)


def _assign(units: list[Unit], cfg: IngestConfig) -> None:
    patients: dict[str, int | None] = {}
    for u in units:
        patients.setdefault(u.patient, u.label)
    splits = assign_splits(patients, parse_fractions(cfg.split), cfg.seed)
    for u in units:
        u.split = splits[u.patient]


def plan_wsi(cfg: WsiIngestConfig, key: bytes) -> Plan:
    """One unit per slide file; with a label CSV, slides it does not name are skipped."""
    table, classes = _table(_label_text(cfg), cfg.labels)
    plan = Plan(units=[], classes=classes)
    for loc in expand(cfg.sources):
        uid = pseudonym(key, "source", loc)
        plan.private[uid] = loc
        if not loc.lower().endswith(SLIDE_EXTS):
            ext = os.path.splitext(loc)[1].lower() or "none"
            reason = f"not a slide file (extension {ext})"
            plan.skipped.append(InputRecord(id=uid, kind="wsi", status="skipped", reason=reason))
            continue
        name = stem(loc)
        row = table.get(name)
        if table and row is None:
            plan.skipped.append(InputRecord(id=uid, kind="wsi", status="skipped", reason="not in the label table"))
            continue
        patient = pseudonym(key, "patient", row.patient if row and row.patient else name)
        label = classes.index(row.label) if row else None
        plan.units.append(Unit(uid, "wsi", [loc], pseudonym(key, "slide", name), patient, label))
    _assign(plan.units, cfg)
    return plan


def _dicom_labels(cfg: DicomIngestConfig) -> tuple[dict[str, LabelRow], dict[str, list[int]], list[str]]:
    """A generic table (series or patient -> label), or RSNA per-slice multi-labels keyed by SOPInstanceUID."""
    text = _label_text(cfg)
    if text is not None and is_rsna_csv(text):
        return {}, read_rsna_csv(text, source=cfg.labels or "labels"), ["no hemorrhage", "hemorrhage"]
    table, classes = _table(text, cfg.labels)
    return table, {}, classes


def _skip(plan: Plan, uid: str, reason: str) -> None:
    plan.skipped.append(InputRecord(id=uid, kind="dicom", status="skipped", reason=reason))


def plan_dicom(cfg: DicomIngestConfig, key: bytes) -> Plan:
    """One unit per series, files found by content; other files and unusable series are skipped with a reason.

    With RSNA labels every slice carries its 6-way vector and the series label is ``any`` over its slices.
    """
    table, rsna, classes = _dicom_labels(cfg)
    plan = Plan(units=[], classes=classes, multilabel=list(RSNA_SUBTYPES) if rsna else None)
    headers = []
    for loc in expand(cfg.sources):
        uid = pseudonym(key, "source", loc)
        plan.private[uid] = loc
        with local_copy(loc) as path:
            found, reason = read_headers(path)
        for h in found:
            h.path = loc
        if reason:
            _skip(plan, uid, reason)
        headers += found
    for series in group_series(headers):
        sid = pseudonym(key, "series", series.series_uid)
        if any(s.burned_in for s in series.slices) and not cfg.allow_burned_in:
            _skip(plan, sid, "BurnedInAnnotation=YES (text in the pixels may identify the patient); --allow-burned-in")
            continue
        slice_labels = [rsna.get(s.sop_uid) for s in series.slices] if rsna else None
        row = table.get(series.series_uid) or table.get(series.patient_id)
        if (table and row is None) or (rsna and not any(slice_labels or [])):
            _skip(plan, sid, "not in the label table")
            continue
        label = classes.index(row.label) if row else None
        if slice_labels:
            label = max((v[0] for v in slice_labels if v), default=0)
        meta = {
            "study": pseudonym(key, "study", series.study_uid),
            "modality": series.modality,
            "warnings": series.warnings,
            "frames": [s.frame for s in series.slices],
            "slice_labels": slice_labels,
        }
        unit = Unit(
            id=sid,
            kind="dicom",
            sources=[s.path for s in series.slices],
            item=sid,
            patient=pseudonym(key, "patient", series.patient_id),
            label=label,
            meta=meta,
        )
        plan.units.append(unit)
    _assign(plan.units, cfg)
    return plan
