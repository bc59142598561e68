"""What an ingest would do, as lines for the terminal (``--dry-run``, a rerun's look at the run before it):
units per split, skipped inputs by reason, warnings, all by pseudonym."""

from __future__ import annotations

from collections import Counter

from ingest.plan import Plan
from shards.schema import site_order

NOUNS = {
    "wsi": ("slide", "slides"),
    "dicom": ("series", "series"),
    "image": ("image", "images"),
    "sequence": ("slice sequence", "slice sequences"),
}
SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
SHOWN_IDS = 5


def sites_note(sites) -> str:
    """``", sites 2, 11"`` for the sites among ``sites`` (None: an input of none), in their order as numbers; empty
    where there are none."""
    named = site_order(sites)
    return f", sites {', '.join(named)}" if named else ""


def describe_plan(plan: Plan) -> list[str]:
    """What an ingest would do, for ``--dry-run``: units per split (patients, classes), the skipped inputs by
    reason and the planning warnings, as pseudonyms (output may reach job logs, which carry no file names; the
    private map has them)."""
    counts: dict[str, Counter] = {}
    patients: dict[str, set[str]] = {}
    for u in plan.units:
        counts.setdefault(u.split or "-", Counter())[u.label] += 1
        patients.setdefault(u.split or "-", set()).add(u.patient)
    kinds = Counter(u.kind for u in plan.units)
    units = ", ".join(f"{n} {NOUNS[kind][n != 1]}" for kind, n in kinds.items())
    lines = [f"{units or 'nothing'} to ingest, {len(plan.skipped)} input(s) skipped"]
    for split, by_label in sorted(counts.items(), key=lambda kv: (SPLIT_ORDER.get(kv[0], 9), kv[0])):
        classes = _by_class(plan.classes, by_label)
        of = sites_note(u.site for u in plan.units if (u.split or "-") == split)
        lines.append(f"  {split}: {sum(by_label.values())} ({classes}) from {len(patients[split])} patient(s){of}")
    if plan.classes:
        lines.append("classes: " + ", ".join(f"{i} {name}" for i, name in enumerate(plan.classes)))
    lines += site_lines(plan.units, plan.classes)
    by_reason: dict[str, list[str]] = {}
    for rec in plan.skipped:
        by_reason.setdefault(rec.reason or "", []).append(rec.id)
    for reason, ids in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"skipped {len(ids)}: {reason}: {id_list(ids)}")
    if plan.unmatched:
        lines.append(f"label rows naming no input found {len(plan.unmatched)}: {id_list(plan.unmatched)}")
    warned: dict[str, list[str]] = {}  # found while planning: slice order and gaps of a series or sequence
    for u in plan.units:
        for warning in u.meta.get("warnings", []):
            warned.setdefault(warning, []).append(u.id)
    lines += [f"warning for {len(ids)}: {warning}: {id_list(ids)}" for warning, ids in warned.items()]
    return lines


def _by_class(classes: list[str], by_label: Counter) -> str:
    """``CE 2, LAA 1`` of a count of inputs by label (None: unlabelled, last)."""
    return ", ".join(
        f"{classes[label] if label is not None else 'unlabelled'} {n}"
        for label, n in sorted(by_label.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))
    )


def site_lines(inputs, classes: list[str]) -> list[str]:
    """A line per site the label table named for ``inputs`` (planned units, or a manifest's input records): its
    inputs by class and its patients, to choose the centres that ``--hold-out-sites`` holds out (each with
    patients of every class, for a test of each)."""
    named = site_order(u.site for u in inputs)
    lines = ["sites:"] if named else []
    for site in named:
        there = [u for u in inputs if u.site == site]
        by_class = _by_class(classes, Counter(u.label for u in there))
        lines.append(f"  {site}: {len(there)} ({by_class}) from {len({u.patient for u in there})} patient(s)")
    return lines


def id_list(ids: list[str]) -> str:
    """The first :data:`SHOWN_IDS` pseudonyms and how many more, for a line of the terminal."""
    return ", ".join(ids[:SHOWN_IDS]) + (f" and {len(ids) - SHOWN_IDS} more" if len(ids) > SHOWN_IDS else "")
