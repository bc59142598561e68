"""``tessera dataset URL``: what a dataset holds and how it came to be; ``--verify`` checks every shard's bytes."""

from __future__ import annotations

from collections import Counter


def add_dataset_parser(sub) -> None:
    ds = sub.add_parser(
        "dataset",
        help="what an ingested dataset holds (splits, classes, inputs, history); --verify checks its shards, "
        "--compact merges its small ones",
        description="Reads the dataset's manifest: its version (the sha256 training runs record), each split's "
        "samples, shards, inputs, patients and inputs per class, the inputs by status (the skipped and failed ones "
        "counted by reason), and each run that amended it (--append, --retry-failed, --replace-changed, --compact). "
        "Pseudonyms only: no file name is printed.",
    )
    ds.add_argument("url", metavar="URL", help="the dataset (local folder or s3:// prefix), as ingest's --out")
    ds.add_argument(
        "--verify",
        action="store_true",
        help="also read every shard: present, with its index, size, sha256, sample count and classes as listed; "
        "exits 1 when one is not",
    )
    ds.add_argument(
        "--compact",
        action="store_true",
        help="merge each split's shards under half the dataset's --shard-size into shards of about that size, byte "
        "for byte (a dataset grown by many small --append runs); with --dry-run, say which",
    )
    ds.add_argument("--dry-run", action="store_true", help="with --compact: say what it would merge, write nothing")
    ds.set_defaults(fn=cmd_dataset)


def dataset_lines(manifest, data: bytes) -> list[str]:
    """The terminal's account of a dataset (``manifest``, ``data``: its bytes as stored)."""
    from ingest.describe import site_lines, sites_note
    from ingest.splits import empty_splits, parse_fractions
    from shards import manifest as mf
    from shards import provenance

    lines = [
        f"{manifest.dataset}: {manifest.kind}, made {manifest.created}, version {mf.sha256_of(data)}",
        f"made with: {made_with(manifest.config)}",
        f"made by: {manifest.made_by or 'not recorded (before Tessera recorded it)'}",
        f"rendered with: {provenance.describe_rendering(manifest.rendered_with)}",
        "classes: " + (", ".join(f"{i} {c}" for i, c in enumerate(manifest.classes)) or "none (unlabelled)"),
    ]
    for split, info in manifest.splits.items():
        held = [r for r in manifest.inputs if r.split == split and r.status == "ingested"]
        per_class = Counter(manifest.classes[r.label] if r.label is not None else "unlabelled" for r in held)
        classes = ", ".join(f"{c} {n}" for c, n in sorted(per_class.items()))
        lines.append(
            f"  {split}: {info.num_samples} samples in {len(info.shards)} shard(s), {len(held)} input(s) of "
            f"{len({r.patient for r in held})} patient(s) ({classes}){sites_note(r.site for r in held)}"
        )
    spec = manifest.config.get("split")
    for name in empty_splits(parse_fractions(spec), manifest.splits) if spec else []:
        lines.append(f"  {name}: none (--split {spec} names it, but no patient's samples went there)")
    lines += site_lines([r for r in manifest.inputs if r.status == "ingested"], manifest.classes)
    lines.append("inputs: " + ", ".join(f"{status} {n}" for status, n in manifest.counts().items()))
    lines += [f"  {status} {line}" for status in ("skipped", "failed") for line in manifest.reasons(status)]
    if warned := manifest.warned():
        lines += ["warnings (inputs):", *(f"  {line}" for line in warned)]
    if sha := manifest.config.get("background_model_sha256"):  # paper 000's second stage: which model, what it did
        dropped = sum(r.background_dropped or 0 for r in manifest.inputs)
        lines.append(
            f"background model: {manifest.config.get('background_model')} (sha256 {sha[:16]}), dropped {dropped} "
            f"tiles at P(background) >= {manifest.config.get('background_threshold')}"
        )
    if sha := manifest.config.get("detector_sha256"):  # paper 004's first stage: which detector, at what score
        c = manifest.config
        lines.append(
            f"detector: {c.get('detector')} (sha256 {sha[:16]}), its boxes scoring above {c.get('detect_confidence')} "
            f"kept, overlaps above IoU {c.get('detect_iou')} suppressed"
        )
    for a in manifest.amended:
        by = f", by {a.made_by}" if a.made_by and a.made_by != manifest.made_by else ""
        if a.rendered_with and not manifest.rendered_with:  # the dataset's own was not recorded: this one whole
            by += f", rendered with {provenance.describe_rendering(a.rendered_with)}"
        elif a.rendered_with and (changed := provenance.differences(manifest.rendered_with or {}, a.rendered_with)):
            by += f", rendered otherwise: {'; '.join(changed)}"
        lines.append(f"  amended {a.time}: {a.describe()} (from version {str(a.previous_sha256)[:12]}{by})")
    return lines


def made_with(recorded: dict) -> str:
    """The options that shaped a dataset (tile size, resolution, windows...), as ``key=value``: what another dataset
    must match for a model of this one (its place, the background model and the shard size said elsewhere or
    not at all; options left unset left out)."""
    from ingest.config import dataset_options

    said = ["shard_size", "background_model_sha256", "background_threshold"]  # the place: not a dataset option
    said += ["detector_sha256", "detect_confidence", "detect_iou"]  # the detector's line
    said += ["sam_model"] if recorded.get("segment") != "sam" else []  # options of a choice not taken
    said += ["frames"] if recorded.get("mode") != "series" else []
    said += ["pen_max"] if not recorded.get("pen_marks") else []
    options = {k: v for k, v in dataset_options(recorded).items() if k not in said and _is_set(v)}
    return " ".join(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in options.items())


def _is_set(value) -> bool:
    """An option given a value (0 is one; None, False and an empty list leave it unset)."""
    return value is not None and value is not False and value != []


def cmd_dataset(args) -> int:
    from ingest.lock import lock_line
    from ingest.packing import leftovers
    from shards import manifest as mf
    from shards.verify import verify_dataset

    if args.compact:
        _compact(args.url, args.dry_run)
    manifest, data = mf.load_with_bytes(args.url)
    print("\n".join(dataset_lines(manifest, data)))
    busy = lock_line(args.url)  # a run adding to it: this version is about to be replaced
    if busy:
        print(busy)
    if not args.verify:
        return 0
    problems = verify_dataset(args.url, manifest)
    for problem in problems:
        print(f"problem: {problem}")
    files, spools = leftovers(args.url, manifest)
    for url in files + spools:  # harmless to readers; an ingest writing now makes some, the next one deletes them
        print(f"not listed: {url}")
    if files or spools:
        what = "an ingest's work before its commit, or a stopped run's leftovers; the next ingest deletes them"
        print(f"{len(files) + len(spools)} shard(s), preview(s) or spool folder(s) the manifest does not list: {what}")
    shards = sum(len(info.shards) for info in manifest.splits.values())
    print(f"verified {shards} shard(s): {'all as listed' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _compact(url: str, dry_run: bool) -> None:
    from ingest.compact import compact

    _, groups = compact(url, dry_run)
    merged = sum(len(g) for gs in groups.values() for g in gs)
    into = sum(len(gs) for gs in groups.values())
    if not groups:
        print(f"{url}: no two shards of a split under half its shard size: nothing to merge")
    else:
        per_split = ", ".join(f"{s}: {sum(len(g) for g in gs)} into {len(gs)}" for s, gs in groups.items())
        done = "would merge" if dry_run else "merged"
        print(f"{url}: {done} {merged} small shard(s) into {into} ({per_split})")
