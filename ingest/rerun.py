"""A run whose destination already holds a complete dataset: it does nothing when the dataset was made from the
same inputs with the same options, and is refused when it would replace a different one (``--overwrite``
replaces it). Shards other runs were trained on are not swapped from under them by a command run again by mistake.

Inputs are compared by pseudonym (their location), label, patient and split, not by content: a slide replaced in
place under the same name needs ``--overwrite``.
"""

from __future__ import annotations

from ingest.config import IngestConfig, dataset_options
from ingest.plan import Plan
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


def dry_run_line(kind: str, plan: Plan, cfg: IngestConfig) -> str | None:
    """What ``--dry-run`` says about a dataset already at the destination (None: there is none)."""
    try:
        same = decide(kind, plan, cfg)
    except ValueError as exc:
        return f"a run would be refused: {exc}"
    return f"{cfg.out} already holds this dataset (made {same.created}): a run would do nothing" if same else None
