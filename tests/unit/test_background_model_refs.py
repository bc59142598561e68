"""Where ``--background-model`` may point: a file or export folder, a training run, or a registered model version
in a real (SQLite) MLflow store; the driver reads it once, and the actors get its bytes."""

import hashlib

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from ingest.background import BackgroundFilter
from ingest.config import WsiIngestConfig
from ingest.model_files import ModelFiles, fetch_model, is_mlflow, recording
from training.config import ModelConfig
from training.export import save_export
from training.local_group import free_port
from training.models import build_model
from training.tracking import MODEL_ARTIFACT, register_model, start_run


class Brightness(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.mean(dim=(1, 2, 3))
        return torch.stack([b * 10, -b * 10], dim=1)


@pytest.fixture
def export(tmp_path):
    """A Tessera export of a tiny tissue/background classifier, as a training run writes it."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="mobilenetv3_small_050")
    return save_export(build_model(cfg, 2).eval(), tmp_path / "export", cfg, ["background", "tissue"], 64)


@pytest.fixture
def tracking(mlflow_uri, tmp_path, monkeypatch):
    uri = mlflow_uri
    MlflowClient(uri).create_experiment("strip-ai", str(tmp_path / "artifacts"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def _logged(uri: str, export) -> str:
    _, run_id = start_run(uri, "strip-ai", "strip_ai_background", {}, {})
    MlflowClient(uri).log_artifacts(run_id, str(export), MODEL_ARTIFACT)
    return run_id


def test_the_run_says_whether_the_models_scale_is_known(tmp_path, export):
    """An export records its training tiles' width, and each slide of another scale is warned of; a bare
    TorchScript file does not, and the run's line about the model says that none will be."""
    ts = tmp_path / "bg.ts"
    torch.jit.script(Brightness()).save(str(ts))
    cfg = WsiIngestConfig(sources=["x"], out="y", background_model=str(ts))
    recorded, line = recording(cfg, fetch_model(str(ts)))
    assert recorded.background_model_sha256 == hashlib.sha256(ts.read_bytes()).hexdigest()
    assert "no record of its training tiles' scale" in line
    described = ModelFiles("export", b"ts", {"tile_um": 256.0})
    assert recording(cfg, described)[1].endswith("trained on tiles 256 µm across")


def test_a_file_and_an_export_folder(tmp_path, export):
    ts = tmp_path / "bg.ts"
    torch.jit.script(Brightness()).save(str(ts))
    bare = fetch_model(str(ts))
    assert bare.description is None and bare.sha256 == hashlib.sha256(ts.read_bytes()).hexdigest()
    folder = fetch_model(str(export))
    assert folder.description["classes"] == ["background", "tissue"]
    assert folder.torchscript == (export / "model.ts").read_bytes()
    assert BackgroundFilter(folder).input_size == 64


def test_what_is_not_a_model_is_named_with_its_reason(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"background model {tmp_path / 'empty'}: a folder without model.json"):
        fetch_model(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        fetch_model(str(tmp_path / "none.ts"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model.json").write_text("{}")
    with pytest.raises(ValueError, match=r"its model\.json is not a Tessera export's: it names no classes"):
        fetch_model(str(tmp_path / "bad"))


def test_a_run_by_runs_uri_or_bare_id(tracking, export):
    run_id = _logged(tracking, export)
    want = (export / "model.ts").read_bytes()
    for ref in (f"runs:/{run_id}", f"runs:/{run_id}/model", run_id):
        assert is_mlflow(ref)
        got = fetch_model(ref)
        assert got.torchscript == want and got.description["image_size"] == 64
        assert run_id in got.source
    with pytest.raises(FileNotFoundError, match=f"background model runs:/{'0' * 32}: .*MLflow at sqlite"):
        fetch_model(f"runs:/{'0' * 32}")
    _, empty = start_run(tracking, "strip-ai", "failed before its first export", {}, {})
    with pytest.raises(FileNotFoundError, match=f"background model {empty}: it holds no runs:/{empty}/model/model"):
        fetch_model(empty)


def test_a_registered_model_by_version_latest_or_alias(tracking, export, tmp_path):
    first = _logged(tracking, export)
    assert register_model(tracking, first, "strip_ai_background") == "1"
    other = tmp_path / "other"
    cfg = ModelConfig(name="mobilenetv3_small_050")
    torch.manual_seed(1)
    save_export(build_model(cfg, 2).eval(), other, cfg, ["tissue", "background"], 32)
    second = _logged(tracking, other)
    assert register_model(tracking, second, "strip_ai_background") == "2"
    MlflowClient(tracking).set_registered_model_alias("strip_ai_background", "champion", "1")

    v1, latest = fetch_model("models:/strip_ai_background/1"), fetch_model("models:/strip_ai_background/latest")
    assert v1.torchscript == (export / "model.ts").read_bytes()
    assert latest.torchscript == (other / "model.ts").read_bytes() and latest.sha256 != v1.sha256
    assert "version 2 of run " + second in latest.source
    assert fetch_model("models:/strip_ai_background@champion").sha256 == v1.sha256
    assert BackgroundFilter(latest).background_class == 1  # the export's own class order
    with pytest.raises(FileNotFoundError, match=r"background model models:/strip_ai_background/7: .*version"):
        fetch_model("models:/strip_ai_background/7")
    with pytest.raises(FileNotFoundError, match="no registered model 'nothing' has a version"):
        fetch_model("models:/nothing/latest")
    with pytest.raises(ValueError, match="give models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS"):
        fetch_model("models:/strip_ai_background")


def test_a_tracking_server_that_does_not_answer_fails_at_once(monkeypatch):
    port = free_port()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ConnectionError, match=f"MLflow at http://127.0.0.1:{port} does not answer"):
            fetch_model("models:/strip_ai_background/latest")
    finally:
        mlflow.set_tracking_uri(None)


def test_a_multi_label_export_gives_its_background_output_a_sigmoid():
    import io

    import numpy as np

    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(Brightness()), buf)
    desc = {"classes": ["glass", "pen"], "outputs": ["Background", "pen"], "activation": "sigmoid", "image_size": 16}
    f = BackgroundFilter(ModelFiles("multi", buf.getvalue(), desc))
    glass = np.full((40, 40, 3), 250, np.uint8)
    x = f._tensor([glass])
    np.testing.assert_allclose(f.background_prob([glass]), torch.sigmoid(x.mean() * 10).numpy()[None], rtol=1e-5)
    with pytest.raises(ValueError, match="background model seq: a model of slice sequences, not of tiles"):
        BackgroundFilter(ModelFiles("seq", buf.getvalue(), desc | {"frames": 8}))


class Glass(torch.nn.Module):
    """Calls every tile background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x.mean(dim=(1, 2, 3)) * 0 + 5, x.mean(dim=(1, 2, 3)) * 0 - 5], dim=1)


def test_an_input_the_model_empties_says_so_and_each_counts_its_drops(tmp_path):
    """Without Ray: a slide's pieces of work staged through the filter as an actor does, then its record."""

    from ingest.config import WsiIngestConfig
    from ingest.plan import make_plan
    from ingest.runner import _merge, manifest_summary
    from ingest.staging import process_work
    from ingest.synthetic import make_slides
    from ingest.units import plan_unit
    from shards.manifest import Manifest

    make_slides(tmp_path / "slides", n=1, size=1024, seed=7)
    model = tmp_path / "glass.ts"
    torch.jit.script(Glass()).save(str(model))
    cfg = WsiIngestConfig(
        sources=[str(tmp_path / "slides")], out=str(tmp_path / "out"), tile_size=128, region_tiles=8,
        split="train=1.0", tissue_threshold=0.01, background_model=str(model),
    )  # fmt: skip
    plan = make_plan("wsi", cfg, b"k")
    assert plan.model.sha256 == hashlib.sha256(model.read_bytes()).hexdigest()
    unit = plan.units[0]
    works, warnings = plan_unit(unit, cfg)
    assert len(works) > 1
    records = [process_work(w, cfg, BackgroundFilter(plan.model)) for w in works]
    tiles = sum(len(w.plan.tiles) for w in works)
    assert [len(r.dropped_at) for r in records] == [len(w.plan.tiles) for w in works]
    assert sum(r.samples for r in records) == 0
    assert records[0].dropped_at[0] == (works[0].plan.tiles[0].x, works[0].plan.tiles[0].y)
    rec = _merge(unit, (works, warnings, None, None), records, cfg.background_threshold)
    assert rec.status == "skipped" and rec.background_dropped == tiles
    assert rec.reason == "no samples: the background model called each of its tiles with tissue background (P >= 0.5)"
    plain = _merge(unit, (works, warnings, None, None), [r.model_copy(update={"dropped_at": []}) for r in records])
    assert plain.background_dropped is None and plain.reason.startswith("no samples (no tissue")
    manifest = Manifest(dataset=cfg.out, kind="wsi", classes=[], config=cfg.public(), inputs=[rec])
    assert manifest_summary(manifest).startswith(
        f'no samples | inputs {{"ingested": 0, "skipped": 1, "failed": 0}} | the background model dropped {tiles} tiles'
    )


def test_the_preview_outlines_the_tiles_the_model_dropped_in_red():
    import cv2
    import numpy as np

    from ingest.preview import mark_tiles, preview_png, preview_scale
    from ingest.tiling import Tile

    thumb = np.full((200, 300, 3), 240, np.uint8)
    mask = np.zeros((200, 300), bool)
    mask[20:180, 20:280] = True
    tiles = [Tile(x=x, y=80, size0=160, tissue=1.0) for x in (80, 400, 720)]  # level 0 is 4x the thumbnail
    png = preview_png(thumb, mask, 4.0, tiles)
    scale = preview_scale(mask.shape, 4.0)
    marked = cv2.imdecode(np.frombuffer(mark_tiles(png, 160, scale, [(400, 80)]), np.uint8), cv2.IMREAD_COLOR)
    before = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    red, blue = (0, 0, 230), (230, 80, 30)  # BGR
    assert tuple(marked[20, 100]) == red and tuple(before[20, 100]) == blue  # the dropped tile's top-left corner
    assert tuple(marked[20, 20]) == blue and tuple(marked[20, 180]) == blue  # the others stay blue
    assert (marked != before).any(axis=2).sum() == 4 * 40 - 4  # its outline only

    # a tile that could not be read (left out) is outlined and crossed out in orange, the rest as they were
    crossed = cv2.imdecode(np.frombuffer(mark_tiles(png, 160, scale, damaged=[(720, 80)]), np.uint8), 1)
    orange = (0, 140, 255)
    box = crossed[20:60, 180:220]
    assert tuple(box[0, 0]) == orange and tuple(box[39, 39]) == orange and tuple(box[39, 0]) == orange  # corners
    assert tuple(box[20, 20]) == orange and tuple(box[19, 20]) == orange  # its diagonals cross in the middle
    assert tuple(crossed[20, 20]) == blue and tuple(crossed[20, 100]) == blue  # the others stay blue
    changed = (crossed != before).any(axis=2)
    assert changed[20:60, 180:220].sum() == changed.sum() > 4 * 40 - 4  # within its box: outline and cross


def test_actors_that_hold_gpus_are_as_many_as_the_nodes_hold(capsys):
    from ingest.model_files import gpu_actors

    nodes = [{"CPU": 16, "GPU": 2}, {"CPU": 8}, {"CPU": 1, "GPU": 4}]  # the last: GPUs, but one CPU for an actor
    assert gpu_actors(2, nodes, 1, fixed=True) == 2 and capsys.readouterr().out == ""
    assert gpu_actors(16, nodes, 1, fixed=True) == 3
    assert capsys.readouterr().out == "ingest actors: 3, as many as the cluster's GPUs hold at 1 each\n"
    assert gpu_actors(16, nodes, 0.5, fixed=True) == 5  # 4 halves on the first node, 1 CPU on the last
    with pytest.raises(ValueError, match=r"the cluster's 1 node\(s\) hold no actor of 1 GPU\(s\) \(GPUs per node: 0\)"):
        gpu_actors(4, [{"CPU": 8}], 1, fixed=True)
    assert gpu_actors(4, [{"CPU": 8}], 1, fixed=False) == 4  # an autoscaling cluster adds GPU nodes: it waits
    assert "the run waits until nodes with GPUs join" in capsys.readouterr().out


def test_gpus_per_worker_is_for_a_run_that_applies_a_model_and_does_not_change_the_dataset(tmp_path):
    from pydantic import ValidationError

    from ingest.config import ImagesIngestConfig, WsiIngestConfig
    from ingest.model_files import model_device

    common = dict(sources=["x"], out=str(tmp_path / "out"))
    with pytest.raises(ValidationError, match="gpus_per_worker is for the models a run applies"):
        WsiIngestConfig(gpus_per_worker=1, **common)
    with pytest.raises(ValidationError, match="gpus_per_worker is for the models a run applies"):
        ImagesIngestConfig(gpus_per_worker=1, boxes="b", crop=True, segment="grabcut", **common)
    sam = ImagesIngestConfig(gpus_per_worker=1, boxes="b", crop=True, segment="sam", **common)
    wsi = WsiIngestConfig(gpus_per_worker=0.5, background_model="m.ts", **common)
    assert wsi.output_options() == WsiIngestConfig(background_model="m.ts", **common).output_options()
    assert model_device(WsiIngestConfig(**common)) == "cpu"  # no GPU held: the CPU, whatever the node has
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model_device(sam) == model_device(wsi) == expected
