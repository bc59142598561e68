import numpy as np

from ingest.config import WsiIngestConfig
from ingest.describe import describe_plan
from ingest.plan import Plan
from ingest.preflight import check_slides
from ingest.slides import ArraySlideReader, SlideError
from ingest.synthetic import swapped_profile, write_pyramid_tiff
from ingest.tiling import grid_size, tile_origins
from ingest.units import Unit


def test_grid_size_counts_the_tile_origins():
    for width in (0, 5, 99, 100, 101, 350):
        for height in (7, 100, 260):
            for size, stride in ((100, None), (100, 30), (64, 128), (1, 1)):
                assert grid_size(width, height, size, stride) == len(tile_origins(width, height, size, stride))


def _unit(source: str) -> Unit:
    return Unit(id=f"id-{source.rsplit('/', 1)[-1]}", kind="wsi", sources=[source], item="s", patient="p")


def test_slides_are_grouped_by_the_level_they_would_be_read_at_and_failures_named():
    readers = {
        "a": ArraySlideReader(np.zeros((1000, 1200, 3), np.uint8), levels=3, mpp=0.25),
        "b": ArraySlideReader(np.zeros((1000, 1200, 3), np.uint8), levels=3, mpp=None),
    }

    def open_reader(path: str):
        if path not in readers:
            raise SlideError("OpenSlide does not recognise the file (damaged, or not a slide)")
        return readers[path]

    cfg = WsiIngestConfig(sources=["x"], out="y", tile_size=100, mpp=0.5)
    units = [_unit("a"), _unit("b"), _unit("c"), _unit("s3://bucket/d")]
    assert check_slides(units, cfg, open_reader) == [
        "slides checked: 3 of 4 (1 on object storage: opened by the workers in the run)",
        # b has no MPP: level 0, tiles of 100 level-0 px, a 12 x 10 grid
        "  1 at level 0 (1 level-0 px per output px, no MPP): 120 tile positions of 100 px before the tissue mask",
        # a at 0.25 um/px: 0.5 um/px is level 1, tiles of 200 level-0 px, a 6 x 5 grid
        "  1 at level 1 (2 level-0 px per output px, 0.5 µm/px): 30 tile positions of 100 px before the tissue mask",
        "would fail 1: SlideError: OpenSlide does not recognise the file (damaged, or not a slide): id-c",
        "warning for 1: slide has no MPP metadata; tiled at level 0: id-b",
    ]
    # a background model trained on 100 µm tiles: a's tiles are 50 µm (200 level-0 px of 0.25); b's unknown
    assert check_slides(units, cfg, open_reader, model_um=100.0)[-2:] == [
        "warning for 1: its tiles are 50 µm across and the background model's training tiles were 100 µm (0.5x): "
        "its calls may be wrong at this scale (--mpp 1 matches it): id-a",
        "warning for 1: slide has no MPP metadata; tiled at level 0: id-b",
    ]
    assert check_slides(units, cfg, open_reader, model_um=55.0) == check_slides(units, cfg, open_reader)


def test_real_slide_headers_through_openslide(tmp_path):
    good, broken = tmp_path / "good.tif", tmp_path / "broken.tif"
    write_pyramid_tiff(good, np.full((1024, 1536, 3), 200, np.uint8), mpp=0.5, levels=3)
    broken.write_bytes(good.read_bytes()[:3000])
    cfg = WsiIngestConfig(sources=["x"], out="y", tile_size=256)
    lines = check_slides([_unit(str(good)), _unit(str(broken))], cfg)
    assert lines[:2] == [
        "slides checked: 2 of 2",
        "  1 at level 0 (1 level-0 px per output px, 0.5 µm/px): 24 tile positions of 256 px before the tissue mask",
    ]
    assert lines[2].startswith("would fail 1: SlideError: ") and lines[2].endswith(": id-broken.tif")


def test_a_plan_is_described_per_split_with_skips_and_warnings_by_pseudonym():
    from shards.manifest import InputRecord

    gap = "slice numbers skip 2 value(s) between 1 and 9"
    units = [
        Unit("u1", "sequence", ["/p1/1.png"], "s1", "p1", 1, "train", {"warnings": [gap]}),
        Unit("u2", "sequence", ["/p2/1.png"], "s2", "p2", 0, "train"),
        Unit("u3", "sequence", ["/p3/1.png"], "s3", "p3", 1, "val", {"warnings": [gap]}),
    ]
    skipped = [InputRecord(id=f"k{i}", kind="image", status="skipped", reason="not an image file") for i in range(7)]
    plan = Plan(units=units, skipped=skipped, classes=["negative", "positive"])
    assert describe_plan(plan) == [
        "3 slice sequences to ingest, 7 input(s) skipped",
        "  train: 2 (negative 1, positive 1) from 2 patient(s)",
        "  val: 1 (positive 1) from 1 patient(s)",
        "classes: 0 negative, 1 positive",
        "skipped 7: not an image file: k0, k1, k2, k3, k4 and 2 more",
        f"warning for 2: {gap}: u1, u3",
    ]


def test_a_slides_colour_profile_is_warned_of_as_the_run_would():
    level0 = np.zeros((400, 400, 3), np.uint8)
    readers = {
        "a": ArraySlideReader(level0, icc_profile=swapped_profile()),
        "b": ArraySlideReader(level0, icc_profile=b"not a profile"),
        "c": ArraySlideReader(level0),
    }
    units = [_unit(name) for name in readers]
    ignored = WsiIngestConfig(sources=["x"], out="y", tile_size=100)
    assert check_slides(units, ignored, readers.__getitem__)[-1:] == [
        "warning for 1: it embeds an ICC colour profile 'Crayon Colours', not applied: its tiles are in its "
        "scanner's own RGB (--color-profile apply converts them to sRGB): id-a"
    ]  # b's is not applied either: nothing to say of it
    applied = ignored.model_copy(update={"color_profile": "apply"})
    [line] = [x for x in check_slides(units, applied, readers.__getitem__) if x.startswith("warning")]
    assert line.startswith("warning for 1: its ICC profile (13 bytes) could not be read: ") and line.endswith(
        ": its pixels are kept as stored: id-b"
    )
