"""The second tissue stage inside the ingest actors: a TorchScript tile classifier drops glass tiles."""

import hashlib
import io
import json

import cv2
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from ingest.config import WsiIngestConfig
from ingest.runner import run_ingest
from ingest.synthetic import make_slides
from shards import storage
from shards.writer import read_tar_samples
from training.tracking import MODEL_ARTIFACT, register_model, start_run


class Brightness(torch.nn.Module):
    """Background (class 0) logit grows with brightness; pale, mostly-glass tiles are called background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.mean(dim=(1, 2, 3))
        return torch.stack([(b - 1.2) * 20, -(b - 1.2) * 20], dim=1)


class Brighter(Brightness):
    """Another model: calls more tiles background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.mean(dim=(1, 2, 3))
        return torch.stack([(b - 1.0) * 20, -(b - 1.0) * 20], dim=1)


def _tissue(url, manifest, tmp):
    out = []
    for u in manifest.shard_urls(url, "train"):
        out += [json.loads(s["json"])["tissue"] for s in read_tar_samples(storage.get_file(u, tmp / "s.tar"))]
    return out


def test_background_model_drops_glass_tiles(stack, tmp_path):
    slides = tmp_path / "slides"
    make_slides(slides, n=2, size=1024, seed=7)
    model = tmp_path / "bg.ts"
    torch.jit.script(Brightness()).save(str(model))
    common = dict(sources=[str(slides)], tile_size=128, store_size=32, split="train=1.0", tissue_threshold=0.01)
    plain, _ = run_ingest("wsi", WsiIngestConfig(out="s3://shards/bg/plain", **common))
    filtered, _ = run_ingest("wsi", WsiIngestConfig(out="s3://shards/bg/model", background_model=str(model), **common))
    n_plain = plain.splits["train"].num_samples
    n_model = filtered.splits["train"].num_samples
    assert 0 < n_model < n_plain
    kept = _tissue("s3://shards/bg/model", filtered, tmp_path)
    all_tiles = _tissue("s3://shards/bg/plain", plain, tmp_path)
    assert min(kept) > min(all_tiles)  # the palest tiles are the ones dropped
    assert sum(kept) / len(kept) > sum(all_tiles) / len(all_tiles)


def test_background_model_from_s3_or_the_registry_is_read_once_and_recorded(stack, tmp_path):
    """The model on the stack's S3 (no file on any node's disk) and the same model registered in its MLflow drop the
    same tiles; the manifest records its sha256, and a dataset made with it refuses another model."""
    slides = tmp_path / "slides"
    make_slides(slides, n=2, size=1024, seed=7)
    data = io.BytesIO()
    torch.jit.save(torch.jit.script(Brightness()), data)
    storage.put_bytes("s3://shards/bg/models/bg.ts", data.getvalue())
    sha = hashlib.sha256(data.getvalue()).hexdigest()
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.ts").write_bytes(data.getvalue())
    # trained on tiles of 256 µm, as its export records: these slides' 128 px tiles at 0.5 µm/px show 64
    desc = {"classes": ["background", "tissue"], "image_size": 128, "tile_um": 256.0}
    (export / "model.json").write_text(json.dumps(desc))
    client = MlflowClient(stack.mlflow_url)
    _, run_id = start_run(stack.mlflow_url, "bg-it", "strip_ai_background", {}, {})
    client.log_artifacts(run_id, str(export), MODEL_ARTIFACT)
    version = register_model(stack.mlflow_url, run_id, "bg_it")

    common = dict(sources=[str(slides)], tile_size=128, store_size=32, split="train=1.0", tissue_threshold=0.01)
    by_s3, _ = run_ingest(
        "wsi", WsiIngestConfig(out="s3://shards/bg/s3", background_model="s3://shards/bg/models/bg.ts", **common)
    )
    by_name, _ = run_ingest(
        "wsi", WsiIngestConfig(out="s3://shards/bg/reg", background_model="models:/bg_it/latest", **common)
    )
    assert by_s3.config["background_model_sha256"] == by_name.config["background_model_sha256"] == sha
    assert by_name.config["background_model"] == f"models:/bg_it/latest (version {version} of run {run_id})"
    assert by_s3.splits["train"].num_samples == by_name.splits["train"].num_samples
    # each actor that planned a slide warned of the other scale (the bare TorchScript file records none)
    scale = "its tiles are 64 µm across and the background model's training tiles were 256 µm (0.25x)"
    assert all(any(w.startswith(scale) for w in r.warnings) for r in by_name.inputs) and len(by_name.inputs) == 2
    assert not any(w.startswith("its tiles are") for r in by_s3.inputs for w in r.warnings)
    # each input counts the tiles the model dropped, and its preview outlines them in red
    plain, _ = run_ingest("wsi", WsiIngestConfig(out="s3://shards/bg/none", **common))
    dropped = sum(r.background_dropped for r in by_s3.inputs)
    assert dropped > 0 and by_s3.splits["train"].num_samples + dropped == plain.splits["train"].num_samples
    assert all(r.background_dropped is None for r in plain.inputs)
    for r in by_s3.inputs:
        png = storage.get_bytes(f"s3://shards/bg/s3/previews/{r.item}.png")
        red = (cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR) == (0, 0, 230)).all(axis=2).sum()
        assert (red > 0) == (r.background_dropped > 0)
    assert sorted(_tissue("s3://shards/bg/s3", by_s3, tmp_path)) == sorted(
        _tissue("s3://shards/bg/reg", by_name, tmp_path)
    )

    # the same model by another name: the dataset is already made; another model: refused, naming what differs
    again, _ = run_ingest(
        "wsi", WsiIngestConfig(out="s3://shards/bg/reg", background_model=f"models:/bg_it/{version}", **common)
    )
    assert again.created == by_name.created
    other = tmp_path / "other.ts"
    torch.jit.script(Brighter()).save(str(other))
    with pytest.raises(ValueError, match=f"background_model_sha256 '{sha}' -> '[0-9a-f]{{64}}'"):
        run_ingest("wsi", WsiIngestConfig(out="s3://shards/bg/reg", background_model=str(other), **common))
