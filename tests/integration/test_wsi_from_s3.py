"""Slides on the object store: ingested like local ones, each downloaded to a worker's disk only while needed."""

import glob
import os
import tempfile
from pathlib import Path

from ingest.runner import run_ingest
from ingest.synthetic import make_slides
from shards import storage
from shards.writer import read_tar_samples
from tests.integration.commands import wsi_config


def _samples(manifest, prefix: str, tmp: Path) -> dict[str, bytes]:
    out = {}
    for split in manifest.splits:
        for url in manifest.shard_urls(prefix, split):
            for s in read_tar_samples(storage.get_file(url, tmp / "x.tar")):
                out[s["__key__"]] = s["jpg"]
    return out


def test_slides_from_s3_give_the_same_samples_as_local_files(stack, tmp_path):
    paths, _ = make_slides(tmp_path / "slides", n=3, size=1024, seed=11)
    for p in paths:
        storage.put_file(p, f"s3://shards/src-slides/{p.name}")
    leftovers = set(glob.glob(os.path.join(tempfile.gettempdir(), "tessera-src-*")))
    # several regions per slide and two workers: regions of one slide land on both, each downloads it once
    local, _ = run_ingest("wsi", wsi_config(tmp_path / "slides", "s3://shards/wsi-local", region_tiles=3, workers=2))
    remote, _ = run_ingest(
        "wsi", wsi_config("s3://shards/src-slides/", "s3://shards/wsi-remote", region_tiles=3, workers=2)
    )
    assert [r.status for r in remote.inputs] == ["ingested"] * 3
    assert sum(r.samples for r in remote.inputs) == sum(r.samples for r in local.inputs) > 6
    assert _samples(remote, "s3://shards/wsi-remote", tmp_path) == _samples(local, "s3://shards/wsi-local", tmp_path)
    # the workers deleted their copies when the run ended
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "tessera-src-*"))) <= leftovers
