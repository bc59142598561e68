"""A slide's embedded ICC colour profile (``--color-profile``): applied, its tiles and its mask's image are what
LittleCMS makes of its pixels in sRGB; ignored (the default), its pixels are kept and the slide is warned of. The
profile here is a matrix-shaper one with its red and green primaries exchanged, so that converting visibly moves
colours (red stain becomes green), and its result is checked against Pillow's own conversion of the stored pixels."""

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageCms

from cluster.cli import build_parser, main
from cluster.cli_ingest import ingest_config
from ingest.colour import open_profile, to_srgb
from ingest.config import WsiIngestConfig
from ingest.plan import make_plan
from ingest.rendering import rendered_with
from ingest.slides import ArraySlideReader, open_slide
from ingest.synthetic import slide_array, swapped_profile, write_pyramid_tiff
from ingest.units import plan_unit, wsi_samples
from ingest.wsi import plan_tiles
from shards.schema import decode_image


def pillows(rgb: np.ndarray, icc: bytes) -> np.ndarray:
    """Pillow's own conversion of ``rgb`` from ``icc`` to sRGB, with the profile's rendering intent."""
    profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    srgb = ImageCms.createProfile("sRGB")
    intent = ImageCms.getDefaultIntent(profile)
    return np.asarray(ImageCms.profileToProfile(Image.fromarray(rgb), profile, srgb, renderingIntent=intent))


def _write(path: Path, level0: np.ndarray, icc: bytes | None, tiled: bool = True) -> Path:
    """A slide (a tiled pyramid, or level 0 alone in strips) with ``icc`` in its InterColorProfile tag."""
    if tiled:
        write_pyramid_tiff(path, level0, icc=icc)
    else:
        tifffile.imwrite(path, level0, photometric="rgb", rowsperstrip=64, iccprofile=icc, metadata=None)
    return path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("icc")
    level0 = slide_array(1024, "CE", np.random.default_rng(5))
    return {
        "profiled": _write(root / "profiled.tif", level0, swapped_profile()),
        "plain": _write(root / "plain.tif", level0, None),
        "broken": _write(root / "broken.tif", level0, b"not a profile at all" * 8),
        "strips": _write(root / "strips.tif", level0, swapped_profile(), tiled=False),
    }


def test_the_swapped_profile_moves_red_to_green():
    moved = pillows(np.array([[[200, 100, 50], [230, 230, 230]]], np.uint8), swapped_profile())
    assert moved.tolist() == [[[100, 200, 50], [230, 230, 230]]]  # grey stays grey
    assert open_profile(swapped_profile()).profile.xcolor_space.strip() == "RGB"


@pytest.mark.parametrize("name", ["profiled", "strips"])
def test_readers_give_the_embedded_profile_as_stored(slides, name):
    reader = open_slide(str(slides[name]))
    assert reader.icc_profile() == swapped_profile()
    reader.close()
    plain = open_slide(str(slides["plain"]))
    assert plain.icc_profile() is None
    plain.close()


def _samples(src: Path, tmp: Path, colour: str) -> tuple[dict[str, np.ndarray], list[str]]:
    cfg = WsiIngestConfig(sources=[str(src)], out=str(tmp / colour), tile_size=256, tissue_threshold=0.3,
                          format="png", split="train=1.0", color_profile=colour)  # fmt: skip
    [unit] = make_plan("wsi", cfg, b"k").units
    works, warnings = plan_unit(unit, cfg)
    tiles = {s["__key__"].split("_", 1)[1]: decode_image(s["png"]) for w in works for s in wsi_samples(w, cfg)}
    return tiles, warnings  # by their place (x, y), the same in copies of a slide under other names


@pytest.mark.parametrize("name", ["profiled", "strips"])
def test_applied_the_tiles_are_the_stored_pixels_in_srgb_and_ignored_they_are_kept(slides, tmp_path, name):
    kept, warned = _samples(slides[name], tmp_path, "ignore")
    converted, quiet = _samples(slides[name], tmp_path, "apply")
    assert kept.keys() == converted.keys() and len(kept) > 4
    assert all(np.array_equal(converted[k], pillows(kept[k], swapped_profile())) for k in kept)
    assert not any(np.array_equal(converted[k], kept[k]) for k in kept)  # every tile moved
    assert quiet == [] and warned == [
        "it embeds an ICC colour profile 'Crayon Colours', not applied: its tiles are in its scanner's own RGB "
        "(--color-profile apply converts them to sRGB)"
    ]


def test_the_mask_is_found_on_the_converted_image(slides):
    reader = open_slide(str(slides["profiled"]))
    kept, applied = (plan_tiles(reader, 256, None, None, 0.3, colour=c) for c in ("ignore", "apply"))
    reader.close()
    assert not kept.srgb and applied.srgb
    assert np.array_equal(applied.thumb, pillows(kept.thumb, swapped_profile()))
    assert np.array_equal(to_srgb(kept.thumb, _transform()), applied.thumb)


def _transform():
    from ingest.colour import srgb_transform

    return srgb_transform(open_profile(swapped_profile()))


def test_a_slide_without_a_profile_or_with_a_broken_one_keeps_its_pixels(slides, tmp_path):
    plain, none_said = _samples(slides["plain"], tmp_path / "p", "apply")
    as_stored, _ = _samples(slides["plain"], tmp_path / "q", "ignore")
    assert none_said == [] and all(np.array_equal(plain[k], as_stored[k]) for k in as_stored)
    broken, said = _samples(slides["broken"], tmp_path / "b", "apply")
    assert all(np.array_equal(broken[k], as_stored[k]) for k in as_stored)
    [why] = said
    assert why.startswith("its ICC profile (160 bytes) could not be read: ") and why.endswith(
        ": its pixels are kept as stored"
    )
    assert _samples(slides["broken"], tmp_path / "c", "ignore")[1] == []  # not applied: nothing to say of it


def test_an_array_slide_has_no_profile_unless_given():
    level0 = np.full((64, 64, 3), 200, np.uint8)
    assert ArraySlideReader(level0).icc_profile() is None
    assert ArraySlideReader(level0, icc_profile=b"x").icc_profile() == b"x"


def test_the_option_is_typed_recorded_and_its_library_named(capsys):
    parse = build_parser().parse_args
    cfg = ingest_config(parse(["ingest", "wsi", "a", "--out", "o", "--color-profile", "apply"]))
    assert cfg.color_profile == "apply"
    assert ingest_config(parse(["ingest", "wsi", "a", "--out", "o"])).color_profile == "ignore"
    with pytest.raises(SystemExit):
        parse(["ingest", "wsi", "a", "--out", "o", "--color-profile", "srgb"])
    assert "--color-profile" in capsys.readouterr().err
    assert "littlecms" in rendered_with(cfg) and "littlecms" not in rendered_with(cfg.model_copy(update={
        "color_profile": "ignore"}))  # fmt: skip
    with pytest.raises(SystemExit):  # slides only
        main(["ingest", "dicom", "a", "--out", "o", "--color-profile", "apply"])
    assert "unrecognized arguments: --color-profile apply" in capsys.readouterr().err
