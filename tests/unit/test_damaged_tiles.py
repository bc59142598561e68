"""A slide with a damaged source tile: the tiles over it are left out, counted and named, and the rest of the slide
is ingested as from an intact copy (before, the first such read failed its whole slide). OpenSlide, the reader of
record, refuses every later read once one failed; the direct path decoded an unfinished tile."""

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from ingest.actors import mark_preview
from ingest.config import WsiIngestConfig
from ingest.plan import make_plan
from ingest.preview import preview_png
from ingest.runner import _merge
from ingest.slides import OpenSlideReader, SlideError
from ingest.staging import process_work
from ingest.synthetic import slide_array, write_pyramid_tiff
from ingest.units import plan_unit, wsi_samples
from ingest.wsi import plan_tiles, read_tiles
from shards.schema import decode_image

AMID = {"wiped": b"\xff" * 40, "marker": b"\xff\xd3"}  # written amid a tile's scan
WARNED = "Corrupt JPEG data: premature end of data segment"  # libjpeg's warning, an error in OpenSlide


@pytest.fixture(scope="module")
def intact(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("intact") / "s.tif"
    write_pyramid_tiff(path, slide_array(2048, "CE", np.random.default_rng(3)))  # 8 x 8 source tiles of 256 px
    return path


def _damaged(intact: Path, folder: Path, how: str, indices=(34,)) -> Path:
    """A copy of ``intact`` with level 0's source tiles ``indices`` spoiled: zeroed (no JPEG at all); the second
    half of each erased to 0xFF as flash erases (a JPEG stream without its end); 40 bytes amid its scan erased so
    (``wiped``), or a restart marker written there (``marker``), the stream's end intact; or its scan ended there,
    the stream's end written after it and its space left zero (``cut``: a writer stopped early), every marker in
    place. libjpeg-turbo in the direct path decoded the last four without a word (a warning no caller sees), where
    OpenSlide refuses them."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "s.tif"
    shutil.copy(intact, path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        spans = [(page.dataoffsets[i], page.databytecounts[i]) for i in indices]
    data = bytearray(path.read_bytes())
    for offset, count in spans:
        start = offset if how == "zeros" else offset + count // 2
        if how in AMID:
            data[start : start + len(AMID[how])] = AMID[how]
        elif how == "cut":
            data[start : offset + count] = b"\xff\xd9" + bytes(offset + count - start - 2)
        else:
            data[start : offset + count] = (b"\0" if how == "zeros" else b"\xff") * (offset + count - start)
    path.write_bytes(bytes(data))
    return path


def _cfg(src: Path, out: Path) -> WsiIngestConfig:
    return WsiIngestConfig(
        sources=[str(src)], out=str(out), tile_size=256, region_tiles=16, tissue_threshold=0.0, format="png",
        split="train=1.0",
    )  # fmt: skip


def _ingest(src: Path, out: Path):
    cfg = _cfg(src, out)
    [unit] = make_plan("wsi", cfg, b"k").units
    works, warnings = plan_unit(unit, cfg)
    samples = {s["__key__"]: decode_image(s["png"]) for w in works for s in wsi_samples(w, cfg)}
    return unit, works, warnings, samples


@pytest.mark.parametrize("how", ["zeros", "erased", "marker", "cut"])
def test_a_damaged_tile_costs_the_tiles_over_it_and_no_other(tmp_path, intact, how):
    _, _, _, whole = _ingest(intact, tmp_path / "a")
    src = _damaged(intact, tmp_path / how, how)
    _, works, _, samples = _ingest(src, tmp_path / "b")
    lost = [k for k in whole if k not in samples]
    assert lost == [k for k in whole if k.endswith("_0000512_0001024")]  # source tile 34: row 4, column 2
    assert all(np.array_equal(samples[k], whole[k]) for k in samples)  # the others, as from the intact copy
    [damaged] = [w for w in works if w.left_out]
    assert damaged.left_out == 1 and len(damaged.notes) == 1 and damaged.damaged_at == [(512, 1024)]
    why = {"zeros": "Not a JPEG file", "erased": "Premature end of JPEG file"}.get(how, WARNED)
    assert damaged.notes[0].startswith(f"region {damaged.index}: 1 of its 16 tile(s) could not be read (damaged)")
    assert "at (512, 1024): read failed at (512, 1024) level 0: " + why in damaged.notes[0]


def test_openslide_reads_on_after_a_damaged_tile(tmp_path, intact):
    """Through OpenSlide alone (a format the direct path does not serve): its handle is opened anew after the
    error, so the tiles after the damaged one are read, with OpenSlide's pixels."""
    src = _damaged(intact, tmp_path, "zeros", indices=(34, 44))
    reader = OpenSlideReader(str(src), fast=False)
    plan = plan_tiles(reader, 256, None, None, 0.0)
    damaged: list = []
    read = dict(((t.x, t.y), rgb) for t, rgb in read_tiles(reader, plan, 256, None, damaged))
    assert [(t.x, t.y) for t, _ in damaged] == [(512, 1024), (1024, 1280)]
    assert all(isinstance(e, SlideError) for _, e in damaged) and len(read) == len(plan.tiles) - 2
    with pytest.raises(SlideError, match=r"read failed at \(512, 1024\) level 0: Not a JPEG file"):
        next(read_tiles(reader, dataclasses.replace(plan, tiles=[damaged[0][0]]), 256, None))  # none given: raised
    reader.close()
    good = OpenSlideReader(str(intact), fast=False)
    assert all(np.array_equal(rgb, good.read_region(x, y, 0, 256, 256)) for (x, y), rgb in read.items())
    good.close()


@pytest.mark.parametrize(
    "how, why, strict",
    [
        *[(how, why, True) for how, why in (("erased", "Premature end of JPEG file"), ("wiped", WARNED))],
        *[(how, WARNED, True) for how in ("marker", "cut")],
        # a page tifffile's decoder serves (ingest.jpeg_decode does not read it): the scan's markers are checked
        *[(how, why, False) for how, why in (("erased", "Premature end of JPEG file"), ("wiped", WARNED))],
        ("marker", WARNED, False),
    ],
)
def test_the_direct_path_leaves_a_tile_without_its_end_or_with_a_marker_amid_its_scan_to_openslide(
    tmp_path, intact, how, why, strict, monkeypatch
):
    """libjpeg-turbo decodes a JPEG stream without its end, with a marker amid its scan, or whose scan ends before
    its last block, with a warning no caller of tifffile sees: the direct path decodes with each warning an error
    (:mod:`ingest.jpeg_decode`), or checks the scan's markers first (:mod:`ingest.jpeg_scan`); OpenSlide refuses
    such a tile."""
    from ingest.jpeg_decode import StrictJpeg

    if not strict:
        monkeypatch.setattr(StrictJpeg, "of", classmethod(lambda cls, page: None))
    src = _damaged(intact, tmp_path, how)
    reader = OpenSlideReader(str(src))
    assert reader.direct_levels == [0, 1, 2, 3]
    with pytest.raises(SlideError, match=why):
        reader.read_region(512, 1024, 0, 256, 256)
    assert reader.read_region(0, 0, 0, 256, 256).shape == (256, 256, 3)  # the rest, read on
    reader.close()


def test_a_slide_with_no_tile_that_can_be_read_fails_saying_so(tmp_path, intact):
    src = _damaged(intact, tmp_path / "all", "zeros", indices=range(64))
    cfg = _cfg(src, tmp_path / "out")
    [unit] = make_plan("wsi", cfg, b"k").units
    works, warnings = plan_unit(unit, cfg)  # its mask, from a level not damaged, finds the tiles
    records = [process_work(w, cfg) for w in works]
    assert all(
        r.status == "ingested" and r.samples == 0 and r.left_out == len(w.plan.tiles)
        for r, w in zip(records, works, strict=True)
    )
    rec = _merge(unit, (works, warnings, None, None), records)
    assert (rec.status, rec.left_out) == ("failed", 24)
    assert rec.reason == "none of its 24 tile(s) with tissue could be read (damaged)"
    assert len(rec.warnings) == 2 and all("could not be read (damaged)" in w for w in rec.warnings)
    some = _damaged(intact, tmp_path / "one", "zeros")  # one damaged tile: ingested, and counted
    cfg = _cfg(some, tmp_path / "out1")
    [unit] = make_plan("wsi", cfg, b"k").units
    works, warnings = plan_unit(unit, cfg)
    records = [process_work(w, cfg) for w in works]
    assert [xy for r in records for xy in r.damaged_at] == [(512, 1024)]  # staged: a resumed run marks it too
    plan = works[0].plan  # as the run marks it once its works are done (ingest.runner._mark_previews)
    mark_preview(cfg.out, unit.item, [], [xy for r in records for xy in r.damaged_at], plan.size0, plan.preview_scale)
    orange = (decode_image((tmp_path / f"out1/previews/{unit.item}.png").read_bytes()) == [255, 140, 0]).all(axis=2)
    f = plan.preview_scale  # the tile's box and its diagonals, at the tile's place on the preview
    assert orange[round(1024 * f), round(512 * f)] and orange[round(1152 * f), round(640 * f)]
    assert orange.sum() == orange[round(1024 * f) : round(1280 * f), round(512 * f) : round(768 * f)].sum()
    rec = _merge(unit, (works, warnings, None, None), records)
    assert (rec.status, rec.samples, rec.left_out) == ("ingested", 23, 1)


def test_a_damaged_tile_of_the_mask_level_costs_the_tissue_under_it(tmp_path, intact):
    """The mask is read from a low level in one read, which a damaged tile there failed (and with it the slide):
    it is read around the tile, whose area is taken as background, and the slide is tiled elsewhere as before."""
    with tifffile.TiffFile(intact) as tif:
        page = tif.pages[1]  # 1024 px: the level the mask is read from (mask_level)
        offset, count = page.dataoffsets[5], page.databytecounts[5]  # row 1, column 1: level 0's (512-1024)^2
    src = tmp_path / "s.tif"
    data = bytearray(intact.read_bytes())
    data[offset : offset + count] = bytes(count)
    src.write_bytes(bytes(data))
    for fast in (True, False):
        whole, hurt = OpenSlideReader(str(intact), fast=fast), OpenSlideReader(str(src), fast=fast)
        before, after = plan_tiles(whole, 256, None, None, 0.3), plan_tiles(hurt, 256, None, None, 0.3)
        whole.close(), hurt.close()
        kept, lost = (
            {(t.x, t.y) for t in after.tiles},
            {(t.x, t.y) for t in before.tiles} - {(t.x, t.y) for t in after.tiles},
        )
        assert lost and all(512 <= x < 1024 and 512 <= y < 1024 for x, y in lost)
        assert kept == {(t.x, t.y) for t in before.tiles} - lost
        assert (after.thumb[256:512, 256:512] == 255).all()
        [note] = after.warnings
        assert note.startswith("1 of 16 parts of the level the tissue mask is read from could not be read (damaged)")
        assert note.endswith("read failed at (512, 512) level 1: Not a JPEG file: starts with 0x00 0x00")
        assert "(crossed out on the preview)" in note and after.unread == [(256, 256, 256, 256)] and not before.unread
    preview = decode_image(preview_png(after.thumb, after.mask, after.mask_downsample, after.tiles, None, after.unread))
    orange = [255, 140, 0]  # RGB
    for y, x in ((256, 256), (511, 511), (256, 511), (511, 256), (384, 384), (300, 256)):  # its outline and cross
        assert preview[y, x].tolist() == orange, (y, x)
    assert (preview == orange).all(axis=2)[:256].sum() == 0 and (preview == orange).all(axis=2)[512:].sum() == 0


def test_a_real_aperio_tile_whose_scan_ends_early_is_left_to_openslide(tmp_path):
    """Aperio's tiles share the page's JPEG tables and hold RGB samples (``ingest.jpeg_decode``): one whose scan
    ends at half, every marker in place, is refused as OpenSlide refuses it; its neighbour reads as before."""
    from tests.vendor_checks import REAL_SLIDE

    src = tmp_path / "s.svs"
    shutil.copy(REAL_SLIDE, src)
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        assert page.jpegtables and page.photometric == 2
        across = -(-page.imagewidth // page.tilewidth)
        index = 2 * across + 3  # row 2, column 3
        offset, count, side = page.dataoffsets[index], page.databytecounts[index], page.tilewidth
    data = bytearray(src.read_bytes())
    data[offset + count // 2 : offset + count] = b"\xff\xd9" + bytes(count - count // 2 - 2)
    src.write_bytes(bytes(data))
    reader, good = OpenSlideReader(str(src)), OpenSlideReader(str(REAL_SLIDE))
    assert reader.direct_levels == [0]
    with pytest.raises(SlideError, match=WARNED):
        reader.read_region(3 * side, 2 * side, 0, side, side)
    assert np.array_equal(
        reader.read_region(4 * side, 2 * side, 0, side, side), good.read_region(4 * side, 2 * side, 0, side, side)
    )
    reader.close(), good.close()
