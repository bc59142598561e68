"""Patient-level train/val/test assignment (pure)."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable


def parse_fractions(spec: str) -> dict[str, float]:
    """Parse ``train=0.7,val=0.15,test=0.15`` into a dict whose values sum to 1."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if not name or not value:
            raise ValueError(f"bad split {part!r} in {spec!r}; expected name=fraction")
        out[name.strip()] = float(value)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6 or any(v < 0 for v in out.values()):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {spec!r}")
    return out


HELD_OUT = "test"  # the split of the patients of ``--hold-out-sites``


def outside_held_out(fractions: dict[str, float]) -> dict[str, float]:
    """The fractions of the splits other than :data:`HELD_OUT`, scaled to sum 1: what the patients of the other
    sites are split by where some sites are held out (the held-out split holds theirs alone)."""
    rest = {name: f for name, f in fractions.items() if name != HELD_OUT}
    total = sum(rest.values())
    if not total:
        raise ValueError(f"with sites held out in {HELD_OUT!r}, the other splits must have patients: {fractions}")
    return {name: f / total for name, f in rest.items()}


def _by_label(patients: dict[str, int | None], seed: int) -> dict[int | None, list[str]]:
    """Patients grouped by label, each group in the order of a seeded hash (stable, independent of input
    order)."""
    groups: dict[int | None, list[str]] = {}
    for patient, label in patients.items():
        groups.setdefault(label, []).append(patient)
    for members in groups.values():
        members.sort(key=lambda p: hashlib.sha256(f"{seed}:{p}".encode()).hexdigest())
    return groups


def linked_patients(links: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Each patient named in ``links`` (pairs that must share a split: an image held under both) -> the first
    (sorted) patient of all those linked to it, which stands for them in :func:`assign_splits`."""
    parent: dict[str, str] = {}

    def root(p: str) -> str:
        while parent.setdefault(p, p) != p:
            p = parent[p]
        return p

    for a, b in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return {p: root(p) for p in parent}


def assign_splits(
    patients: dict[str, int | None], fractions: dict[str, float], seed: int, balance: str = "overall"
) -> dict[str, str]:
    """Assign each patient to one split, stratified by the patient's label.

    Within each label group patients are ordered by a seeded hash (stable, independent of input order) and cut
    into the splits: each split takes the whole part of its fraction of the group. ``balance`` says where each
    group's patients left over from rounding go: ``overall`` (the default), to the splits furthest below their
    fraction of all patients so far, groups taken in label order, so that small groups do not all send theirs
    to the same split (eight patients of two classes at 0.7/0.15/0.15 gave test none); ``per_class``, by the
    group's own remainders, ties to the split listed first (datasets made before ``overall`` was).
    """
    out: dict[str, str] = {}
    names = list(fractions)
    taken = dict.fromkeys(names, 0)
    groups = _by_label(patients, seed)
    for label in sorted(groups, key=lambda g: (g is not None, g or 0)):
        members = groups[label]
        quotas = [fractions[n] * len(members) for n in names]
        before = [0] * len(names) if balance == "per_class" else [taken[n] for n in names]  # per class: none
        counts = _balanced(quotas, [fractions[n] for n in names], before)
        i = 0
        for name, n in zip(names, counts, strict=True):
            for p in members[i : i + n]:
                out[p] = name
            taken[name] += n
            i += n
    return out


def _balanced(quotas: list[float], fractions: list[float], taken: list[int]) -> list[int]:
    """Each split's whole quota, and one more for each of the splits (of a fraction above 0) furthest below their
    fraction of all patients counted so far with this group's (ties to the split listed first). With ``taken``
    all 0, that is the group's largest remainders: per class."""
    counts = [int(q) for q in quotas]
    left = round(sum(quotas)) - sum(counts)
    total = sum(taken) + round(sum(quotas))
    below = [f * total - (t + c) for f, t, c in zip(fractions, taken, counts, strict=True)]
    order = sorted((i for i, f in enumerate(fractions) if f > 0), key=lambda i: below[i], reverse=True)
    for i in order[:left]:
        counts[i] += 1
    return counts


def empty_splits(fractions: dict[str, float], assigned: Iterable[str]) -> list[str]:
    """The splits of a fraction above 0 that none of ``assigned`` (each patient's split) is in: too few patients
    for the fractions, which a run should say rather than leave a validation or test split missing unsaid."""
    held = set(assigned)
    return [name for name, f in fractions.items() if f > 0 and name not in held]


def split_notes(spec: str, inputs: list[tuple[str, str]]) -> list[str]:
    """Warnings of a run's patient split (``inputs``: each input's patient and split, ``spec`` its ``--split``):
    each split that holds no patient, too few for the fractions; and one patient that holds more than half of ten
    or more inputs, all in one split: a placeholder id (``ANONYMOUS``, ``0``) a de-identification wrote for all."""
    splits = dict(inputs)
    out = [
        f"warning: split {name} holds no patient: {len(splits)} patient(s) are too few for --split {spec}"
        for name in empty_splits(parse_fractions(spec), splits.values())
    ]
    if len(inputs) >= 10 and (top := Counter(p for p, _ in inputs).most_common(1)[0])[1] * 2 > len(inputs):
        out.append(
            f"warning: one patient ({top[0]}) holds {top[1]} of the {len(inputs)} inputs, all in one split: a "
            "placeholder patient id a de-identification wrote for all? Give each its own (a table's patient column)"
        )
    return out


def extend_splits(
    held: dict[str, tuple[str, int | None]], new: dict[str, int | None], fractions: dict[str, float], seed: int
) -> dict[str, str]:
    """Assign patients ``new`` to a dataset whose patients ``held`` (patient -> (split, label)) keep theirs.

    Within each label group the new patients, in seeded hash order, each go to the split furthest below its
    fraction of the group so far (ties to the larger fraction), so a dataset grown a few patients at a time stays
    near its fractions instead of sending every small batch to the largest split.
    """
    counts = Counter((label, split) for split, label in held.values())
    out: dict[str, str] = {}
    for label, members in _by_label(new, seed).items():
        total = sum(counts[label, name] for name in fractions)
        for patient in members:
            total += 1
            name = max(fractions, key=lambda n: (fractions[n] * total - counts[label, n], fractions[n]))
            counts[label, name] += 1
            out[patient] = name
    return out
