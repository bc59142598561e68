"""``tessera ingest``'s command line: the options of each kind and the config they make.

Defaults live in one place, the stage's pydantic model (:mod:`ingest.config`): an option the user did not type is
left out of the config, and its help shows the model's default.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cluster.errors import TesseraError

KINDS = {
    "wsi": "whole-slide images (OpenSlide formats)",
    "dicom": "DICOM series (CT/MR)",
    "images": "JPEG/PNG images: class folders, a label CSV, or per-patient slice folders",
}


def config_class(kind: str):
    """The pydantic model of ``tessera ingest KIND``."""
    from ingest.config import CONFIGS

    return CONFIGS[kind]


def _shown(field: str, value) -> str:
    """A model default as the user would type it on the command line."""
    if field == "shard_size" and value % (1 << 30) == 0:
        return f"{value >> 30}GB"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _options(parser: argparse.ArgumentParser, cls):
    """``add(flag, help, **kw)``: an option whose value, when typed, sets the model field of the same name, and
    whose help ends with that field's default (unless the default is None: the help says what that means)."""

    def add(flag: str, help_: str, **kw) -> None:
        field = flag.lstrip("-").replace("-", "_")
        info = cls.model_fields[field]
        default = info.get_default(call_default_factory=True)
        if default is not None and not kw.get("action"):
            help_ = f"{help_} (default: {_shown(field, default)})"
        parser.add_argument(flag, help=help_, default=argparse.SUPPRESS, **kw)

    return add


def add_ingest_parser(sub, fn) -> None:
    """``tessera ingest wsi|dicom|images`` and their options (one shared set, then each kind's own)."""
    ing = sub.add_parser("ingest", help="turn slides, DICOM series or image folders into WebDataset shards")
    kinds = ing.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, help_ in KINDS.items():
        k = kinds.add_parser(kind, help=help_)
        add = _options(k, config_class(kind))
        k.add_argument("src", nargs="+", help="files, directories, globs or s3:// prefixes")
        k.add_argument("--out", required=True, help="dataset prefix: a directory or s3://bucket/path")
        add(
            "--labels",
            "label CSV: STRIP AI, RSNA (ID,Label), CT-ICH per-slice, or slide|image|series|patient,label; without "
            "a label column (STRIP AI's test.csv, slide|image|series,patient) the inputs it names and their "
            "patients, unlabelled, for `tessera predict`",
        )
        add("--split", "patient-level split fractions")
        add("--seed", "split seed", type=int)
        add(
            "--split-balance",
            "where each class's patients left over from rounding go: the splits furthest below their fraction of "
            "all patients (overall), or by the class's own remainders, ties to the first split (per_class: datasets "
            "made before overall was; small ones could leave a split empty); a dataset at --out keeps its own",
            choices=["overall", "per_class"],
        )
        add(
            "--hold-out-sites",
            "comma-separated sites (the label table's center_id or site column) whose patients make up the test "
            "split alone: a test on centres the model never saw; the others are split by the other fractions",
        )
        add("--shard-size", "target shard size (e.g. 1GB, 256MB)")
        add("--format", "image encoding", choices=["jpeg", "jpg", "png"])
        add("--quality", "JPEG quality, 1-100", type=int)
        add("--store-size", "resize tiles/slices to this many px before encoding", type=int)
        add("--workers", "ingest actors (default: the cluster's CPUs)", type=int)
        if kind != "dicom":
            add(
                "--gpus-per-worker",
                "GPUs each actor holds for the run's models (--segment sam, --background-model, --detector); 0: CPU",
                type=float,
            )
        if kind != "wsi":
            add("--read-ahead", "files on s3:// each worker downloads ahead of their use (0: one at a time)", type=int)
        add(
            "--outage-wait-s",
            "seconds a worker waits for a store that stopped answering before the run stops, keeping what it staged",
            type=float,
        )
        add(
            "--overwrite",
            "replace a complete dataset at --out made from other inputs or options (without it such a run is "
            "refused, and one with the same inputs and options does nothing)",
            action="store_true",
        )
        add(
            "--retry-failed",
            "ingest the failed inputs of the complete dataset at --out again, adding their shards to it (the "
            "dataset's own shards stay as they are)",
            action="store_true",
        )
        add(
            "--append",
            "add the inputs among SRC that the complete dataset at --out does not hold (new slides, new label rows), "
            "keeping its inputs, splits and shards; new patients go to the splits furthest below their fractions",
            action="store_true",
        )
        add(
            "--replace-changed",
            "ingest again the inputs of the complete dataset at --out whose files changed since (a slide rescanned "
            "in place) or whose label did (a corrected diagnosis): their old samples leave it, and the shards that "
            "held them are written anew without them",
            action="store_true",
        )
        k.add_argument(
            "--dry-run",
            action="store_true",
            help="list what would be ingested (per split and class) and what skipped and why, and (wsi) open local "
            "slides' headers: level, resolution, tile grid, failures; read no pixels, "
            "write nothing",
        )
        if kind == "wsi":
            add("--tile-size", "tile size in px at the chosen resolution", type=int)
            add("--stride", "tile stride in px (default: the tile size)", type=int)
            add("--mpp", "microns per pixel to tile at (default: level 0)", type=float)
            add("--magnification", "objective magnification to tile at, e.g. 20", type=float)
            add("--region-tiles", "tiles per unit of work within a slide", type=int)
            add(
                "--pen-marks",
                "pen marks on the glass not to take for tissue, by colour: any of green, blue, black, red, comma "
                "separated (e.g. green,blue,black); red only on tissue without red cells, whose colour it has",
            )
            add("--pen-max", "the most of a tile's area pen marks may cover for it to be cut", type=float)
            add(
                "--color-profile",
                "a slide's embedded ICC colour profile (Aperio GT450, Philips, DICOM WSI often embed one): apply "
                "converts its tiles to sRGB, so that scanners' colours agree; ignore keeps its scanner's RGB and warns",
                choices=["ignore", "apply"],
            )
            k.add_argument(
                "--no-fetch-ahead",
                dest="fetch_ahead",
                action="store_false",
                default=argparse.SUPPRESS,
                help="a worker downloads a slide on s3:// only when it starts on it (by default it downloads its "
                "next slide while it cuts the current one, holding two slides on its disk)",
            )
            add(
                "--background-model",
                "a tile classifier: TorchScript file or Tessera export folder (local or s3://), a training run "
                "(runs:/RUN_ID, or the bare id) or a registered model (models:/NAME/VERSION, models:/NAME/latest, "
                "models:/NAME@ALIAS)",
            )
            add("--background-threshold", "drop tiles with P(background) >= this", type=float)
            add("--tissue-threshold", "minimum tissue fraction", type=float)
        else:
            add("--mode", "what one sample holds", choices=["slice", "center", "series"])
            add("--neighbours", "slices each side (slice, center modes)", type=int)
            add("--frames", "slices per sample in series mode", type=int)
        if kind == "dicom":
            add("--windows", "CT windows stacked as channels")
            add("--allow-burned-in", "ingest files marked BurnedInAnnotation=YES", action="store_true")
        if kind == "images":
            add(
                "--layout",
                "class folders, a label CSV, or patient slice folders (auto: from --labels)",
                choices=["auto", "folders", "csv", "sequences"],
            )
            add(
                "--mpp",
                "microns per pixel of the images as they are (tiles cut from slides elsewhere); recorded per sample",
                type=float,
            )
            add("--boxes", "bounding boxes: a folder of YOLO .txt files or image,x_min,...,y_max CSV")
            add(
                "--detector",
                "find each image's boxes with a detector (paper 004's first stage, where there are no boxes): a "
                "YOLO TorchScript export (`yolo export format=torchscript`), local, s3:// or runs:/RUN/PATH; or a "
                "detector `tessera train` trained (task detect): its run id or models:/NAME/VERSION",
            )
            add("--detect-confidence", "keep the detector's boxes scoring above this", type=float)
            add("--detect-iou", "suppress the detector's boxes overlapping a better one by this IoU", type=float)
            add("--crop", "one sample per box, cropped around it", action="store_true")
            add("--crop-margin", "crop margin as a fraction of the box", type=float)
            add(
                "--segment",
                "segment each box's lesion and black out the rest of its crop (needs --crop)",
                choices=["none", "grabcut", "sam"],
            )
            add("--sam-model", "SAM checkpoint for --segment sam: a local folder or a hub name")
            add("--grayscale", "make every image grey first", action="store_true")
            add("--median", "median filter of this odd size in px first (0: none)", type=int)
            add("--slice-folder", "sequences: only slices in folders of this name (e.g. brain)")
            add("--images-per-task", "single images per unit of work", type=int)
            add(
                "--duplicates",
                "single images with the same bytes: in one split (together); the first of them alone (drop); or "
                "each on its own (apart, as datasets made before)",
                choices=["together", "drop", "apart"],
            )
            add(
                "--near-copies",
                "also keep in one split the images whose pictures are near the same (saved again resized or "
                "re-encoded): at most this many bits of 64 apart by a perceptual hash, e.g. 6 (0: bytes only; every "
                "image is read and decoded before the run)",
                type=int,
            )
        k.set_defaults(fn=fn, kind=kind)


def ingest_config(args):
    """The ingest stage's config from the options the user typed; invalid ones are named as the flags typed."""
    from pydantic import ValidationError

    cls = config_class(args.kind)
    given = {name: value for name, value in vars(args).items() if name in cls.model_fields}
    if given.get("format") == "jpeg":
        given["format"] = "jpg"
    for listed in ("windows", "pen_marks", "hold_out_sites"):
        if isinstance(given.get(listed), str):
            given[listed] = [v for v in given[listed].split(",") if v and v != "none"]  # as its help shows "none"
    try:
        return cls(sources=args.src, **given)
    except ValidationError as exc:
        raise TesseraError("invalid ingest options: " + "; ".join(map(_problem, exc.errors()))) from None


def _problem(error: dict) -> str:
    """One validation error as the user typed it: the flag, or none for a rule across options."""
    msg = error["msg"].removeprefix("Value error, ")
    if not error["loc"]:
        return msg
    return f"--{'-'.join(map(str, error['loc'])).replace('_', '-')}: {msg}"


def private_map(settings, out: str, *also: str | None) -> Path:
    """The private map of the dataset at ``out``, in the state directory of whoever ingested it: named after
    the dataset's URL, a local one made absolute (``./ds`` and ``/home/me/ds/`` are one dataset). ``also``: other
    spellings of the URL (the manifest's, as its ingest was given it). The first map that is there (a map named
    before names were made absolute goes by the URL as given), or the one ``out`` would have."""

    def path(url: str) -> Path:
        name = url.replace("://", "_").replace("/", "_")
        return settings.state / "private" / f"{name}.sources.json"

    given = [out, *(u for u in also if u)]
    urls = [u.rstrip("/") if "://" in u else os.path.abspath(u) for u in given] + given
    return next((path(u) for u in urls if path(u).exists()), path(urls[0]))


def keep_private(settings, out: str):
    """Where the private map (pseudonym -> the source, patient or label row it stands for) goes: a private (0700)
    folder of the state directory, never the dataset. New entries join those already there (pseudonyms are keyed
    hashes of what they stand for, so an entry never changes meaning): a dry run or a run over other sources
    keeps what an earlier run recorded."""

    def save(mapping: dict[str, str]) -> Path:
        path = private_map(settings, out)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(path.parent, 0o700)
        known = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(known | mapping, indent=1))
        return path

    return save


def ingest_dry_run(kind: str, cfg, on_private) -> int:
    """The driver's plan of an ingest, printed: the same listing, labels, headers and splits as a run, and for
    slides on local disk their headers (level, resolution, tile grid; which would fail). Only the private
    pseudonym map is written (as a run writes it), for the user to look up what the ids stand for."""
    from ingest.config import pseudonym_key
    from ingest.describe import describe_plan
    from ingest.lock import lock_line
    from ingest.model_files import recording
    from ingest.plan import make_plan
    from ingest.rerun import dry_run_line, recorded_balance

    cfg = recorded_balance(cfg)
    plan = make_plan(kind, cfg, pseudonym_key())
    cfg, model_line = recording(cfg, plan.model)
    line = dry_run_line(kind, plan, cfg)  # first: --append keeps the splits of the inputs the dataset holds
    print(f"dry run: ingest {kind} into {cfg.out} (nothing written there)")
    if model_line:
        print(model_line)
    busy = lock_line(cfg.out)
    if busy:
        print(busy)
    print("\n".join(describe_plan(plan)))
    for note in [line] if line else plan.notes:  # a dataset already there keeps its splits
        print(note)
    if kind == "wsi":
        from ingest.preflight import check_slides

        model_um = plan.model.tile_um if plan.model else None
        print("\n".join(check_slides(plan.units, cfg, model_um=model_um)))
    if plan.skipped or plan.unmatched:
        print(f"the inputs behind these pseudonyms: {on_private(plan.private)} (private to you)")
    return 0
