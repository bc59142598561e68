"""Turn sources and a label table into units, skipped records and class names (driver side)."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

from ingest.config import CONFIGS, DicomIngestConfig, ImagesIngestConfig, IngestConfig, WsiIngestConfig
from ingest.copies import place_copies
from ingest.dicom import group_series, map_headers, read_header, read_headers
from ingest.dicom_wsi import group_dicom_slides
from ingest.images import IMAGE_EXTS, csv_boxes, is_slice_table, patient_key, read_slice_table, slice_number, yolo_boxes
from ingest.labels import RSNA_SUBTYPES, LabelRow, class_names, is_rsna_csv, label_table, read_rsna_csv, table_text
from ingest.model_files import ModelFiles, read_models
from ingest.pseudonym import pseudonym
from ingest.sources import SLIDE_EXTS, companions_of, expand, fingerprint, listing, stem
from ingest.splits import HELD_OUT, assign_splits, outside_held_out, parse_fractions, split_notes
from ingest.units import Unit
from shards import storage
from shards.manifest import InputRecord
from shards.schema import site_order


@dataclass
class Plan:
    """Units to process, inputs already decided (skipped), and the label classes."""

    units: list[Unit]
    skipped: list[InputRecord] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    multilabel: list[str] | None = None
    # pseudonym -> what it stands for (a file, a patient's id, a label row), kept off object storage
    private: dict[str, str] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)  # label rows naming no input found, as pseudonyms
    model: ModelFiles | None = None  # the model of ``--background-model`` or ``--detector``, read once here
    notes: list[str] = field(default_factory=list)  # what a new dataset's run says before it starts (empty splits)


def _label_text(cfg: IngestConfig) -> str | None:
    return table_text(storage.get_bytes(cfg.labels), cfg.labels) if cfg.labels else None


def _known(plan: Plan, key: bytes, kind: str, name: str, means: str) -> str:
    """``pseudonym(key, kind, name)``, entered in the private map as ``means``: every pseudonym that reaches the
    manifest, the samples or a run's prediction tables can be traced back by the person who holds the map."""
    uid = pseudonym(key, kind, name)
    plan.private[uid] = means
    return uid


def _unmatched(plan: Plan, key: bytes, items: set[str], labels: str | None) -> None:
    """Record the label table's rows that name no input found (a slide missing from the sources, a typo), as
    pseudonyms: the private map has the names."""
    plan.unmatched += [_known(plan, key, "label", item, f"{labels}: row {item}") for item in sorted(items)]


def _assign(units: list[Unit], cfg: IngestConfig, linked: dict[str, str] | None = None) -> None:
    """Each unit's split, by patient; ``linked``: patient -> the patient whose split it shares
    (:func:`~ingest.splits.linked_patients`). The patients of ``--hold-out-sites`` (with any of their inputs at
    one) go to :data:`~ingest.splits.HELD_OUT`, the others by the other fractions."""
    root = linked or {}
    held = {root.get(u.patient, u.patient) for u in held_out(units, cfg)}
    patients: dict[str, int | None] = {}
    for u in units:
        patients.setdefault(root.get(u.patient, u.patient), u.label)
    fractions = parse_fractions(cfg.split)
    rest = {p: label for p, label in patients.items() if p not in held}
    fractions = outside_held_out(fractions) if cfg.hold_out_sites else fractions
    splits = assign_splits(rest, fractions, cfg.seed, cfg.split_balance)
    for u in units:
        u.split = splits.get(root.get(u.patient, u.patient), HELD_OUT)


def held_out(units: list[Unit], cfg: IngestConfig) -> list[Unit]:
    """The units of the sites ``--hold-out-sites`` names. Raises ``ValueError`` for a site no unit is of, saying
    which sites the label table gave (a typo would otherwise leave the test split empty)."""
    sites = site_order(u.site for u in units)
    if missing := sorted(set(cfg.hold_out_sites) - set(sites)):
        known = ", ".join(sites) or "none (it has no center_id or site column)"
        raise ValueError(
            f"--hold-out-sites: no input {cfg.labels} labels is of site {', '.join(missing)}; its sites: {known}"
        )
    return [u for u in units if u.site in cfg.hold_out_sites]


def _fingerprints(plan: Plan, key: bytes, stamps: dict[str, str]) -> None:
    """Give every unit the :func:`~ingest.sources.fingerprint` of its files and of what planning read about them
    (boxes, per-slice labels)."""
    for u in plan.units:
        u.fingerprint = fingerprint(key, u.sources, stamps, u.meta)


def plan_wsi(cfg: WsiIngestConfig, key: bytes) -> Plan:
    """One unit per slide (a file; a MIRAX ``.mrxs`` with its data folder, a Hamamatsu ``.vms``/``.vmu`` with its
    images; or a DICOM WSI series of files); with a label CSV, slides it does not name are skipped."""
    table, classes = label_table(_label_text(cfg), cfg.labels, SLIDE_EXTS)
    plan = Plan(units=[], classes=classes)
    dicom, slides, others = [], [], []
    stamps = listing(cfg.sources)
    locations = list(stamps)
    companions = {loc: files for loc in locations if (files := companions_of(loc, locations))}
    inside = {c for files in companions.values() for c in files}  # a slide's other files belong to it
    for loc in locations:
        if loc in inside:
            continue
        if loc.lower().endswith(".dcm"):
            dicom.append(loc)
        elif loc.lower().endswith(SLIDE_EXTS):
            slides.append((stem(loc), [loc, *companions.get(loc, [])]))
        else:
            others.append(loc)
    dicom_slides, refused = group_dicom_slides(dicom)
    slides += [(s.name, s.files) for s in dicom_slides]
    _unmatched(plan, key, set(table) - {name for name, _ in slides}, cfg.labels)
    for loc in others + sorted(refused):
        uid = _known(plan, key, "source", loc, loc)
        reason = refused.get(loc) or f"not a slide file (extension {os.path.splitext(loc)[1].lower() or 'none'})"
        plan.skipped.append(InputRecord(id=uid, kind="wsi", status="skipped", reason=reason))
    first: dict[str, str] = {}  # a slide name -> the first input of that name, by path
    for name, files in sorted(slides, key=lambda s: s[1][0]):
        uid = _known(plan, key, "source", files[0], files[0])
        row = table.get(name)
        if table and (reason := "not in the label table" if row is None else _same_name(first, name, uid)):
            plan.skipped.append(InputRecord(id=uid, kind="wsi", status="skipped", reason=reason))
            continue
        own = name if first.setdefault(name, uid) == uid else files[0]  # without a table, each its own slide
        who = row.patient if row and row.patient else own
        patient = _known(plan, key, "patient", who, f"patient {who}")
        slide = _known(plan, key, "slide", own, files[0])
        label = classes.index(row.label) if row and row.label is not None else None
        plan.units.append(Unit(uid, "wsi", files, slide, patient, label, site=row.site if row else None))
    _assign(plan.units, cfg)
    _fingerprints(plan, key, stamps)
    return plan


def _same_name(first: dict[str, str], name: str, uid: str) -> str | None:
    """Why input ``uid`` is skipped where an input taken before it (``first``: name -> input) has its name (its
    file's stem) as a label table names them (None: it is the first): the table's row names one input, and which
    of them it means is not told."""
    kept = first.setdefault(name, uid)
    return None if kept == uid else f"its name is that of input {kept}, taken first (by path): a label table names one"


def _dicom_labels(cfg: DicomIngestConfig) -> tuple[dict[str, LabelRow], dict[str, list[int]], list[str]]:
    """A generic table (series or patient -> label), or RSNA per-slice multi-labels keyed by SOPInstanceUID."""
    text = _label_text(cfg)
    if text is not None and is_rsna_csv(text):
        return {}, read_rsna_csv(text, source=cfg.labels or "labels"), ["no hemorrhage", "hemorrhage"]
    table, classes = label_table(text, cfg.labels)
    return table, {}, classes


def _skip(plan: Plan, uid: str, reason: str) -> None:
    plan.skipped.append(InputRecord(id=uid, kind="dicom", status="skipped", reason=reason))


COPY = "a copy of a slice another file holds (the same SOP instance): read from that one"
NO_PATIENT = "no PatientID: its study stands for its patient (a patient's other studies may be in other splits)"
HEADER_BYTES = 64 << 10  # a CT/MR header is a few kB; the pixels follow it


def source_headers(loc: str) -> tuple[list, str | None]:
    """A file's DICOM headers, from the first bytes of an ``s3://`` object when they hold them (so the pixels are
    not downloaded twice: here and when the series is rendered); else from the whole file."""
    return read_header(loc, lambda f: read_headers(f, name=loc), HEADER_BYTES, usable=lambda r: not r[1])


def plan_dicom(cfg: DicomIngestConfig, key: bytes) -> Plan:
    """One unit per series, files found by content; other files and unusable series are skipped with a reason.

    With RSNA labels every slice carries its 6-way vector and the series label is ``any`` over its slices.
    """
    table, rsna, classes = _dicom_labels(cfg)
    plan = Plan(units=[], classes=classes, multilabel=list(RSNA_SUBTYPES) if rsna else None)
    headers, named = [], set()
    numeric = {patient_key(k): row for k, row in table.items()}
    stamps = listing(cfg.sources)
    locations = list(stamps)
    for loc, (found, reason) in zip(locations, map_headers(source_headers, locations), strict=True):
        uid = _known(plan, key, "source", loc, loc)
        if reason:
            _skip(plan, uid, reason)
        headers += found
    for series in group_series(headers):
        named |= {series.series_uid, patient_key(series.patient_id)}
        for copy in series.copies:  # accounted for: the slice it holds comes from another file
            _skip(plan, _known(plan, key, "source", copy, copy), COPY)
        where = os.path.dirname(series.slices[0].path)
        sid = _known(plan, key, "series", series.series_uid, f"series {series.series_uid} in {where}")
        if any(s.burned_in for s in series.slices) and not cfg.allow_burned_in:
            _skip(plan, sid, "BurnedInAnnotation=YES (text in the pixels may identify the patient); --allow-burned-in")
            continue
        slice_labels = [rsna.get(s.sop_uid) for s in series.slices] if rsna else None
        # a spreadsheet drops a numeric id's leading zeros (006388 -> 6388): matched as the number it is
        row = table.get(series.series_uid) or numeric.get(patient_key(series.patient_id))
        if (table and row is None) or (rsna and not any(slice_labels or [])):
            _skip(plan, sid, "not in the label table")
            continue
        label = classes.index(row.label) if row and row.label is not None else None
        if slice_labels:
            label = max((v[0] for v in slice_labels if v), default=0)
        names = [s.instance_name for s in series.slices]
        # no PatientID (a de-identification that blanked it): its study stands for its patient, where every such
        # series was one patient, all in one split
        blank = not series.patient_id.strip()
        who = f"study {series.study_uid}" if blank else series.patient_id
        meta = {
            "study": _known(plan, key, "study", series.study_uid, f"study {series.study_uid}"),
            "modality": series.modality,
            "warnings": [*series.warnings, *_unlabelled(slice_labels, cfg.mode), *[NO_PATIENT] * blank],
            "frames": [s.frame for s in series.slices],
            # a multi-frame CT's (or an enhanced image's) rescale to HU per frame, read here once rather than with
            # each frame's pixels; in the fingerprint, it tells the series from one ingested before frames were
            # windowed in HU (a re-run names those as changed: --replace-changed ingests them again)
            **({"rescale": [s.rescale for s in series.slices]} if any(s.rescale for s in series.slices) else {}),
            "slice_labels": slice_labels,
            # each slice's pseudonym: a slice's sample is named by it, and the private map by its SOP instance
            "images": [_known(plan, key, "image", name, f"instance {name}") for name in names],
        }
        unit = Unit(
            id=sid,
            kind="dicom",
            sources=[s.path for s in series.slices],
            item=sid,
            patient=_known(plan, key, "patient", who, f"patient {who}"),
            label=label,
            meta=meta,
            site=row.site if row else None,
        )
        plan.units.append(unit)
    _unmatched(plan, key, {k for k in table if patient_key(k) not in named}, cfg.labels)
    _assign(plan.units, cfg)
    _fingerprints(plan, key, stamps)
    return plan


def _unlabelled(slice_labels: list | None, mode: str) -> list[str]:
    """The warning of a series some of whose slices the RSNA table has no row for (paper 003 counted 78,546 such
    files): their pixels still serve their neighbours, but none is taken for a negative."""
    if not slice_labels or not (k := sum(v is None for v in slice_labels)):
        return []
    what = "no sample of their own" if mode == "slice" else "the series' labels are its other slices'"
    return [f"{k} of {len(slice_labels)} slice(s) not in the label table: {what}"]


def _boxes(cfg: ImagesIngestConfig) -> tuple[dict[str, str], dict[str, list]]:
    """Boxes by image stem: YOLO label files (``stem -> location``, parsed per image) or CSV pixel boxes."""
    if not cfg.boxes:
        return {}, {}
    if cfg.boxes.lower().endswith(".csv"):
        return {}, csv_boxes(table_text(storage.get_bytes(cfg.boxes), cfg.boxes), cfg.boxes)
    return {stem(loc): loc for loc in expand([cfg.boxes], (".txt",))}, {}


def _image_skip(plan: Plan, uid: str, reason: str, status: str = "skipped") -> None:
    plan.skipped.append(InputRecord(id=uid, kind="image", status=status, reason=reason))  # type: ignore[arg-type]


def plan_images(cfg: ImagesIngestConfig, key: bytes) -> Plan:
    """Image files to units: one per image (class folders or a label CSV), or one per patient sequence.

    ``layout: auto`` reads the label file: a per-slice table means sequences, another CSV means csv, none
    means class folders (the class is the image's folder name; each image is its own patient).
    """
    text = _label_text(cfg)
    layout = cfg.layout
    if layout == "auto":
        layout = "sequences" if text and is_slice_table(text) else "csv" if text else "folders"
    if layout == "sequences":
        return _plan_sequences(cfg, key, text)
    if cfg.mode != "slice":
        raise ValueError(f"--mode {cfg.mode} makes sequences, but the layout is {layout} (no per-slice table)")
    if layout == "csv" and text is None:
        raise ValueError("layout csv needs --labels: a CSV with image,label[,patient]")
    stamps = listing(cfg.sources)
    files = list(stamps)
    table: dict[str, LabelRow] = {}
    if layout == "csv":
        rows, _ = label_table(text, cfg.labels)
        table = {stem(r.item): r for r in rows.values()}
        classes = class_names(list(table.values()))
    else:
        folders = {loc.rsplit("/", 1)[0] for loc in files if loc.lower().endswith(IMAGE_EXTS)}
        classes = class_names([LabelRow(f"folder {f}", f.rsplit("/", 1)[-1], None) for f in sorted(folders)])
    yolo, pixel_boxes = _boxes(cfg)
    plan = Plan(units=[], classes=classes)
    if layout == "folders" and len(classes) == 1:  # a classifier is refused one class
        plan.notes.append(f"warning: one class, {classes[0]}: each image's folder names its class (give the folder "
                          "that holds the class folders)")  # fmt: skip
    _unmatched(plan, key, set(table) - {stem(loc) for loc in files if loc.lower().endswith(IMAGE_EXTS)}, cfg.labels)
    first: dict[str, str] = {}  # a name of the label table -> the first image of that name
    for loc in files:
        uid = _known(plan, key, "source", loc, loc)
        if not loc.lower().endswith(IMAGE_EXTS):
            _image_skip(plan, uid, f"not an image file (extension {os.path.splitext(loc)[1].lower() or 'none'})")
            continue
        name = stem(loc)
        row = table.get(name)
        if layout == "csv" and (reason := "not in the label table" if row is None else _same_name(first, name, uid)):
            _image_skip(plan, uid, reason)
            continue
        meta: dict = {"pixel_boxes": pixel_boxes.get(name, [])}
        if name in yolo:
            try:
                meta["yolo"] = [b.as_list() for b in yolo_boxes(storage.get_bytes(yolo[name]).decode(), "YOLO file")]
            except ValueError as exc:
                _image_skip(plan, uid, f"boxes: {exc}", "failed")
                continue
        label = None if row and row.label is None else classes.index(row.label if row else loc.rsplit("/", 2)[-2])
        who = row.patient if row and row.patient else loc
        patient, item = _known(plan, key, "patient", who, f"patient {who}"), _known(plan, key, "image", loc, loc)
        plan.units.append(Unit(uid, "image", [loc], item, patient, label, meta=meta, site=row.site if row else None))
    _fingerprints(plan, key, stamps)  # before copies: an image copied since is no change to it
    skip = functools.partial(_image_skip, plan)
    linked = place_copies(plan.units, cfg, stamps, classes, skip) if cfg.duplicates != "apart" else {}
    _assign(plan.units, cfg, linked)
    return plan


def _slice_gaps(numbers: list[int]) -> list[str]:
    missing = sorted(set(range(numbers[0], numbers[-1] + 1)) - set(numbers))
    return [f"slice numbers skip {len(missing)} value(s) between {numbers[0]} and {numbers[-1]}"] if missing else []


def _plan_sequences(cfg: ImagesIngestConfig, key: bytes, text: str | None) -> Plan:
    """One unit per patient: numbered slice images under a folder naming a patient of the per-slice table,
    ordered by slice number. Masks, other windows' folders, unknown patients and duplicates are skipped."""
    if text is None:
        raise ValueError(
            "layout sequences needs --labels: a per-slice table "
            "(CT-ICH hemorrhage_diagnosis.csv, or patient,slice,label)"
        )
    table, subtypes = read_slice_table(text, cfg.labels or "labels")
    known = {p for p, _ in table}
    classes = ["no hemorrhage", "hemorrhage"] if subtypes else ["negative", "positive"]
    plan = Plan(units=[], classes=classes, multilabel=list(RSNA_SUBTYPES) if subtypes else None)
    groups: dict[str, dict[int, str]] = {}
    stamps = listing(cfg.sources)
    for loc in stamps:
        uid = _known(plan, key, "source", loc, loc)
        folders = loc.split("/")[:-1]
        number = slice_number(stem(loc))
        patient = next((patient_key(f) for f in reversed(folders) if patient_key(f) in known), None)
        if not loc.lower().endswith(IMAGE_EXTS):
            reason = f"not an image file (extension {os.path.splitext(loc)[1].lower() or 'none'})"
        elif number is None:
            reason = "not a slice image: its name is not a slice number (a mask or another file)"
        elif cfg.slice_folder and folders[-1] != cfg.slice_folder:
            reason = f"outside the slice folder {cfg.slice_folder!r}"
        elif patient is None:
            reason = "no folder above it names a patient of the label table"
        elif (patient, number) not in table:
            reason = f"slice {number} of its patient is not in the label table"
        elif number in groups.get(patient, {}):
            reason = f"duplicate slice {number} of its patient (several window folders? pick one: --slice-folder)"
        else:
            groups.setdefault(patient, {})[number] = loc
            continue
        _image_skip(plan, uid, reason)
    _unmatched(plan, key, known - set(groups), cfg.labels)
    for patient, slices in sorted(groups.items()):
        numbers = sorted(slices)
        vectors = [table[patient, n] if subtypes else table[patient, n][:1] for n in numbers]
        unlisted = sum(1 for p, n in table if p == patient and n not in slices)
        warnings = _slice_gaps(numbers) + ([f"{unlisted} slice(s) of the table have no image"] if unlisted else [])
        sid = _known(plan, key, "series", patient, os.path.dirname(slices[numbers[0]]))
        files = [slices[n] for n in numbers]
        images = [_known(plan, key, "image", f, f) for f in files]  # a slice's sample is named by its file's
        meta = {"warnings": warnings, "slice_labels": vectors, "numbers": numbers, "images": images}
        label = max(v[0] for v in vectors)  # the patient is positive when any slice is
        who = _known(plan, key, "patient", patient, f"patient {patient}")
        plan.units.append(Unit(sid, "sequence", files, sid, who, label, meta=meta))
    _assign(plan.units, cfg)
    _fingerprints(plan, key, stamps)
    return plan


def make_plan(kind: str, cfg: IngestConfig, key: bytes) -> Plan:
    """The plan of ``tessera ingest KIND``: what the driver decides before any pixel is read."""
    planners = {"wsi": plan_wsi, "dicom": plan_dicom, "images": plan_images}
    if kind not in planners:
        raise ValueError(f"unknown ingest kind {kind!r}")
    planner, config = planners[kind], CONFIGS[kind]
    if not isinstance(cfg, config):
        raise TypeError(f"ingest {kind} takes a {config.__name__}, not a {type(cfg).__name__}")
    model = read_models(cfg)
    plan = planner(cfg, key)
    plan.model = model
    plan.notes += split_notes(cfg.split, [(u.patient, u.split) for u in plan.units])
    return plan
