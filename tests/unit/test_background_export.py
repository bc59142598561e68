import json

import numpy as np
import pytest
import torch

from ingest.background import BackgroundFilter
from ingest.model_files import fetch_model
from training.config import ModelConfig
from training.export import load_export, save_export
from training.models import build_model


class Brightness(torch.nn.Module):
    """Calls a tile background (class 0) the brighter it is: logits ``[N, 2]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.mean(dim=(1, 2, 3))
        return torch.stack([b * 10, -b * 10], dim=1)


def _tiles():
    glass = np.full((48, 48, 3), 245, np.uint8)
    tissue = np.full((48, 48, 3), (150, 40, 90), np.uint8)
    return [("glass", glass), ("tissue", tissue), ("glass2", glass.copy())]


def test_torchscript_filter_drops_what_it_calls_background(tmp_path):
    path = tmp_path / "bg.ts"
    torch.jit.script(Brightness()).save(str(path))
    f = BackgroundFilter(fetch_model(str(path)), threshold=0.5, background_class=0, input_size=32, batch=2)
    probs = f.background_prob([rgb for _, rgb in _tiles()])
    assert probs[0] > 0.99 and probs[1] < 0.01
    assert [tag for tag, _ in f.filter(_tiles())] == ["tissue"]


def test_export_round_trip_and_as_background_model(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(name="mobilenetv3_small_050")
    model = build_model(cfg, 2).eval()
    folder = save_export(model, tmp_path / "export", cfg, ["background", "tissue"], 64)
    assert json.loads((folder / "model.json").read_text())["classes"] == ["background", "tissue"]
    x = torch.randn(2, 3, 64, 64)
    again, desc = load_export(folder)
    assert desc["image_size"] == 64
    torch.testing.assert_close(again(x), model(x))
    f = BackgroundFilter(fetch_model(str(folder)))
    assert f.background_class == 0 and f.input_size == 64
    expected = torch.softmax(model(f._tensor([rgb for _, rgb in _tiles()])), 1)[:, 0].detach().numpy()
    np.testing.assert_allclose(f.background_prob([rgb for _, rgb in _tiles()]), expected, rtol=1e-4, atol=1e-5)


def test_a_file_that_is_no_model_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="background model"):
        BackgroundFilter(fetch_model(str(bad)))


def test_a_wrong_background_model_fails_the_plan_before_any_work(tmp_path):
    """The driver loads the model once: a run with a wrong one stops before its workers start (each of which
    would otherwise die in its creation with the same error)."""
    from ingest.config import WsiIngestConfig
    from ingest.plan import make_plan

    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a.svs").touch()
    bad = tmp_path / "bad.ts"
    bad.write_bytes(b"nonsense")
    common = {"sources": [str(tmp_path / "slides")], "out": str(tmp_path / "out")}
    with pytest.raises(FileNotFoundError, match=f"background model {tmp_path / 'none.ts'}: no such file or folder"):
        make_plan("wsi", WsiIngestConfig(**common, background_model=str(tmp_path / "none.ts")), b"k")
    with pytest.raises(ValueError, match=f"background model {bad}: not TorchScript"):
        make_plan("wsi", WsiIngestConfig(**common, background_model=str(bad)), b"k")
    assert len(make_plan("wsi", WsiIngestConfig(**common), b"k").units) == 1
    assert not (tmp_path / "out").exists()


def test_the_width_of_specimen_training_tiles_showed():
    from training.export import tile_width_um

    metas = [{"mpp": 1.0}, {"mpp": 1.0}, {"mpp": 2.0}, {"mpp": None}, {}]  # stored µm/px; two slides, one without
    assert tile_width_um(metas, {"tile_size": 600, "store_size": 256}) == 256.0  # 256 stored px of 1 µm
    assert tile_width_um(metas, {"tile_size": 128, "store_size": None}) == 128.0
    assert tile_width_um([{"mpp": 0.5}, {"mpp": 0.75}], {"tile_size": 100}) == 62.5  # the median
    assert tile_width_um([{"slices": 3}], {"tile_size": 100}) is None  # not slide tiles
    assert tile_width_um([{"mpp": 0.5}], {}) is None  # no tile size: images, series
    # samples that record their width (slide tiles now, images ingested with --mpp) need no options
    assert tile_width_um([{"mpp": 2.0, "width_um": 96.0}, {"width_um": 100.0}, {"width_um": None}], {}) == 98.0


def test_tiles_of_another_scale_than_the_background_models_are_warned_of():
    from ingest.wsi import scale_mismatch

    assert scale_mismatch(300.0, 300.0, 600) is None
    assert scale_mismatch(300.0, 360.0, 600) is None  # within 1.25x either way
    assert scale_mismatch(300.0, 250.0, 600) is None
    assert scale_mismatch(None, 600.0, 600) is None and scale_mismatch(300.0, None, 600) is None  # unknown
    said = scale_mismatch(300.0, 600.0, 600)
    assert said == (
        "its tiles are 600 µm across and the background model's training tiles were 300 µm (2x): its calls may be "
        "wrong at this scale (--mpp 0.5 matches it)"
    )
    assert "(0.25x)" in scale_mismatch(400.0, 100.0, 200) and "--mpp 2 " in scale_mismatch(400.0, 100.0, 200)


def test_a_slide_tiled_at_another_scale_than_the_background_model_is_warned_of(tmp_path):
    """An export records its training tiles' width; planning a slide whose tiles differ warns of it, one that
    matches does not (the synthetic slides are at 0.5 µm/px: 128 px tiles are 64 µm across)."""
    from ingest.config import WsiIngestConfig
    from ingest.synthetic import make_slides
    from ingest.units import Unit, plan_slide

    paths, _ = make_slides(tmp_path / "slides", n=1, size=1024, seed=3)
    cfg = ModelConfig(name="mobilenetv3_small_050")
    model = build_model(cfg, 2).eval()
    unit = Unit("u", "wsi", [str(paths[0])], "slide", "patient", 0)
    ingest = WsiIngestConfig(sources=[str(paths[0])], out=str(tmp_path / "out"), tile_size=128, tissue_threshold=0.01)
    warned = {}
    for um in (64.0, 256.0, None):
        folder = save_export(model, tmp_path / f"export{um}", cfg, ["background", "tissue"], 64, tile_um=um)
        assert json.loads((folder / "model.json").read_text())["tile_um"] == um
        f = BackgroundFilter(fetch_model(str(folder)))
        assert f.tile_um == um
        works, warned[um] = plan_slide(unit, ingest, f)
        assert works
    assert warned[64.0] == [] and warned[None] == []
    assert warned[256.0] == [
        "its tiles are 64 µm across and the background model's training tiles were 256 µm (0.25x): its calls may be "
        "wrong at this scale (--mpp 2 matches it)"
    ]


def test_samples_of_another_scale_than_the_models_training_are_warned_of():
    from training.export import scale_difference

    assert scale_difference(64.0, 70.0) is None and scale_difference(None, 64.0) is None
    assert scale_difference(64.0, None) is None
    assert scale_difference(64.0, 32.0) == (
        "these samples show 32 µm of specimen each and the model's training samples 64 µm (0.5x): the metrics "
        "measure it at a scale it was not trained on"
    )
