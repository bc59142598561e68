"""A run whose destination already holds a complete dataset: it does nothing when the dataset was made from the
same inputs with the same options, and is refused when it would replace a different one (``--overwrite``
replaces it). Shards other runs were trained on are not swapped from under them by a command run again by mistake.

Inputs are compared by pseudonym (their location), label, patient, split and fingerprint (their files' sizes and
modification times or ETags): a slide replaced in place, or a series that gained a file, is a difference.

Two runs keep the dataset and add to it: ``--retry-failed`` ingests the inputs it records as failed again, and
``--append`` the inputs among the sources that it does not hold (a folder that grew, a label table with new rows).
Their shards are numbered after the dataset's, which stay as they are, and the manifest, written last, takes in
the new records and shards. ``--replace-changed`` ingests again the inputs whose files (or label, the patient the
same) changed; the shards that held their old samples are written anew without them, under new numbers, and
leave the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from ingest.config import IngestConfig, changed_options
from ingest.describe import id_list
from ingest.plan import Plan, held_out
from ingest.rendering import amend_note
from ingest.splits import HELD_OUT, extend_splits, outside_held_out, parse_fractions
from ingest.units import Unit
from shards import manifest as mf
from shards import provenance, storage


def existing(out: str) -> mf.Manifest | None:
    """The complete dataset at ``out`` (its manifest is the commit point), or None."""
    return mf.load(out) if storage.exists(storage.join(out, mf.MANIFEST_NAME)) else None


def recorded_balance(cfg: IngestConfig) -> IngestConfig:
    """``cfg`` with the split balance (``split_balance``) of the complete dataset at ``cfg.out`` where the user
    gave none: a run on a dataset made before patients were balanced overall splits them as the dataset did, so
    that the same command finds it made and ``--retry-failed`` or ``--replace-changed`` amend it, where the new
    default would move patients between its splits and have the run refused."""
    if "split_balance" in cfg.model_fields_set or cfg.overwrite:
        return cfg
    if not storage.exists(storage.join(cfg.out, mf.MANIFEST_NAME)):
        return cfg
    recorded = cfg.recorded_options(mf.load_head(cfg.out)[0].config)["split_balance"]
    return cfg.model_copy(update={"split_balance": recorded})


def _added(previous: mf.Manifest, plan: Plan) -> list[Unit]:
    """Units of ``plan`` the dataset does not hold: new inputs, or inputs it holds as settled before they had a
    patient (not in the label table then)."""
    held = {r.id: r for r in previous.inputs}
    return [u for u in plan.units if u.id not in held or held[u.id].patient is None]


def _changed(previous: mf.Manifest, plan: Plan) -> list[str]:
    """Inputs the dataset holds whose files changed since (another fingerprint; a dataset made before inputs had
    one has none to compare). Failed inputs hold no samples: a file mended since is what ``--retry-failed`` is
    for."""
    held = {r.id: r.fingerprint for r in previous.inputs if r.fingerprint and r.status != "failed"}
    return sorted(u.id for u in plan.units if u.id in held and u.fingerprint != held[u.id])


def _relabelled(previous: mf.Manifest, plan: Plan) -> list[str]:
    """Inputs the dataset holds whose label changed, their patient the same (a diagnosis corrected in the label
    table): ``--replace-changed`` ingests them again like inputs whose files changed."""
    held = {r.id: r for r in previous.inputs if r.patient and r.status != "failed"}
    return sorted(u.id for u in plan.units if (r := held.get(u.id)) and r.patient == u.patient and r.label != u.label)


def differences(
    previous: mf.Manifest, kind: str, plan: Plan, cfg: IngestConfig, splits: dict[str, str] | None = None
) -> list[str]:
    """How the dataset this run would make differs from ``previous``, in a few words each (empty: the same).
    With ``cfg.append``, the inputs it would add are no difference; ``splits`` (unit id -> split) overrides the
    plan's."""
    out = [f"kind {previous.kind} -> {kind}"] if previous.kind != kind else []
    if changed := changed_options(cfg.recorded_options(previous.config), cfg.output_options()):
        out.append(f"options {changed}")
    if previous.classes != plan.classes:
        out.append(f"classes {previous.classes} -> {plan.classes}")
    adding = {u.id for u in _added(previous, plan)} if cfg.append else set()
    old = {r.id: (r.patient, r.label, r.split) for r in previous.inputs if r.id not in adding}
    new = {u.id: (u.patient, u.label, (splits or {}).get(u.id, u.split)) for u in plan.units}
    new |= {r.id: (r.patient, r.label, r.split) for r in plan.skipped}
    new = {k: v for k, v in new.items() if k in old or not cfg.append}
    if added := len(new.keys() - old.keys()):
        out.append(f"{added} input(s) it does not hold (--append adds them)")
    if gone := len(old.keys() - new.keys()):
        out.append(f"{gone} of its inputs not among the sources")
    relabelled = set(_relabelled(previous, plan)) if cfg.replace_changed else set()  # only patient and split count
    if moved := sum(old[k][::2] != new[k][::2] if k in relabelled else old[k] != new[k] for k in old.keys() & new):
        out.append(f"{moved} input(s) with another label, patient or split")
    if (changed := _changed(previous, plan)) and not cfg.replace_changed:
        out.append(f"{len(changed)} input(s) whose files changed since it was made: {id_list(changed)}")
    return out


def _kept_splits(previous: mf.Manifest, plan: Plan, cfg: IngestConfig) -> dict[str, str]:
    """Each unit's split under ``--append``: inputs the dataset holds keep theirs; inputs it adds join their
    patient's split, or a copy's (an image of the same bytes, ``meta["copies"]``), or (a new patient) the split
    :func:`extend_splits` picks. The plan's own assignment would move patients it holds."""
    records = {r.id: r for r in previous.inputs}
    held = {r.patient: (r.split, r.label) for r in previous.inputs if r.patient and r.split}
    adding = _added(previous, plan)
    ids = {u.id for u in adding}
    out = {u.id: records[u.id].split for u in plan.units if u.id not in ids}
    new = {u.patient: u.label for u in adding if u.patient not in held}
    fractions, kept_out, counted = parse_fractions(cfg.split), {u.patient for u in held_out(plan.units, cfg)}, held
    if cfg.hold_out_sites:  # a new patient of a held-out site joins theirs; the others, the other splits
        fractions = outside_held_out(fractions)
        counted = {p: (split, label) for p, (split, label) in held.items() if split != HELD_OUT}
    fresh = extend_splits(counted, {p: label for p, label in new.items() if p not in kept_out}, fractions, cfg.seed)
    fresh |= dict.fromkeys(kept_out & new.keys(), HELD_OUT)
    for u in adding:  # a copy of an image it holds, or adds just before, joins that image's split
        copies = [out[c] for c in u.meta.get("copies", []) if c in out]
        out[u.id] = held[u.patient][0] if u.patient in held else copies[0] if copies else fresh[u.patient]
    return out


def decide(kind: str, plan: Plan, cfg: IngestConfig) -> mf.Manifest | None:
    """The complete dataset already at ``cfg.out`` that this run would make again (or, with ``append`` or
    ``retry_failed``, add to), or None to run. Raises when a different dataset is there and ``cfg.overwrite`` is
    not set."""
    previous = None if cfg.overwrite else existing(cfg.out)
    if previous is None:
        return None
    if cfg.append and previous.kind == kind:
        kept = _kept_splits(previous, plan, cfg)
        for unit in plan.units:
            unit.split = kept[unit.id]
    diff = differences(previous, kind, plan, cfg)
    if diff:
        how = "--overwrite replaces it"
        if remedy := _remedy(previous, kind, plan, cfg):
            how = f"{remedy} (the rest as they are), {how}"
        raise ValueError(
            f"{cfg.out} already holds a complete dataset ({len(previous.inputs)} inputs, made {previous.created}) "
            f"that this run would replace: {'; '.join(diff)}. {how}"
        )
    return previous


REMEDIES = (
    ({"append": True}, "--append adds the new inputs to it"),
    ({"replace_changed": True}, "--replace-changed ingests the changed inputs again"),
    ({"append": True, "replace_changed": True}, "--append --replace-changed adds the new and redoes the changed"),
)


def _remedy(previous: mf.Manifest, kind: str, plan: Plan, cfg: IngestConfig) -> str | None:
    """Which of ``--append`` and ``--replace-changed`` (not given already) would take this run: its other inputs
    the dataset holds unchanged, no new class or option. (Without ``--append``, a held input the plan's own split
    assignment moves counts as a difference.)"""
    if previous.kind != kind:
        return None
    for update, how in REMEDIES:
        if all(getattr(cfg, k) for k in update):
            continue  # given already: this run was refused with it
        trial = cfg.model_copy(update=update)
        splits = _kept_splits(previous, plan, trial) if trial.append else None
        if not differences(previous, kind, plan, trial, splits):
            return how
    return None


@dataclass
class Additions:
    """What a run adds to a complete dataset: inputs it does not hold (``--append``), its failed inputs
    (``--retry-failed``), the records of such inputs that planning settles without a worker (not a slide, not
    in the label table, a header that cannot be read), and its inputs whose files changed (``--replace-changed``)."""

    added: list[Unit]
    retried: list[Unit]
    settled: list[mf.InputRecord]
    replaced: list[Unit] = field(default_factory=list)

    @property
    def units(self) -> list[Unit]:
        return self.added + self.retried + self.replaced

    def __bool__(self) -> bool:
        return bool(self.added or self.retried or self.settled or self.replaced)

    def counts(self, previous: mf.Manifest) -> tuple[int, int, int]:
        """``(added, retried, replaced)``: inputs new to ``previous`` (or held without a patient), its failed ones,
        and its inputs whose files changed."""
        failed = {r.id for r in previous.inputs if r.status == "failed"}
        ids = {u.id for u in self.added + self.retried} | {r.id for r in self.settled}
        retried = len(ids & failed)
        return len(ids) - retried, retried, len(self.replaced)


def to_ingest(previous: mf.Manifest, plan: Plan, cfg: IngestConfig) -> Additions:
    """What this run adds to the dataset ``previous`` (nothing unless ``cfg.append`` or ``cfg.retry_failed``)."""
    held = {r.id: r for r in previous.inputs}
    failed = {k for k, r in held.items() if r.status == "failed"} if cfg.retry_failed else set()
    settled = [r for r in plan.skipped if (cfg.append and r.id not in held) or r.id in failed]
    added = _added(previous, plan) if cfg.append else []
    changed = {*_changed(previous, plan), *_relabelled(previous, plan)} if cfg.replace_changed else set()
    replaced = [u for u in plan.units if u.id in changed]
    return Additions(added, [u for u in plan.units if u.id in failed], settled, replaced)


def amended(
    previous: mf.Manifest,
    additions: Additions,
    plan: Plan,
    records: list[mf.InputRecord],
    splits: dict[str, mf.SplitInfo],
    previous_sha256: str | None = None,
    rewritten: dict[str, dict[str, mf.ShardInfo | None]] | None = None,
    rendered_with: dict[str, str] | None = None,
) -> mf.Manifest:
    """``previous`` (``previous_sha256``: its version) with the records of ``additions`` (``records``: its
    units', from the workers) and their shards (``splits``, numbered after its own) added, and each shard of
    ``rewritten`` (``{split: {old name: new shard or None}}``: those that held replaced inputs' samples) swapped
    for its rewrite; every other record and shard stays as it was. The amendment records the code that ran it
    and ``rendered_with``, what rendered its samples."""
    rewritten = rewritten or {}
    renamed = {
        f"{s}/{old}": new and f"{s}/{new.name}" for s, shards in rewritten.items() for old, new in shards.items()
    }
    held = {r.id: r for r in previous.inputs}
    for rid, rec in held.items():
        if any(name in renamed for name in rec.shards):
            shards = sorted(n for n in (renamed.get(name, name) for name in rec.shards) if n)
            held[rid] = replace(rec, shards=shards)
    fresh = {r.id: r for r in [*additions.settled, *records]}
    joined = {}
    for split in sorted({*previous.splits, *splits}):
        swap = rewritten.get(split, {})
        shards = [x for x in previous.splits.get(split, mf.SplitInfo()).shards if x.name not in swap]
        shards += splits.get(split, mf.SplitInfo()).shards + [x for x in swap.values() if x]
        joined[split] = mf.SplitInfo(num_samples=sum(x.samples for x in shards), shards=shards)
    added, retried, replaced = additions.counts(previous)
    now = datetime.now(UTC).isoformat(timespec="seconds")
    change = mf.Amendment(
        time=now,
        added=added,
        retried=retried,
        replaced=replaced,
        previous_sha256=previous_sha256,
        made_by=provenance.made_by(),
        rendered_with=rendered_with,
    )
    return previous.model_copy(
        update={
            "splits": joined,
            "inputs": sorted((held | fresh).values(), key=lambda r: r.id),
            "unmatched_labels": plan.unmatched,
            "amended": [*previous.amended, change],
        }
    )


def dry_run_line(kind: str, plan: Plan, cfg: IngestConfig) -> str | None:
    """What ``--dry-run`` says about a dataset already at the destination (None: there is none)."""
    try:
        same = decide(kind, plan, cfg)
    except ValueError as exc:
        return f"a run would be refused: {exc}"
    if same is None:
        return None
    there = f"{cfg.out} already holds this dataset (made {same.created})"
    adds = to_ingest(same, plan, cfg)
    if not adds:
        return f"{there}: a run would do nothing"
    added, retried, replaced = adds.counts(same)
    what = [f"add {added} input(s)"] if added else []
    what += [f"try its {retried} failed input(s) again"] if retried else []
    if replaced:
        held = len(same.shards_holding({u.id for u in adds.replaced}))
        what.append(f"ingest its {replaced} changed input(s) again, rewriting the {held} shard(s) that held them")
    line = f"{there}: a run would {' and '.join(what)}, adding their shards to it"
    note = amend_note(same, cfg)  # as the run says it: where the samples it adds would be rendered otherwise
    return f"{note}\n{line}" if note else line
