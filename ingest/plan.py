"""Turn sources and a label table into units, skipped records and class names (driver side)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ingest.config import DicomIngestConfig, IngestConfig, WsiIngestConfig
from ingest.dicom import group_series, read_header
from ingest.labels import LabelRow, class_names, read_label_csv
from ingest.pseudonym import pseudonym
from ingest.sources import SLIDE_EXTS, expand, stem
from ingest.splits import assign_splits, parse_fractions
from ingest.units import Unit
from shards import storage
from shards.manifest import InputRecord


@dataclass
class Plan:
    """Units to process, inputs already decided (skipped), and the label classes."""

    units: list[Unit]
    skipped: list[InputRecord] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    private: dict[str, str] = field(default_factory=dict)  # pseudonym -> location, kept off object storage


def _labels(cfg: IngestConfig) -> tuple[dict[str, LabelRow], list[str]]:
    if not cfg.labels:
        return {}, []
    rows = read_label_csv(storage.get_bytes(cfg.labels).decode("utf-8-sig"), source=cfg.labels)
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
    table, classes = _labels(cfg)
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


def plan_dicom(cfg: DicomIngestConfig, key: bytes) -> Plan:
    """One unit per series, files found by content; non-DICOM files are skipped with a reason."""
    table, classes = _labels(cfg)
    plan = Plan(units=[], classes=classes)
    headers = []
    for loc in expand(cfg.sources):
        uid = pseudonym(key, "source", loc)
        plan.private[uid] = loc
        header = read_header(loc)
        if header is None:
            plan.skipped.append(InputRecord(id=uid, kind="dicom", status="skipped", reason="not a DICOM image file"))
        else:
            headers.append(header)
    for series in group_series(headers):
        row = table.get(series.series_uid) or table.get(series.patient_id)
        sid = pseudonym(key, "series", series.series_uid)
        if table and row is None:
            plan.skipped.append(InputRecord(id=sid, kind="dicom", status="skipped", reason="not in the label table"))
            continue
        meta = {
            "study": pseudonym(key, "study", series.study_uid),
            "modality": series.modality,
            "warnings": series.warnings,
        }
        unit = Unit(
            id=sid,
            kind="dicom",
            sources=[s.path for s in series.slices],
            item=sid,
            patient=pseudonym(key, "patient", series.patient_id),
            label=classes.index(row.label) if row else None,
            meta=meta,
        )
        plan.units.append(unit)
    _assign(plan.units, cfg)
    return plan
