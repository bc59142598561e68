"""Units of ingest work (one slide or one series), their regions, and how each becomes samples."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cv2

from ingest.config import DicomIngestConfig, IngestConfig, WsiIngestConfig
from ingest.dicom import slice_rgb
from ingest.preview import preview_png
from ingest.slides import OpenSlideReader
from ingest.wsi import TilePlan, plan_tiles, read_tiles
from shards import storage
from shards.schema import encode_image, make_sample

PREVIEWS = "previews"


@dataclass
class Unit:
    """One input (slide or series). ``sources`` stay inside the workers; only pseudonyms reach outputs."""

    id: str
    kind: str
    sources: list[str]
    item: str
    patient: str
    label: int | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Work:
    """One piece of work: a whole series, or one region (a run of planned tiles) of a slide."""

    unit: Unit
    index: int = 0
    plan: TilePlan | None = None

    @property
    def id(self) -> str:
        return f"{self.unit.id}-{self.index:04d}"


@contextlib.contextmanager
def local_copy(location: str) -> Iterator[str]:
    """A local path for ``location``: the path itself, or a temporary download of an ``s3://`` object."""
    if not location.startswith("s3://"):
        yield location
        return
    fd, tmp = tempfile.mkstemp(prefix="tessera-src-", suffix=os.path.splitext(location)[1])
    os.close(fd)
    try:
        yield str(storage.get_file(location, tmp))
    finally:
        os.unlink(tmp)


def plan_slide(unit: Unit, cfg: WsiIngestConfig) -> tuple[list[Work], list[str]]:
    """Mask and tile one slide, publish its preview, and cut its tiles into regions of ``cfg.region_tiles``."""
    with local_copy(unit.sources[0]) as path:
        reader = OpenSlideReader(path)
        try:
            plan = plan_tiles(reader, cfg.tile_size, cfg.mpp, cfg.stride, cfg.tissue_threshold, cfg.magnification)
        finally:
            reader.close()
    png = preview_png(plan.thumb, plan.mask, plan.mask_downsample, plan.tiles)
    storage.put_bytes(storage.join(cfg.out, PREVIEWS, f"{unit.item}.png"), png)
    light = dataclasses.replace(plan, thumb=None, mask=None)  # regions travel without the arrays
    n = cfg.region_tiles
    works = [
        Work(unit, i, dataclasses.replace(light, tiles=plan.tiles[k : k + n]))
        for i, k in enumerate(range(0, len(plan.tiles), n))
    ]
    return works, plan.warnings


def wsi_samples(work: Work, cfg: WsiIngestConfig, background=None) -> Iterator[dict[str, Any]]:
    """The tiles of one region as samples (key ``<slide>_<x>_<y>``, level-0 coordinates).

    ``background`` (a :class:`~ingest.background.BackgroundFilter`) drops the tiles it calls background.
    """
    unit, plan = work.unit, work.plan
    assert plan is not None
    with local_copy(unit.sources[0]) as path:
        reader = OpenSlideReader(path)
        try:
            tiles = read_tiles(reader, plan, cfg.tile_size, cfg.store_size)
            for tile, rgb in background.filter(tiles) if background else tiles:
                meta = {
                    "slide": unit.item,
                    "patient": unit.patient,
                    "level": plan.level,
                    "x": tile.x,
                    "y": tile.y,
                    "size0": tile.size0,
                    "mpp": (plan.mpp * plan.target_downsample) if plan.mpp else None,
                    "tissue": tile.tissue,
                    "label": unit.label,
                }
                image = encode_image(rgb, cfg.format, cfg.quality)
                yield make_sample(f"{unit.item}_{tile.x:07d}_{tile.y:07d}", image, cfg.format, unit.label, meta)
        finally:
            reader.close()


def dicom_samples(work: Work, cfg: DicomIngestConfig) -> Iterator[dict[str, Any]]:
    """One sample per slice of one series, in anatomical order (key ``<series>_<index>``)."""
    unit = work.unit
    n = len(unit.sources)
    for i, location in enumerate(unit.sources):
        with local_copy(location) as path:
            rgb = slice_rgb(path, tuple(cfg.windows))
        if cfg.store_size and rgb.shape[0] != cfg.store_size:
            rgb = cv2.resize(rgb, (cfg.store_size, cfg.store_size), interpolation=cv2.INTER_AREA)
        meta = {
            "series": unit.item,
            "patient": unit.patient,
            "study": unit.meta.get("study"),
            "modality": unit.meta.get("modality"),
            "slice": i,
            "num_slices": n,
            "windows": list(cfg.windows),
            "label": unit.label,
        }
        image = encode_image(rgb, cfg.format, cfg.quality)
        yield make_sample(f"{unit.item}_{i:05d}", image, cfg.format, unit.label, meta)


def plan_unit(unit: Unit, cfg: IngestConfig) -> tuple[list[Work], list[str]]:
    """The work a unit needs: a slide's regions, or the whole series as one piece."""
    if unit.kind == "wsi":
        assert isinstance(cfg, WsiIngestConfig)
        return plan_slide(unit, cfg)
    return [Work(unit)], list(unit.meta.get("warnings", []))


def work_samples(work: Work, cfg: IngestConfig, background=None) -> Iterator[dict[str, Any]]:
    """Dispatch on the unit's kind."""
    if work.unit.kind == "wsi":
        assert isinstance(cfg, WsiIngestConfig)
        return wsi_samples(work, cfg, background)
    assert isinstance(cfg, DicomIngestConfig)
    return dicom_samples(work, cfg)
