"""``tessera predict``: a trained run's selected model on a dataset with or without labels, into tables."""

from __future__ import annotations

import json
import os
from pathlib import Path


def add_predict_parser(sub) -> None:
    from cluster.cli_evaluate import add_run_arguments

    pr = sub.add_parser(
        "predict",
        help="a run's selected model on a dataset, labelled or not: a table of calls per sample, slide, patient...",
        description="The run's exported model (the registered one) on SPLIT of DATASET, distributed over the "
        "recipe's workers (or KEY=VALUE's), as `tessera evaluate` runs it but for inputs without labels too (a "
        "dataset ingested without a label table). Writes one CSV per level (each sample, and each slide, patient "
        "or series the recipe aggregates to) with the call and a probability per class, into the run "
        "(predictions/NAME/) and into --out.",
    )
    add_run_arguments(pr)
    pr.add_argument("--dataset", help="the dataset's URL (default: the run's own)")
    pr.add_argument("--split", help="the split to predict (default: the dataset's only split, or test)")
    pr.add_argument("--name", help="the tables' folder in the run (default: the split's name; external_<split>)")
    pr.add_argument("--out", help="a folder or s3:// prefix for the tables (default: ./predictions-NAME)")
    pr.add_argument(
        "--reveal",
        action="store_true",
        help="name patients, slides, series and images as they were before ingest (from the private map that "
        "`tessera ingest` kept on this machine) in --out's tables, which must then be on local disk; the run's "
        "stay pseudonymous",
    )
    pr.add_argument(
        "--submission",
        metavar="CSV",
        help="also write the calls in their competition's layout, named by their IDs (needs --reveal): a "
        "multi-class run's patient-level probabilities as Mayo Clinic STRIP AI's (patient_id,CE,LAA: a column per "
        "class), a multi-label run of RSNA's six labels its slices' as the RSNA Intracranial Hemorrhage "
        "Detection's (ID,Label: ID_<SOP instance>_<label> rows)",
    )
    pr.add_argument(
        "--heatmaps",
        action="store_true",
        help="also draw each slide's tile probabilities over its preview, a panel per class (slides only): "
        "heatmaps/SLIDE.png in --out and in the run",
    )
    pr.set_defaults(fn=cmd_predict)


def private_names(map_path: Path) -> dict[str, str]:
    """The private map at ``map_path`` (pseudonym -> what it stands for); a clear error where there is none."""
    if not map_path.exists():
        raise ValueError(
            f"--reveal: no private map at {map_path}: the dataset was ingested on another machine or by another "
            "user (`tessera ingest` keeps the map in the state directory of whoever ran it)"
        )
    return json.loads(map_path.read_text())


def revealed_tables(tables: dict[str, str], private: dict[str, str], map_path: Path) -> dict[str, str]:
    """``tables`` with their pseudonyms named from ``private`` (the map at ``map_path``), and a note of the
    pseudonyms it lacks."""
    from training.predictions import reveal

    out = {}
    for level, table in tables.items():
        out[level], unknown = reveal(table, private)
        if unknown:
            print(f"note: {level} table: {unknown} pseudonym(s) are not in {map_path}; left as they are")
    return out


def cmd_predict(args) -> int:
    from cluster import health
    from cluster.cli import _connect, _settings
    from cluster.cli_ingest import private_map
    from shards import manifest as mf
    from shards import storage
    from training.inference import predict_run
    from training.launch import EVALUATE_KEYS, check_where_overrides
    from training.predictions import row_count

    # where it runs, the operating point its calls are also made at (chosen on the run's validation split), and
    # the calibration of its probabilities (fitted there too)
    point = ("eval.operating_point", "eval.positive", "eval.calibration")
    check_where_overrides(args.overrides, (*EVALUATE_KEYS, *point), "tessera predict")  # before anything connects
    if args.reveal and args.out and args.out.startswith("s3://"):
        raise ValueError("--reveal: the names behind the pseudonyms stay off object storage; give a local --out")
    if args.submission and (not args.reveal or args.submission.startswith("s3://")):
        raise ValueError("--submission: it names patients or images by their IDs; give --reveal and a local file")
    s = _settings()
    _connect(s)
    health.require(s, "mlflow")
    options = {"dataset": args.dataset, "split": args.split, "name": args.name, "overrides": args.overrides}
    options["check"] = submission_layout if args.submission else None  # refused before any work
    outcome = predict_run(args.run, s.mlflow_url, s.checkpoints, **options)
    tables, private = outcome.tables, None
    if args.reveal:
        map_path = private_map(s, outcome.dataset, outcome.made_as)
        private = private_names(map_path)
        tables = revealed_tables(tables, private, map_path)
    out = args.out or f"predictions-{outcome.name}"
    out = out if out.startswith("s3://") else str(Path(out).resolve())
    labels = "with their labels" if outcome.labelled else "without labels"
    print(f"{outcome.samples} samples of the {outcome.split} split of {outcome.dataset} ({labels}):")
    rows = {level: row_count(table) for level, table in tables.items()}
    for level, table in tables.items():
        url = storage.join(out, f"predictions_{level}.csv")
        _write(url, table.encode(), args.reveal)
        print(f"  {level}: {rows[level]} row{'' if rows[level] == 1 else 's'} -> {url}")
    if args.submission:
        submission(tables, outcome.checked, args.submission, rows)  # the layout submission_layout picked
        if missing := mf.load(outcome.dataset).not_called(outcome.split):  # what a scorer would find missing
            print(f"warning: the submission calls nothing for {missing} (`tessera dataset {outcome.dataset}`)")
    if args.heatmaps:
        heatmaps(outcome, s.mlflow_url, out, private)
    if outcome.warning:
        print(f"warning: {outcome.warning}")
    print(f"the run keeps them{' (pseudonymous)' if args.reveal else ''}: {outcome.run_id} predictions/{outcome.name}/")
    return 0


def _write(url: str, data: bytes, secret: bool) -> None:
    """``data`` to ``url``; a ``secret`` one (names behind pseudonyms: local) readable by its owner only from the
    start, as the private map is."""
    from shards import storage

    if not secret:
        storage.put_bytes(url, data)
        return
    os.makedirs(os.path.dirname(url), exist_ok=True)
    with os.fdopen(os.open(url, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)
    os.chmod(url, 0o600)  # a file there before keeps its mode through O_TRUNC


def submission_layout(recipe, outputs: list[str], manifest):
    """The competition layout of a run of ``recipe`` whose model has ``outputs``, on the dataset of ``manifest``;
    an error saying why none fits."""
    from training.submissions import layout_for

    try:
        return layout_for(recipe, outputs, manifest.multilabel)
    except ValueError as exc:
        raise ValueError(f"--submission: {exc}") from None


def submission(tables: dict[str, str], layout, path: str, rows: dict[str, int]) -> None:
    """The revealed table of ``layout``'s level in that layout, to ``path`` (readable by its owner only); ``rows``:
    each table's row count."""
    if layout.level not in tables:  # STRIP AI's: the recipe aggregates to patients (checked), but no sample names one
        raise ValueError(f"--submission: no {layout.level} table to write it from (levels: {', '.join(tables)})")
    path, table = str(Path(path).resolve()), tables[layout.level]
    try:
        written = layout.write(table)
    except ValueError as exc:  # the table lacks what the layout names its rows by
        raise ValueError(f"--submission: {exc}") from None
    _write(path, written.encode(), True)
    n = rows[layout.level]
    print(f"  submission ({layout.name}): {n} {layout.item}{'' if n == 1 else 's'} -> {path}")


def heatmaps(outcome, tracking_uri: str, out: str, private: dict[str, str] | None) -> None:
    """Each slide's heatmap into the run (pseudonyms) and into ``out`` (slides named and titled by their files from
    ``private``, the private map, where given), a slide at a time."""
    from shards import storage
    from training.heatmaps import slides_of
    from training.inference import HEATMAPS, PREDICTIONS, log_heatmaps
    from training.predictions import original_name

    table = outcome.tables.get("sample", "")
    names: dict[str, str] = {}
    if private:  # the caller's copies named and titled by the slides' files
        names = {slide: Path(original_name(private[slide])).name for slide in slides_of(table) if slide in private}
        if len(set(names.values())) < len(names):  # files of one name in different folders
            names = {slide: f"{name}_{slide}" for slide, name in names.items()}

    def also(slide: str, png: bytes, draw) -> None:
        name = names.get(slide, slide)
        mine = png if name == slide else draw(name)
        _write(storage.join(out, HEATMAPS, f"{name}.png"), mine, private is not None)

    folder = f"{PREDICTIONS}/{outcome.name}/{HEATMAPS}"
    drawn, note = log_heatmaps(tracking_uri, outcome.run_id, folder, table, outcome.dataset, also)
    if drawn:
        print(f"  heatmaps: {drawn} slide{'' if drawn == 1 else 's'} -> {storage.join(out, HEATMAPS)}/")
    if note:
        print(f"note: {note}")


def add_score_parser(sub) -> None:
    sc = sub.add_parser(
        "score",
        help="score a competition submission against labels (STRIP AI's or RSNA's weighted log loss)",
        description="Score SUBMISSION (as `tessera predict --submission` writes it) as its competition did: "
        "Mayo Clinic STRIP AI's (patient_id and a probability per class) by the weighted multi-class log loss "
        "over its patients, against a table of each patient's label (STRIP AI's train.csv, or patient,label); "
        "RSNA's (ID,Label) by the weighted multi-label log loss over its images, against RSNA's label file. What "
        "the submission calls is scored, and each must have a label; the labels may name more.",
    )
    sc.add_argument("submission", help="the submission CSV (a file or an s3:// URL)")
    sc.add_argument("--labels", required=True, help="the labels CSV (a file or an s3:// URL)")
    sc.set_defaults(fn=cmd_score)


def score_texts(submission: str, labels: str, source: str = "the submission", labels_source: str = "the labels"):
    """``submission`` (CSV text) scored against ``labels`` (CSV text) read by ingest's label readers, as an ingest
    reads them: a table of each slide's or patient's label (STRIP AI's ``train.csv``, or ``patient,label``) for
    STRIP AI's layout, RSNA's label file for RSNA's (:mod:`training.scoring`)."""
    from ingest.labels import is_rsna_csv, read_label_csv, read_rsna_csv
    from training.scoring import layout, patient_labels, score_rsna, score_strip_ai

    if layout(submission, source) == "RSNA":
        if not is_rsna_csv(labels):
            raise ValueError(f"{labels_source}: an RSNA submission is scored against RSNA's label file (ID,Label)")
        return score_rsna(submission, read_rsna_csv(labels, labels_source), source)
    rows = read_label_csv(labels, labels_source)
    return score_strip_ai(submission, patient_labels(rows, labels_source), source)


def cmd_score(args) -> int:
    from ingest.labels import table_text
    from shards import storage

    submission = table_text(storage.get_bytes(args.submission), args.submission)
    labels = table_text(storage.get_bytes(args.labels), args.labels)
    print(score_texts(submission, labels, args.submission, args.labels).line())
    return 0
