"""Units of ingest work (one slide, series, image or slice sequence), their regions, and how each becomes samples."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from ingest import lesion
from ingest.config import DicomIngestConfig, ImagesIngestConfig, IngestConfig, WsiIngestConfig
from ingest.decisions import input_fault
from ingest.dicom import slice_rgb
from ingest.images import Box, decode_rgb, normalise, stack_notes
from ingest.model_files import model_device, model_url
from ingest.preview import preview_png, preview_scale
from ingest.read_ahead import ReadAhead
from ingest.sequences import center_indices, even_indices, neighbour_indices
from ingest.slides import open_slide
from ingest.source_cache import SLIDES
from ingest.tissue import colourless
from ingest.wsi import TilePlan, damaged_note, plan_tiles, read_tiles, scale_mismatch
from shards import storage
from shards.local_files import local_copy
from shards.manifest import preview_url
from shards.schema import encode_image, make_sample


@dataclass
class Unit:
    """One input (slide, series, image or slice sequence).

    ``sources`` stay inside the workers; only pseudonyms reach outputs.
    """

    id: str
    kind: str
    sources: list[str]
    item: str
    patient: str
    label: int | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None  # a digest of its files' stamps (see ingest.plan); None before planning
    site: str | None = None  # its centre, as the label table names it (``--hold-out-sites``)

    @property
    def where(self) -> dict[str, str]:
        """What its samples' metadata say of where it was made: its site, where the label table names one
        (evaluation's metrics per centre)."""
        return {"site": self.site} if self.site else {}


@dataclass
class Work:
    """One piece of work: a whole series, one region (a run of planned tiles) of a slide, or a batch of single
    images (``batch``, whose first is ``unit``), each staged as one part."""

    unit: Unit
    index: int = 0
    plan: TilePlan | None = None
    batch: list[Unit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # an image's warnings found making its samples (see _batch_samples)
    left_out: int = 0  # a series' slices, or a region's tiles, that could not be read (sequence_samples, wsi_samples)
    damaged_at: list[tuple[int, int]] = field(default_factory=list)  # level-0 (x, y) of a region's tiles left out

    @property
    def id(self) -> str:
        if self.batch:  # named by its members: a run over more or fewer images makes other batches, not these
            members = hashlib.sha256(" ".join(u.id for u in self.batch).encode()).hexdigest()[:8]
            return f"{self.unit.id}-{members}"
        return f"{self.unit.id}-{self.index:04d}"

    @property
    def fingerprint(self) -> str | None:
        """Its input's fingerprint (a batch: its images'): a staged part of the same id made from other files (a
        slide replaced between a crash and the run that resumes it) is not taken for this one's."""
        if self.batch:
            return hashlib.sha256(" ".join(str(u.fingerprint) for u in self.batch).encode()).hexdigest()[:16]
        return self.unit.fingerprint


def batch_images(units: list[Unit], size: int) -> list[Work]:
    """Single images in runs of ``size`` within a split (a part, so a batch, belongs to one split's shards).

    A run's id names its images, so the same inputs and options give the same pieces of work, and a resumed run
    recognises those already staged; a run resumed over a folder that changed meanwhile (images added, as by
    ``--append``) makes new batches rather than take a staged batch for one with other images.
    """
    by_split: dict[str | None, list[Unit]] = {}
    for u in units:
        by_split.setdefault(u.split, []).append(u)
    return [
        Work(group[k], batch=group[k : k + size]) for group in by_split.values() for k in range(0, len(group), size)
    ]


GREY = "no colour in the slide (stored grey): the tissue mask, read from colour, found no tissue in it"


def plan_slide(unit: Unit, cfg: WsiIngestConfig, background=None) -> tuple[list[Work], list[str]]:
    """Mask and tile one slide, publish its preview, and cut its tiles into regions of ``cfg.region_tiles``; a
    warning where the tiles are of another scale than the ``background`` model's training tiles."""
    reader = open_slide(SLIDES.path(unit.sources))  # downloaded once per worker for all its regions
    pens = {"inks": cfg.pen_marks, "ink_max": cfg.pen_max, "colour": cfg.color_profile}
    try:
        plan = plan_tiles(reader, cfg.tile_size, cfg.mpp, cfg.stride, cfg.tissue_threshold, cfg.magnification, **pens)
    finally:
        reader.close()
    png = preview_png(plan.thumb, plan.mask, plan.mask_downsample, plan.tiles, plan.ink, plan.unread)
    storage.put_bytes(preview_url(cfg.out, unit.item), png)
    scale = preview_scale(plan.mask.shape, plan.mask_downsample)
    # regions travel without arrays
    light = dataclasses.replace(plan, thumb=None, mask=None, ink=None, preview_scale=scale)
    n = cfg.region_tiles
    works = [
        Work(unit, i, dataclasses.replace(light, tiles=plan.tiles[k : k + n]))
        for i, k in enumerate(range(0, len(plan.tiles), n))
    ]
    tile_um = plan.mpp * plan.size0 if plan.mpp else None
    mismatch = background and scale_mismatch(background.tile_um, tile_um, cfg.tile_size)
    grey = [GREY] if not plan.tiles and colourless(plan.thumb) else []  # why the slide yields none
    return works, plan.warnings + ([mismatch] if mismatch else []) + grey


def _scale(mpp: float | None, width: int, stored_width: int) -> dict[str, float | None]:
    """A stored image's scale: ``width`` px of ``mpp`` µm/px (a slide's level 0, or an image's ``--mpp``), stored
    ``stored_width`` px wide (after ``--store-size``): its µm/px and the width in µm of specimen it shows (None
    without ``mpp``)."""
    if not mpp:
        return {"mpp": None, "width_um": None}
    return {"mpp": round(mpp * width / stored_width, 6), "width_um": round(mpp * width, 3)}


def wsi_samples(work: Work, cfg: WsiIngestConfig, background=None) -> Iterator[dict[str, Any]]:
    """The tiles of one region as samples (key ``<slide>_<x>_<y>``, level-0 coordinates).

    ``background`` (a :class:`~ingest.background.BackgroundFilter`) drops the tiles it calls background. A tile
    that cannot be read is left out, and counted and noted in ``work`` (:func:`~ingest.wsi.read_tiles`).
    """
    unit, plan = work.unit, work.plan
    assert plan is not None
    work.notes.clear()  # a retried attempt notes anew
    damaged: list = []
    reader = open_slide(SLIDES.path(unit.sources))
    try:
        tiles = read_tiles(reader, plan, cfg.tile_size, cfg.store_size, damaged)
        for tile, rgb in background.filter(tiles) if background else tiles:
            meta = {
                "slide": unit.item,
                "patient": unit.patient,
                "level": plan.level,
                "x": tile.x,
                "y": tile.y,
                "size0": tile.size0,
                "tissue": tile.tissue,
                "label": unit.label,
                **unit.where,
            } | _scale(plan.mpp, tile.size0, cfg.store_size or cfg.tile_size)
            image = encode_image(rgb, cfg.format, cfg.quality)
            yield make_sample(f"{unit.item}_{tile.x:07d}_{tile.y:07d}", image, cfg.format, unit.label, meta)
    finally:
        reader.close()
    if damaged:
        work.notes.append(damaged_note(damaged, len(plan.tiles), work.index))
    work.left_out, work.damaged_at = len(damaged), [(t.x, t.y) for t, _ in damaged]


class _Slices:
    """Renders a series' slices on demand, keeping only the few a sample needs (memory independent of length).

    A slice whose file is broken or gone (:func:`~ingest.decisions.input_fault`) is remembered with its error
    instead: one bad file of a series of hundreds (paper 003 found one in RSNA's 752,803) costs its slice, not the
    series. Any other error (a store that does not answer) is raised, for the work to be retried.
    """

    def __init__(self, unit: Unit, store_size: int | None, read: Callable[[str, int], np.ndarray], files: ReadAhead):
        self.unit, self.store_size, self.read, self.files = unit, store_size, read, files
        self._kept: dict[int, np.ndarray] = {}
        self.broken: dict[int, Exception] = {}

    def get(self, i: int) -> np.ndarray | None:
        """Slice ``i`` rendered, or None where it cannot be read."""
        if i in self.broken:
            return None
        if i not in self._kept:
            try:
                with self.files.local(self.unit.sources[i]) as path:
                    rgb = self.read(path, i)
            except Exception as exc:
                if not input_fault(exc):
                    raise
                self.broken[i] = exc
                return None
            size = self.store_size
            if size and rgb.shape[:2] != (size, size):
                rgb = cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)
            self._kept[i] = rgb
        return self._kept[i]

    def standing_in(self, picks: list[int]) -> list[int] | None:
        """``picks`` with each slice that cannot be read replaced by the nearest of them that can (the lower of
        two as near), as :func:`~ingest.sequences.neighbour_indices` repeats an edge slice; None when none can."""
        readable = [j for j in dict.fromkeys(picks) if self.get(j) is not None]
        if not readable:
            return None
        return [j if j not in self.broken else min(readable, key=lambda r: (abs(r - j), r)) for j in picks]

    def note(self, n: int) -> str:
        """The warning a series with unreadable slices carries: how many, which (pseudonyms, where the unit has
        them) and the first one's error."""
        names = self.unit.meta.get("images")
        which = ", ".join(names[i] if names else f"#{i}" for i in sorted(self.broken))
        first = self.broken[min(self.broken)]
        return (
            f"{len(self.broken)} of {n} slice(s) could not be read and were left out ({which}; a sample of several "
            f"slices holds its nearest readable one in their place): {type(first).__name__}: {first}"
        )

    def forget_before(self, i: int) -> None:
        for j in [j for j in self._kept if j < i]:
            del self._kept[j]


SequenceConfig = DicomIngestConfig | ImagesIngestConfig


def _sequence_picks(n: int, cfg: SequenceConfig) -> list[tuple[str, list[int]]]:
    """(key suffix, slice indices) of every sample of a series of ``n`` slices, in order."""
    if cfg.mode == "center":
        return [("center", center_indices(n, cfg.neighbours))]
    if cfg.mode == "series":
        return [("series", even_indices(n, cfg.frames))]
    return [(f"{i:05d}", neighbour_indices(i, n, cfg.neighbours)) for i in range(n)]


def sequence_samples(
    work: Work, cfg: SequenceConfig, read: Callable[[str, int], np.ndarray], extra: dict[str, Any]
) -> Iterator[dict[str, Any]]:
    """The samples of one ordered series in order: per slice, the centre block, or T slices (``cfg.mode``).

    ``read(path, i)`` renders slice ``i``. With per-slice label vectors, a one-slice sample takes its centre
    slice's vector and a multi-slice sample the maximum of its slices' (any-positive). A sample of several
    slices holds them in order (see :func:`~shards.schema.make_sample`). A one-slice sample (``slice`` mode) is
    named by its centre slice's pseudonym (``image``) where the unit has them.
    """
    unit = work.unit
    work.notes.clear()  # a retried attempt notes anew
    n = len(unit.sources)
    samples = _sequence_picks(n, cfg)
    vectors = unit.meta.get("slice_labels")
    if vectors and cfg.mode == "slice":  # a slice the label table has no row for: no sample of its own
        samples = [(suffix, picks) for suffix, picks in samples if vectors[picks[len(picks) // 2]] is not None]
    first_use = dict.fromkeys(i for _, picks in samples for i in picks)  # each slice is read once, in this order
    with ReadAhead((unit.sources[i] for i in first_use), cfg.read_ahead) as files:
        slices = _Slices(unit, cfg.store_size, read, files)
        made = 0
        for suffix, wanted in samples:
            slices.forget_before(min(wanted))
            picks = slices.standing_in(wanted)
            if picks is None or (cfg.mode == "slice" and wanted[len(wanted) // 2] in slices.broken):
                continue  # a slice's own sample is not made of its neighbours
            if vectors and cfg.mode == "slice":
                vector = vectors[picks[len(picks) // 2]]
            elif vectors:
                vector = [max(col) for col in zip(*(v for v in vectors if v), strict=True)]
            else:
                vector = None
            label = vector[0] if vector else unit.label
            meta = {
                "series": unit.item,
                "patient": unit.patient,
                "mode": cfg.mode,
                "slices": picks,
                "num_slices": n,
                "label": label,
                "labels": vector,
                **unit.where,
            } | extra
            if cfg.mode == "slice" and unit.meta.get("images"):  # the slice it stands for: its pseudonym
                meta["image"] = unit.meta["images"][picks[len(picks) // 2]]
            images = [encode_image(slices.get(i), cfg.format, cfg.quality, flat=True) for i in picks]
            made += 1
            yield make_sample(f"{unit.item}_{suffix}", images, cfg.format, label, meta)
    if slices.broken and not made:  # nothing of it could be read: the series fails, as one bad file did
        raise slices.broken[min(slices.broken)]
    if slices.broken:
        work.notes.append(slices.note(n))
    work.left_out = len(slices.broken)


def dicom_samples(work: Work, cfg: DicomIngestConfig) -> Iterator[dict[str, Any]]:
    """A DICOM series' samples, each slice windowed into RGB (``cfg.windows``)."""
    frames = work.unit.meta.get("frames") or [None] * len(work.unit.sources)
    hu = work.unit.meta.get("rescale") or [None] * len(work.unit.sources)
    meta = work.unit.meta
    extra = {"study": meta.get("study"), "modality": meta.get("modality"), "windows": list(cfg.windows)}
    return sequence_samples(work, cfg, lambda path, i: slice_rgb(path, tuple(cfg.windows), frames[i], hu[i]), extra)


def _read_rgb(path: str, _: int = 0) -> np.ndarray:
    with open(path, "rb") as f:
        return decode_rgb(f.read())


def _prepared(cfg: ImagesIngestConfig) -> Callable[..., np.ndarray]:
    """:func:`_read_rgb` with paper 004's preparation (``--grayscale``, ``--median``) of each image."""
    return lambda path, _=0: lesion.denoise(_read_rgb(path), cfg.median, cfg.grayscale)


def _fit(rgb: np.ndarray, size: int | None) -> np.ndarray:
    """Shrink so the longer side is ``size`` (aspect kept; normalised boxes stay valid); never enlarge."""
    h, w = rgb.shape[:2]
    if not size or max(h, w) <= size:
        return rgb
    scale = size / max(h, w)
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)


def _detected(rgb: np.ndarray, cfg: ImagesIngestConfig, work: Work) -> tuple[list[Box], list[float]]:
    """The boxes the run's detector finds in ``rgb``, and their scores; none found is noted (the image stays
    whole)."""
    from ingest.detector import detector_at  # torch only where a detector is named

    assert cfg.detector_sha256, "the run records the detector it read before its workers start"
    detector = detector_at(
        model_url(cfg), cfg.detector, cfg.detector_sha256, cfg.detect_confidence, cfg.detect_iou, model_device(cfg)
    )
    found = detector.boxes(rgb)
    if not found:
        work.notes.append(f"the detector found no box scoring above {cfg.detect_confidence}; the image is kept whole")
    return [box for box, _ in found], [score for _, score in found]


def image_samples(work: Work, cfg: ImagesIngestConfig, files: ReadAhead | None = None) -> Iterator[dict[str, Any]]:
    """One image as a sample, or (``cfg.crop``) one sample per box cropped around it; boxes travel in the
    metadata as normalised ``[x0, y0, x1, y1, label]``. ``files``: its batch's downloads ahead, if any."""
    work.notes.clear()  # a retried attempt notes anew
    unit = work.unit
    with (files.local if files else local_copy)(unit.sources[0]) as path, open(path, "rb") as f:
        data = f.read()
    raw = decode_rgb(data)
    work.notes.extend(stack_notes(data))  # a TIFF of several images: the first alone is read
    rgb = lesion.denoise(raw, cfg.median, cfg.grayscale)
    h, w = rgb.shape[:2]
    boxes = [Box(*b) for b in unit.meta.get("yolo") or []] or normalise(unit.meta.get("pixel_boxes") or [], w, h)
    meta = {"image": unit.item, "patient": unit.patient, "label": unit.label, "width": w, "height": h} | unit.where
    if cfg.detector:  # on the image as it was (the detector's training images were not prepared)
        boxes, meta["box_scores"] = _detected(raw, cfg, work)
    meta["boxes"] = [b.as_list() for b in boxes]
    if cfg.crop and boxes:
        segmenter = lesion.segmenter(cfg.segment, cfg.sam_model, model_device(cfg)) if cfg.segment != "none" else None
        found = lesion.lesions(rgb, boxes, segmenter) if segmenter else []
        for j, box in enumerate(boxes):
            extra: dict[str, Any] = {"crop": j}
            if cfg.detector:
                extra["box_score"] = meta["box_scores"][j]
            if found:  # the lesion alone, or (none found in the box) the box crop as it is
                extra |= {"segmented": found[j].mask is not None, "lesion_fraction": found[j].fraction}
                if found[j].mask is None:
                    work.notes.append(f"box {j}: {cfg.segment} found no lesion in it; its crop is kept unmasked")
            region = lesion.cut_out(rgb, box, cfg.crop_margin, found[j].mask if found else None)
            stored = _fit(region, cfg.store_size)
            extra |= _scale(cfg.mpp, region.shape[1], stored.shape[1]) if cfg.mpp else {}
            image = encode_image(stored, cfg.format, cfg.quality)
            yield make_sample(f"{unit.item}_box{j:02d}", image, cfg.format, unit.label, meta | extra)
    else:
        stored = _fit(rgb, cfg.store_size)
        image = encode_image(stored, cfg.format, cfg.quality)
        meta |= {"crop": None} | (_scale(cfg.mpp, w, stored.shape[1]) if cfg.mpp else {})
        yield make_sample(unit.item, image, cfg.format, unit.label, meta)


def plan_unit(unit: Unit, cfg: IngestConfig, background=None) -> tuple[list[Work], list[str]]:
    """The work a unit needs: a slide's regions, or the whole series as one piece."""
    if unit.kind == "wsi":
        assert isinstance(cfg, WsiIngestConfig)
        return plan_slide(unit, cfg, background)
    return [Work(unit)], list(unit.meta.get("warnings", []))


def work_samples(
    work: Work, cfg: IngestConfig, background=None, files: ReadAhead | None = None
) -> Iterator[dict[str, Any]]:
    """Dispatch on the unit's kind; ``files``: an image batch's :class:`ReadAhead`."""
    if work.unit.kind == "wsi":
        assert isinstance(cfg, WsiIngestConfig)
        return wsi_samples(work, cfg, background)
    if work.unit.kind == "image":
        assert isinstance(cfg, ImagesIngestConfig)
        return image_samples(work, cfg, files)
    if work.unit.kind == "sequence":
        assert isinstance(cfg, ImagesIngestConfig)
        return sequence_samples(work, cfg, _prepared(cfg), {})
    assert isinstance(cfg, DicomIngestConfig)
    return dicom_samples(work, cfg)
