"""A real scanner's file (``tests/data/CMU-1-Small-Region.svs``, Aperio, CC0; see ``tests/data/README.md``) through
the same paths as the synthetic slides: its JPEG tiles are read straight from the TIFF and equal OpenSlide's pixels,
resolution comes from its metadata, and none of its identifying properties reaches a sample."""

import json
from pathlib import Path

import numpy as np
import openslide
import pytest

from ingest.config import WsiIngestConfig
from ingest.plan import plan_wsi
from ingest.slides import OpenSlideReader
from ingest.units import plan_slide, wsi_samples
from shards.schema import decode_image
from tests.vendor_checks import REAL_SLIDE as SLIDE


def _samples(tmp_path: Path, **options) -> tuple[list[dict], list[dict]]:
    cfg = WsiIngestConfig(sources=[str(SLIDE)], out=str(tmp_path), format="png", **options)
    [unit] = plan_wsi(cfg, b"k").units
    works, warnings = plan_slide(unit, cfg)
    assert warnings == []
    samples = [s for w in works for s in wsi_samples(w, cfg)]
    return samples, [json.loads(s["json"]) for s in samples]


def test_a_real_aperio_slide_is_read_from_its_own_tiles_as_openslide_reads_it(tmp_path):
    with openslide.OpenSlide(str(SLIDE)) as slide:
        assert slide.properties["openslide.vendor"] == "aperio" and slide.level_count == 1
        assert set(slide.associated_images) == {"label", "macro", "thumbnail"}
        private = [slide.properties[f"aperio.{k}"] for k in ("Filename", "User", "ImageID", "ScanScope ID", "Date")]
    reader = OpenSlideReader(str(SLIDE))
    assert reader.mpp == pytest.approx(0.499) and reader.objective_power == 20
    assert reader.direct_levels == [0]  # Aperio's 240 px JPEG tiles, decoded by Tessera, not OpenSlide
    reader.close()

    samples, metas = _samples(tmp_path, tile_size=256)
    assert len(samples) > 20 and all(m["tissue"] >= 0.3 and m["mpp"] == pytest.approx(0.499) for m in metas)
    openslide_pixels = OpenSlideReader(str(SLIDE), fast=False)
    for sample, meta in zip(samples, metas, strict=True):
        expected = openslide_pixels.read_region(meta["x"], meta["y"], 0, 256, 256)
        assert np.array_equal(decode_image(sample["png"]), expected), (meta["x"], meta["y"])
    openslide_pixels.close()
    # the scan's file name, user, image id, scanner and date, and this file's name: none in any sample
    private.append(SLIDE.stem)
    for sample in samples:
        blob = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in sample.values())
        assert not any(p.encode() in blob for p in private)


def test_a_real_slide_tiled_at_a_magnification_it_has_no_level_for(tmp_path):
    """10x from a 20x slide with one level: 512 level-0 px per 256 px tile, read at level 0 and resized."""
    samples, metas = _samples(tmp_path, tile_size=256, magnification=10)
    assert samples and {(m["level"], m["size0"]) for m in metas} == {(0, 512)}
    assert all(m["mpp"] == pytest.approx(0.998) for m in metas)
    assert all(decode_image(s["png"]).shape == (256, 256, 3) for s in samples)
    # stored smaller: the recorded µm/px is the stored image's
    _, metas = _samples(tmp_path, tile_size=256, magnification=10, store_size=128)
    assert {(m["size0"], m["mpp"]) for m in metas} == {(512, 1.996)}
    assert all(m["width_um"] == pytest.approx(255.5, abs=0.1) for m in metas)  # 512 level-0 px of 0.499 µm
