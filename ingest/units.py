"""Units of ingest work (one slide or one series) and how each becomes samples."""

from __future__ import annotations

import contextlib
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
from ingest.wsi import plan_tiles, read_tiles
from shards import storage
from shards.schema import encode_image, make_sample

PREVIEWS = "previews"


@dataclass
class Unit:
    """One unit of work. ``sources`` stay inside the worker; only pseudonyms reach the outputs."""

    id: str
    kind: str
    sources: list[str]
    item: str
    patient: str
    label: int | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def local_copy(location: str) -> Iterator[str]:
    """A local path for ``location``: the path itself, or a temporary download of an ``s3://`` object."""
    if not location.startswith("s3://"):
        yield location
        return
    suffix = os.path.splitext(location)[1]
    fd, tmp = tempfile.mkstemp(prefix="tessera-src-", suffix=suffix)
    os.close(fd)
    try:
        yield str(storage.get_file(location, tmp))
    finally:
        os.unlink(tmp)


def wsi_samples(unit: Unit, cfg: WsiIngestConfig, warnings: list[str]) -> Iterator[dict[str, Any]]:
    """Tissue tiles of one slide as samples (key ``<slide>_<x>_<y>``, level-0 coordinates)."""
    with local_copy(unit.sources[0]) as path:
        reader = OpenSlideReader(path)
        try:
            plan = plan_tiles(reader, cfg.tile_size, cfg.mpp, cfg.stride, cfg.tissue_threshold)
            warnings.extend(plan.warnings)
            png = preview_png(plan.thumb, plan.mask, plan.mask_downsample, plan.tiles)
            storage.put_bytes(storage.join(cfg.out, PREVIEWS, f"{unit.item}.png"), png)
            for tile, rgb in read_tiles(reader, plan, cfg.tile_size, cfg.store_size):
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


def dicom_samples(unit: Unit, cfg: DicomIngestConfig, warnings: list[str]) -> Iterator[dict[str, Any]]:
    """One sample per slice of one series, in anatomical order (key ``<series>_<index>``)."""
    warnings.extend(unit.meta.get("warnings", []))
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


def unit_samples(unit: Unit, cfg: IngestConfig, warnings: list[str]) -> Iterator[dict[str, Any]]:
    """Dispatch on the unit's kind."""
    if unit.kind == "wsi":
        assert isinstance(cfg, WsiIngestConfig)
        return wsi_samples(unit, cfg, warnings)
    if unit.kind == "dicom":
        assert isinstance(cfg, DicomIngestConfig)
        return dicom_samples(unit, cfg, warnings)
    raise ValueError(f"unknown unit kind {unit.kind!r}")
