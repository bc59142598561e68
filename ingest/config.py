"""One pydantic model per ingest stage; unknown fields fail fast with their name."""

from __future__ import annotations

import os
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ingest.splits import outside_held_out, parse_fractions
from ingest.windowing import WINDOWS
from shards import storage

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*$", re.I)


def parse_bytes(value: int | str) -> int:
    """``"1GB"``, ``"512MiB"``, ``"200k"`` or an int to bytes (binary multiples)."""
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"not a size: {value!r} (e.g. 1GB, 256MB, 1048576)")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


RUN_ONLY = ("workers", "gpus_per_worker", "max_attempts", "outage_wait_s", "fetch_ahead", "read_ahead")
# recorded, but not compared between runs: the same background model or detector (its sha256 is compared) may be
# named from another place
NOT_COMPARED = (*RUN_ONLY, "background_model", "detector", "out")  # out: the dataset is the one found there
RERUN_MODES = ("overwrite", "retry_failed", "append", "replace_changed")  # what a run does with a dataset already there


def dataset_options(public: dict) -> dict:
    """A recorded configuration (:meth:`IngestConfig.public`) less what does not change the dataset (how many
    workers, attempts): a run resumes, or finds its dataset already made, whatever those are."""
    return {k: v for k, v in public.items() if k not in NOT_COMPARED}


def changed_options(before: dict, now: dict) -> str:
    """``key old -> new, ...`` for the :func:`dataset_options` that differ (empty: none)."""
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    return ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in keys)


class IngestConfig(BaseModel):
    """What every ingest shares: destination, labels, splits, shard size and image encoding."""

    model_config = ConfigDict(extra="forbid")

    sources: list[str] = Field(min_length=1)
    out: str
    labels: str | None = None
    split: str = "train=0.7,val=0.15,test=0.15"
    seed: int = 0
    # where each class's patients left over from rounding the fractions go (ingest.splits.assign_splits): overall,
    # to the splits furthest below their fraction of all patients; per_class, what datasets made before it did.
    # Not given, a run on a dataset already at ``out`` takes the dataset's (ingest.rerun.recorded_balance)
    split_balance: Literal["overall", "per_class"] = "overall"
    # sites (the label table's center_id or site column) whose patients make up split ``test`` alone: a test of
    # centres the model never saw (their scanners, stains, populations); the other patients are split by the
    # other fractions, scaled to sum 1
    hold_out_sites: list[str] = Field(default_factory=list)
    shard_size: int = 1 << 30
    format: Literal["jpg", "png"] = "jpg"
    quality: int = Field(90, ge=1, le=100)
    workers: int | None = Field(None, ge=1)
    # GPUs each ingest actor holds, for the models a run applies (--segment sam, --background-model) on a GPU
    # cluster; 0: they run on the actors' CPUs (Ray hides the GPUs of an actor that holds none)
    gpus_per_worker: float = Field(0.0, ge=0)
    max_attempts: int = Field(3, ge=1)
    # files on s3:// (a series' slices, a batch's images) each worker downloads ahead of their use, in threads: each
    # request's round trip overlaps the others' and the work (ingest.read_ahead); 0: one at a time, as used
    read_ahead: int = Field(16, ge=0)
    # how long a worker that finds its store down waits for it to answer again before the run stops (keeping
    # what it staged); a blip of the store costs a night's run neither its inputs nor its place
    outage_wait_s: float = Field(300.0, ge=0)
    overwrite: bool = False  # replace a complete dataset at ``out`` made from other inputs or options
    # ingest the failed inputs of the complete dataset at ``out`` again (a slide re-copied after a cut-short
    # transfer, a read that timed out): their shards are added beside the dataset's, which stay as they are
    retry_failed: bool = False
    # add the inputs among ``sources`` that the complete dataset at ``out`` does not hold (new slides, or ones
    # skipped before as not in the label table), keeping its inputs, splits and shards; none there: a plain run
    append: bool = False
    # ingest again the inputs of the complete dataset at ``out`` whose files changed since (a slide rescanned in
    # place, a series that gained a file) or whose label did (the patient the same): their old samples leave its
    # shards, which are written anew without them
    replace_changed: bool = False

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        parse_fractions(v)
        return v

    @model_validator(mode="after")
    def _sites_from_labels(self) -> IngestConfig:
        if self.hold_out_sites:
            if not self.labels:
                raise ValueError("hold_out_sites names sites of a label table's center_id or site column: --labels")
            outside_held_out(parse_fractions(self.split))
        return self

    @model_validator(mode="after")
    def _gpus_for_a_model(self) -> IngestConfig:
        if self.gpus_per_worker and not self.uses_models():
            raise ValueError(
                "gpus_per_worker is for the models a run applies (--segment sam, --background-model, --detector); "
                "this run "
                "names none, and its actors would hold GPUs they never use"
            )
        return self

    def uses_models(self) -> bool:
        """Whether the actors apply a neural network (what a GPU would run): none here; the kinds that can say."""
        return False

    @model_validator(mode="after")
    def _one_rerun_mode(self) -> IngestConfig:
        if self.overwrite and (self.retry_failed or self.append or self.replace_changed):
            raise ValueError(
                "overwrite ingests every input again into a new dataset: give it without retry_failed, append or "
                "replace_changed, which keep the dataset there"
            )
        return self

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, v: int | str) -> int:
        return parse_bytes(v)

    @field_validator("out", "labels")
    @classmethod
    def _anchored(cls, v: str | None) -> str | None:
        return None if v is None else storage.anchored(v)  # the same place on every worker as here

    def public(self) -> dict:
        """The configuration as recorded in the manifest: source locations are left out (they may identify)."""
        return self.model_dump(exclude=set(RERUN_MODES) | {"sources", "labels"})

    def output_options(self) -> dict:
        """:func:`dataset_options` of this configuration."""
        return dataset_options(self.public())

    def recorded_options(self, recorded: dict) -> dict:
        """:func:`dataset_options` of a configuration (:meth:`public`) an earlier version recorded, with the fields
        added since at their defaults: a new field's default does what the versions before it did, so a dataset
        they made is not refused for it (``--append``, ``--retry-failed``, staged work resumed)."""
        fields = type(self).model_fields
        defaults = {k: fields[k].get_default(call_default_factory=True) for k in self.public()}
        return dataset_options(defaults | {"split_balance": "per_class"} | recorded)  # before: per class alone


class WsiIngestConfig(IngestConfig):
    """Whole-slide tiling (paper 000: 600 px tiles kept at >= 30 % tissue)."""

    tile_size: int = Field(600, gt=0)
    stride: int | None = Field(None, gt=0)
    store_size: int | None = Field(None, gt=0)
    mpp: float | None = Field(None, gt=0)
    magnification: float | None = Field(None, gt=0)
    tissue_threshold: float = Field(0.30, ge=0.0, le=1.0)
    # pen marks of these colours are not tissue (ingest.ink), and a tile more than pen_max of which they cover is
    # not cut; none by default: ink is told by colour, and red ink has the colour of red cells
    pen_marks: list[Literal["green", "blue", "black", "red"]] = Field(default_factory=list)
    pen_max: float = Field(0.05, ge=0.0, le=1.0)
    # a slide's embedded ICC colour profile (ingest.colour): apply converts its pixels to sRGB (each tile, and the
    # mask's image) so that scanners' RGB agree; ignore keeps them as stored and warns of the slides with one
    color_profile: Literal["ignore", "apply"] = "ignore"
    region_tiles: int = Field(256, ge=1)
    # each worker downloads its next slide on s3:// while it cuts the current one (local disk: two slides a
    # worker, as its source cache keeps anyway); off: a worker waits on the network for each slide it starts
    fetch_ahead: bool = True
    background_model: str | None = None
    # set by the run from the model it read: what the dataset records and a resumed run must match (a reference
    # such as models:/NAME/latest may name another model by then)
    background_model_sha256: str | None = None
    background_threshold: float = Field(0.5, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_resolution(self) -> WsiIngestConfig:
        # Else every slide would fail in its worker with the same error, after the run had started.
        if self.mpp is not None and self.magnification is not None:
            raise ValueError("give mpp or magnification, not both (both choose the resolution to tile at)")
        return self

    def uses_models(self) -> bool:
        return bool(self.background_model)

    @field_validator("background_model")
    @classmethod
    def _model_here(cls, v: str | None) -> str | None:
        return None if v is None else storage.anchored_if_local(v)  # a local file, wherever the driver reads it


class DicomIngestConfig(IngestConfig):
    """DICOM series to windowed slices (paper 003: brain/subdural/soft-tissue windows as RGB)."""

    format: Literal["jpg", "png"] = "png"
    windows: list[str] = Field(default_factory=lambda: ["brain", "subdural", "soft"])
    store_size: int | None = Field(None, gt=0)
    # slice: one sample per slice (+ `neighbours` slices each side as extra images); center: the middle slice and
    # `neighbours` each side (RSNA paper: 5), one sample per series; series: `frames` slices evenly along it.
    mode: Literal["slice", "center", "series"] = "slice"
    neighbours: int = Field(0, ge=0)
    frames: int = Field(16, ge=1)
    allow_burned_in: bool = False

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: list[str]) -> list[str]:
        unknown = [w for w in v if w not in WINDOWS]
        if unknown:
            raise ValueError(f"unknown window(s) {unknown}; known: {sorted(WINDOWS)}")
        if len(v) != 3:  # they are stored as the three channels of a JPEG/PNG
            raise ValueError(f"give exactly 3 windows (the image's RGB channels), got {len(v)}")
        return v


class ImagesIngestConfig(IngestConfig):
    """Plain JPEG/PNG images: class folders or a label CSV (paper 004), or per-patient slice folders with a
    per-slice diagnosis table, as sequences (paper 002's CT-ICH)."""

    # folders: the class is the image's folder; csv: `--labels image,label[,patient]`; sequences: one unit per
    # patient folder of numbered slices, labelled by a per-slice table. auto picks from the label file.
    layout: Literal["auto", "folders", "csv", "sequences"] = "auto"
    store_size: int | None = Field(None, gt=0)
    # µm per pixel of the images as they are (tiles cut from slides elsewhere, e.g. paper 000's background set):
    # each sample records its scale, so a tile classifier trained on them records the width of specimen it saw
    mpp: float | None = Field(None, gt=0)
    boxes: str | None = None  # a folder of YOLO .txt files (matched by image name) or a box CSV
    # Paper 004's first stage where there are no boxes (its classifier's dataset): a detector (a YOLO TorchScript
    # export, or one `tessera train` trained) finds each image's boxes, those scoring above `detect_confidence`
    # (suppressed at `detect_iou`)
    detector: str | None = None
    detector_sha256: str | None = None  # set by the run from the file it read: what the dataset records
    detect_confidence: float = Field(0.25, gt=0.0, lt=1.0)
    detect_iou: float = Field(0.7, gt=0.0, le=1.0)
    crop: bool = False  # one sample per box, cropped (paper 004's detect -> crop); images without boxes stay whole
    crop_margin: float = Field(0.1, ge=0.0, le=1.0)
    # Paper 004's second stage: each box's lesion segmented (GrabCut, or SAM from `sam_model`: a checkpoint folder
    # or a hub name), the crop's pixels outside it black; and its preparation of every image (grey, median filter).
    segment: Literal["none", "grabcut", "sam"] = "none"
    sam_model: str = "facebook/sam-vit-base"
    grayscale: bool = False
    median: int = Field(0, ge=0)  # px, odd; 0: no median filter
    slice_folder: str | None = None  # sequences: only slices in folders of this name (CT-ICH: brain, not bone)
    mode: Literal["slice", "center", "series"] = "slice"
    neighbours: int = Field(0, ge=0)
    frames: int = Field(16, ge=1)
    # Single images go to the workers in runs of this many: one task, one staged part and one record per run
    # rather than per image (a 7,000-image folder is ~110 parts, not 7,000 small objects on S3).
    images_per_task: int = Field(64, ge=1)
    # Single images with the same bytes (ingest.copies): together, their patients linked so that they share a
    # split; drop: the first of them alone, the others skipped; apart: each on its own, as before Tessera looked
    duplicates: Literal["together", "drop", "apart"] = "together"
    # Images whose pictures are near the same (ingest.copies.picture_hash: at most this many of 64 bits apart: saved
    # again resized, re-encoded) kept in one split as copies are; 0: bytes only. Every image is read and decoded.
    near_copies: int = Field(0, ge=0, le=16)

    @model_validator(mode="after")
    def _consistent(self) -> ImagesIngestConfig:
        if self.crop and not (self.boxes or self.detector):
            raise ValueError("crop needs boxes (a YOLO label folder or a box CSV) or a detector")
        if self.boxes and self.detector:
            raise ValueError("give boxes or a detector, not both (each says where every image's boxes are)")
        if self.near_copies and self.duplicates == "apart":
            raise ValueError("near copies are kept together: give --duplicates together (or drop, for byte copies)")
        if self.segment != "none" and not self.crop:
            raise ValueError(f"segment {self.segment} segments the lesion of each box's crop: it needs crop")
        if self.median and self.median % 2 == 0:
            raise ValueError(f"median must be odd (a filter centred on each pixel), got {self.median}")
        if self.layout in ("folders", "csv") and self.mode != "slice":
            raise ValueError(f"mode {self.mode!r} makes sequences; it needs layout sequences (or auto)")
        return self

    def uses_models(self) -> bool:
        return self.segment == "sam" or bool(self.detector)

    @field_validator("sam_model")
    @classmethod
    def _sam_here(cls, v: str) -> str:
        return storage.anchored_if_local(v)  # a checkpoint folder here is one for the workers too, not a hub name

    @field_validator("boxes")
    @classmethod
    def _boxes_here(cls, v: str | None) -> str | None:
        return None if v is None else storage.anchored(v)

    @field_validator("detector")
    @classmethod
    def _detector_here(cls, v: str | None) -> str | None:
        return None if v is None else storage.anchored_if_local(v)

    def public(self) -> dict:
        return {k: v for k, v in super().public().items() if k != "boxes"}

    def recorded_options(self, recorded: dict) -> dict:
        # a dataset made before copies were looked for kept them apart, whatever ``duplicates``' default
        return super().recorded_options({"duplicates": "apart"} | recorded)


# ``tessera ingest KIND``'s configuration model, for the command line and the planner alike.
CONFIGS: dict[str, type[IngestConfig]] = {
    "wsi": WsiIngestConfig,
    "dicom": DicomIngestConfig,
    "images": ImagesIngestConfig,
}


def pseudonym_key() -> bytes:
    """The user's pseudonym key from ``TESSERA_PSEUDONYM_KEY`` or the file in ``TESSERA_PSEUDONYM_KEY_FILE``."""
    key = os.environ.get("TESSERA_PSEUDONYM_KEY")
    if key:
        return key.encode()
    path = os.environ.get("TESSERA_PSEUDONYM_KEY_FILE")
    if path and os.path.exists(path):
        return open(path, "rb").read().strip()
    raise ValueError(  # the user's setting to make, not a fault: the CLI says it without a traceback
        "no pseudonym key: set TESSERA_PSEUDONYM_KEY or TESSERA_PSEUDONYM_KEY_FILE (`tessera up` creates one)"
    )
