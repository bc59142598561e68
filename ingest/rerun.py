"""A run whose destination already holds a complete dataset: it does nothing when the dataset was made from the
same inputs with the same options, and is refused when it would replace a different one (``--overwrite``
replaces it). Shards other runs were trained on are not swapped from under them by a command run again by mistake.

Inputs are compared by pseudonym (their location), label, patient and split, not by content: a slide replaced in
place under the same name needs ``--overwrite``.

``--retry-failed`` ingests the failed inputs of such a dataset again, alone: their shards are numbered after the
dataset's, which stay as they are, and the manifest, written last, takes in the new records and shards.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ingest.config import IngestConfig, dataset_options
from ingest.plan import Plan
from ingest.units import Unit
from shards import manifest as mf
from shards import storage


def existing(out: str) -> mf.Manifest | None:
    """The complete dataset at ``out`` (its manifest is the commit point), or None."""
    return mf.load(out) if storage.exists(storage.join(out, mf.MANIFEST_NAME)) else None


def differences(previous: mf.Manifest, kind: str, plan: Plan, cfg: IngestConfig) -> list[str]:
    """How the dataset this run would make differs from ``previous``, in a few words each (empty: the same)."""
    out = [f"kind {previous.kind} -> {kind}"] if previous.kind != kind else []
    before = dataset_options(previous.config)
    now = cfg.output_options()
    if changed := sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k)):
        out.append("options " + ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in changed))
    if previous.classes != plan.classes:
        out.append(f"classes {previous.classes} -> {plan.classes}")
    old = {r.id: (r.patient, r.label, r.split) for r in previous.inputs}
    new = {u.id: (u.patient, u.label, u.split) for u in plan.units}
    new |= {r.id: (r.patient, r.label, r.split) for r in plan.skipped}
    if added := len(new.keys() - old.keys()):
        out.append(f"{added} input(s) it does not hold")
    if gone := len(old.keys() - new.keys()):
        out.append(f"{gone} of its inputs not among the sources")
    if moved := sum(old[k] != new[k] for k in old.keys() & new.keys()):
        out.append(f"{moved} input(s) with another label, patient or split")
    return out


def decide(kind: str, plan: Plan, cfg: IngestConfig) -> mf.Manifest | None:
    """The complete dataset already at ``cfg.out`` that this run would make again (nothing to do), or None to
    run. Raises when a different dataset is there and ``cfg.overwrite`` is not set."""
    previous = None if cfg.overwrite else existing(cfg.out)
    if previous is None:
        return None
    diff = differences(previous, kind, plan, cfg)
    if diff:
        raise ValueError(
            f"{cfg.out} already holds a complete dataset ({len(previous.inputs)} inputs, made {previous.created}) "
            f"that this run would replace: {'; '.join(diff)}. --overwrite replaces it"
        )
    return previous


def failed_again(previous: mf.Manifest, plan: Plan) -> list[Unit]:
    """The units of ``plan`` whose input ``previous`` records as failed: what ``--retry-failed`` ingests."""
    failed = {r.id for r in previous.inputs if r.status == "failed"}
    return [u for u in plan.units if u.id in failed]


def amended(
    previous: mf.Manifest, plan: Plan, records: list[mf.InputRecord], splits: dict[str, mf.SplitInfo]
) -> mf.Manifest:
    """``previous`` with the retried inputs' new ``records`` and their shards (numbered after its own) added.

    A failed input that planning now settles without a worker (skipped, or failed reading its header) takes the
    plan's record; every other record and shard stays as it was.
    """
    fresh = {r.id: r for r in plan.skipped if r.id in {p.id for p in previous.inputs if p.status == "failed"}}
    fresh |= {r.id: r for r in records}
    joined = dict(previous.splits)
    for split, info in splits.items():
        old = joined.get(split, mf.SplitInfo())
        joined[split] = mf.SplitInfo(num_samples=old.num_samples + info.num_samples, shards=old.shards + info.shards)
    return previous.model_copy(
        update={
            "splits": dict(sorted(joined.items())),
            "inputs": sorted((fresh.get(r.id, r) for r in previous.inputs), key=lambda r: r.id),
            "unmatched_labels": plan.unmatched,
            "retried": [*previous.retried, datetime.now(UTC).isoformat(timespec="seconds")],
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
    held = f"{cfg.out} already holds this dataset (made {same.created})"
    if cfg.retry_failed and (retry := failed_again(same, plan)):
        return f"{held}: a run would ingest its {len(retry)} failed input(s) again and add their shards"
    return f"{held}: a run would do nothing"
