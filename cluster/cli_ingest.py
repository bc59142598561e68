"""``tessera ingest``'s command line: the options of each kind and the config they make."""

from __future__ import annotations

import json
import os

from cluster.errors import TesseraError


def add_ingest_parser(sub, fn) -> None:
    """``tessera ingest wsi|dicom|images`` and their options (one shared set, then each kind's own)."""
    from ingest.config import ImagesIngestConfig, WsiIngestConfig

    ing = sub.add_parser("ingest", help="turn slides, DICOM series or image folders into WebDataset shards")
    kinds = ing.add_subparsers(dest="kind", required=True, metavar="KIND")
    for kind, help_ in (
        ("wsi", "whole-slide images (OpenSlide formats)"),
        ("dicom", "DICOM series (CT/MR)"),
        ("images", "JPEG/PNG images: class folders, a label CSV, or per-patient slice folders"),
    ):
        k = kinds.add_parser(kind, help=help_)
        k.add_argument("src", nargs="+", help="files, directories, globs or s3:// prefixes")
        k.add_argument("--out", required=True, help="dataset prefix: a directory or s3://bucket/path")
        k.add_argument(
            "--labels",
            help="label CSV: STRIP AI, RSNA (ID,Label), CT-ICH per-slice, or slide|image|series|patient,label",
        )
        k.add_argument("--split", default="train=0.7,val=0.15,test=0.15", help="patient-level split fractions")
        k.add_argument("--seed", type=int, default=0, help="split seed")
        k.add_argument("--shard-size", default="1GB", help="target shard size (e.g. 1GB, 256MB)")
        k.add_argument("--format", choices=["jpeg", "jpg", "png"], help="image encoding")
        k.add_argument("--store-size", type=int, help="resize tiles/slices to this many px before encoding")
        k.add_argument("--workers", type=int, help="ingest actors (default: the cluster's CPUs)")
        if kind == "wsi":
            k.add_argument("--tile-size", type=int, default=600, help="tile size in px at the chosen resolution")
            k.add_argument("--stride", type=int, help="tile stride in px (default: the tile size)")
            k.add_argument("--mpp", type=float, help="microns per pixel to tile at (default: level 0)")
            k.add_argument("--magnification", type=float, help="objective magnification to tile at, e.g. 20")
            k.add_argument(
                "--region-tiles",
                type=int,
                default=WsiIngestConfig.model_fields["region_tiles"].default,
                help="tiles per unit of work within a slide",
            )
            k.add_argument("--background-model", help="TorchScript file or Tessera export folder of a tile classifier")
            k.add_argument(
                "--background-threshold", type=float, default=0.5, help="drop tiles with P(background) >= this"
            )
            k.add_argument("--tissue-threshold", type=float, default=0.30, help="minimum tissue fraction")
        else:
            k.add_argument(
                "--mode", choices=["slice", "center", "series"], default="slice", help="what one sample holds"
            )
            k.add_argument("--neighbours", type=int, default=0, help="slices each side (slice, center modes)")
            k.add_argument("--frames", type=int, default=16, help="slices per sample in series mode")
        if kind == "dicom":
            k.add_argument("--windows", default="brain,subdural,soft", help="CT windows stacked as channels")
            k.add_argument("--allow-burned-in", action="store_true", help="ingest files marked BurnedInAnnotation=YES")
        if kind == "images":
            k.add_argument(
                "--layout",
                choices=["auto", "folders", "csv", "sequences"],
                default="auto",
                help="class folders, a label CSV, or patient slice folders (auto: from --labels)",
            )
            k.add_argument("--boxes", help="bounding boxes: a folder of YOLO .txt files or image,x_min,...,y_max CSV")
            k.add_argument("--crop", action="store_true", help="one sample per box, cropped around it")
            k.add_argument("--crop-margin", type=float, default=0.1, help="crop margin as a fraction of the box")
            k.add_argument("--slice-folder", help="sequences: only slices in folders of this name (e.g. brain)")
            k.add_argument(
                "--images-per-task",
                type=int,
                default=ImagesIngestConfig.model_fields["images_per_task"].default,
                help="single images per unit of work",
            )
        k.set_defaults(fn=fn, kind=kind)


def ingest_config(args):
    """The ingest stage's config from the command line; invalid options are named as the flags the user typed."""
    from pydantic import ValidationError

    from ingest.config import DicomIngestConfig, ImagesIngestConfig, WsiIngestConfig

    common = {
        "sources": args.src,
        "out": args.out,
        "labels": args.labels,
        "split": args.split,
        "seed": args.seed,
        "shard_size": args.shard_size,
        "workers": args.workers,
        "store_size": args.store_size,
    }
    if args.format:
        common["format"] = args.format
    try:
        if args.kind == "wsi":
            return WsiIngestConfig(
                **common,
                tile_size=args.tile_size,
                stride=args.stride,
                mpp=args.mpp,
                magnification=args.magnification,
                region_tiles=args.region_tiles,
                background_model=args.background_model,
                background_threshold=args.background_threshold,
                tissue_threshold=args.tissue_threshold,
            )
        sequences = {"mode": args.mode, "neighbours": args.neighbours, "frames": args.frames}
        if args.kind == "images":
            return ImagesIngestConfig(
                **common,
                **sequences,
                layout=args.layout,
                boxes=args.boxes,
                crop=args.crop,
                crop_margin=args.crop_margin,
                slice_folder=args.slice_folder,
                images_per_task=args.images_per_task,
            )
        return DicomIngestConfig(
            **common,
            **sequences,
            windows=args.windows.split(","),
            allow_burned_in=args.allow_burned_in,
        )
    except ValidationError as exc:
        raise TesseraError(
            "invalid ingest options: "
            + "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors())
        ) from None


def keep_private(settings, out: str):
    """Where the pseudonym -> source mapping goes: a private (0700) folder of the state directory, never the
    dataset."""

    def save(mapping: dict[str, str]) -> None:
        d = settings.state / "private"
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)
        name = out.replace("://", "_").replace("/", "_")
        (d / f"{name}.sources.json").write_text(json.dumps(mapping, indent=1))

    return save
