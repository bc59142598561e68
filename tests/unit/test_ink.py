"""Pen marks (``--pen-marks``): each ink is found and no stain is taken for one (but red cells for red ink, as its
help says); inked tiles are not cut, the tissue is found as on a slide without ink, and the preview shows the ink."""

import cv2
import numpy as np
import pytest

from cluster.cli import build_parser, main
from cluster.cli_ingest import ingest_config
from ingest.ink import ink_mask
from ingest.preview import preview_png
from ingest.slides import ArraySlideReader
from ingest.wsi import plan_tiles

STAINS = {
    "hematoxylin, dense": (73, 48, 125),
    "hematoxylin, light": (160, 140, 200),
    "hematoxylin, blued": (90, 100, 170),
    "eosin": (230, 150, 200),
    "fibrin (LAA)": (150, 110, 190),
    "dark clump": (60, 30, 90),
}
RED_CELLS = {"red cells": (200, 60, 70), "red cells (CE)": (196, 64, 92)}
PENS = {
    "blue": [(30, 60, 150), (20, 30, 90), (40, 50, 140)],  # felt tip, navy, ballpoint
    "green": [(40, 140, 70), (20, 80, 50), (30, 120, 120)],  # and a teal
    "black": [(25, 25, 30)],
    "red": [(200, 30, 40)],
}


def _swatches(colours: list[tuple[int, int, int]]) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Patches of 12 px of each colour on glass, 8 px apart, and their centres."""
    img = np.full((24, 20 * len(colours) + 8, 3), 240, np.uint8)
    for i, c in enumerate(colours):
        img[6:18, 8 + 20 * i : 20 + 20 * i] = c
    return img, [(12, 14 + 20 * i) for i in range(len(colours))]


@pytest.mark.parametrize("ink", ["blue", "green", "black", "red"])
def test_each_ink_is_found_and_no_stain_is_taken_for_it(ink):
    img, centres = _swatches(PENS[ink] + list(STAINS.values()))
    found = ink_mask(img, [ink])
    assert [bool(found[c]) for c in centres] == [True] * len(PENS[ink]) + [False] * len(STAINS)
    assert not found[0, 0]  # glass


def test_red_ink_takes_red_cells_for_ink_and_the_others_do_not():
    img, centres = _swatches(list(RED_CELLS.values()))
    assert all(ink_mask(img, ["red"])[c] for c in centres)
    assert not ink_mask(img, ["blue", "green", "black"]).any()


def test_specks_are_not_ink_and_a_stroke_is_found_to_its_faint_edge():
    img = np.full((64, 64, 3), 240, np.uint8)
    img[5:8, 5:8] = (40, 140, 70)  # 9 px: precipitate, not a stroke
    cv2.line(img, (10, 40), (60, 40), (40, 140, 70), 5)
    img[37] = img[44] = (170, 215, 180)  # the pale rim where the ink thins out
    found = ink_mask(img, ["green"])
    assert not found[5:8, 5:8].any()
    assert found[36:46, 12:58].all()


def _slide(faint=False) -> np.ndarray:
    """A slide of stained tissue (or faintly stained) with a thick green stroke across glass and tissue."""
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(238, 3, (2048, 2048, 3)), 0, 255).astype(np.uint8)
    colour = (215, 170, 200) if faint else (196, 64, 92)
    img[300:1500, 300:1500] = np.clip(np.array(colour) + rng.normal(0, 6, (1200, 1200, 3)), 0, 255).astype(np.uint8)
    cv2.line(img, (100, 1900), (1900, 1000), (30, 130, 60), 120)
    return img


def _tiles(img, **kw) -> set[tuple[int, int]]:
    return {(t.x, t.y) for t in plan_tiles(ArraySlideReader(img, levels=4, mpp=0.5), 128, None, None, 0.3, **kw).tiles}


def _ink_in(x: int, y: int, ink: np.ndarray, d: float) -> float:
    return float(ink[round(y / d) : round((y + 128) / d), round(x / d) : round((x + 128) / d)].mean())


def test_inked_tiles_are_not_cut_and_the_rest_are_as_without_pen():
    img = _slide()
    before = _tiles(img)
    plan = plan_tiles(ArraySlideReader(img, levels=4, mpp=0.5), 128, None, None, 0.3, inks=["green"])
    after = {(t.x, t.y) for t in plan.tiles}
    on_glass = [(x, y) for x, y in before if not (300 <= x < 1500 and 300 <= y < 1500)]
    assert on_glass, "without --pen-marks the stroke over glass is cut as tissue"
    assert all(300 - 128 < x < 1500 and 300 - 128 < y < 1500 for x, y in after)  # tissue only
    assert all(_ink_in(x, y, plan.ink, plan.mask_downsample) <= 0.05 for x, y in after)
    clean = {(x, y) for x, y in before if _ink_in(x, y, plan.ink, plan.mask_downsample) == 0}
    assert clean and clean <= after  # a tile no ink touches is cut as before
    any_ink = _tiles(img, inks=["green"], ink_max=1.0)  # ink not tissue, and no tile left out for ink
    cut = any_ink - after
    assert after <= any_ink and cut and all(_ink_in(x, y, plan.ink, plan.mask_downsample) > 0.05 for x, y in cut)
    [warning] = plan.warnings
    assert warning.startswith("pen marks over ") and f"; {len(cut)} tile(s) with tissue and more than 5% ink" in warning
    assert plan_tiles(ArraySlideReader(_slide(), levels=4), 128, None, None, 0.3, inks=["blue"]).warnings == []


def test_faint_tissue_is_found_beside_ink_as_without_it():
    """The stroke's saturation pushed Otsu's threshold above faintly stained tissue (8 of its tiles cut, not 67)."""
    img = _slide(faint=True)
    inside = [(x, y) for x in range(384, 1500 - 127, 128) for y in range(384, 1500 - 127, 128)]  # whole in it
    assert len(_tiles(img) & set(inside)) < len(inside) / 4
    plan = plan_tiles(ArraySlideReader(img, levels=4, mpp=0.5), 128, None, None, 0.3, inks=["green"])
    kept = {(t.x, t.y) for t in plan.tiles}
    untouched = [xy for xy in inside if _ink_in(*xy, plan.ink, plan.mask_downsample) == 0]
    assert len(untouched) > 40 and set(untouched) <= kept


def test_the_preview_outlines_the_ink_in_magenta():
    plan = plan_tiles(ArraySlideReader(_slide(), levels=4, mpp=0.5), 128, None, None, 0.3, inks=["green"])
    for ink, magenta in ((plan.ink, True), (None, False)):
        png = preview_png(plan.thumb, plan.mask, plan.mask_downsample, plan.tiles, ink)
        rgb = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
        assert bool((rgb == (230, 0, 230)).all(axis=2).any()) is magenta


def test_pen_marks_are_typed_as_a_list_of_known_colours(capsys):
    parse = build_parser().parse_args
    cfg = ingest_config(parse(["ingest", "wsi", "a", "--out", "o", "--pen-marks", "green,blue", "--pen-max", "0.1"]))
    assert (cfg.pen_marks, cfg.pen_max) == (["green", "blue"], 0.1)
    assert ingest_config(parse(["ingest", "wsi", "a", "--out", "o"])).pen_marks == []
    assert ingest_config(parse(["ingest", "wsi", "a", "--out", "o", "--pen-marks", "none"])).pen_marks == []
    assert main(["ingest", "wsi", "a", "--out", "o", "--pen-marks", "purple"]) == 1
    assert "--pen-marks" in capsys.readouterr().err


def test_a_dataset_says_its_pen_marks_and_their_limit_only_where_looked_for():
    from cluster.cli_dataset import made_with
    from ingest.config import WsiIngestConfig

    plain = made_with(WsiIngestConfig(sources=["a"], out="o").public())
    assert "pen" not in plain and "tissue_threshold=0.3" in plain
    pens = made_with(WsiIngestConfig(sources=["a"], out="o", pen_marks=["green", "black"], pen_max=0.1).public())
    assert "pen_marks=green,black pen_max=0.1" in pens
