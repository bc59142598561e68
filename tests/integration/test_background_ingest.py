"""The second tissue stage inside the ingest actors: a TorchScript tile classifier drops glass tiles."""

import json

import torch

from ingest.config import WsiIngestConfig
from ingest.runner import run_ingest
from ingest.synthetic import make_slides
from shards import storage
from shards.writer import read_tar_samples


class Brightness(torch.nn.Module):
    """Background (class 0) logit grows with brightness; pale, mostly-glass tiles are called background."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.mean(dim=(1, 2, 3))
        return torch.stack([(b - 1.2) * 20, -(b - 1.2) * 20], dim=1)


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
