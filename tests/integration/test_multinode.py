"""Two Ray nodes on one machine (the stack's head plus a worker node joined with `ray start --address`): an
ingest whose actors use both nodes, and a 2-worker training whose workers land on different nodes, as seen by
Ray's state API."""

import time

import pytest
import ray
import torch
from ray.util.state import list_actors

from cluster.stack import LocalStack
from ingest.config import WsiIngestConfig
from ingest.runner import run_ingest
from ingest.synthetic import make_slides
from shards.nodes import FIXED_ENV
from tests.integration.commands import wsi_config
from training.config import load_recipe
from training.launch import run_training


def _alive() -> int:
    return sum(1 for n in ray.nodes() if n["Alive"])


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(1)


def _nodes_of(class_name: str, before: set[str]) -> set[str]:
    actors = list_actors(filters=[("class_name", "=", class_name)], detail=True, limit=10000)
    return {a.node_id for a in actors if a.actor_id not in before}


def _ids(class_name: str) -> set[str]:
    return {a.actor_id for a in list_actors(filters=[("class_name", "=", class_name)], limit=10000)}


def test_ingest_and_training_span_two_nodes(stack, tmp_path):
    local = LocalStack(stack)
    local.add_node("second", num_cpus=2, resources={"second_node": 1})
    try:
        _wait(lambda: _alive() == 2, 60, "the second node to join")
        slides = tmp_path / "slides"
        _, labels = make_slides(slides, n=4, size=1024, seed=21)
        out = "s3://shards/multinode/wsi"
        before = _ids("IngestWorker")
        manifest, _ = run_ingest("wsi", wsi_config(slides, out, labels=str(labels), workers=4))
        assert manifest.counts()["ingested"] == 4
        assert len(_nodes_of("IngestWorker", before)) == 2, "ingest actors all on one node"

        recipe = load_recipe(
            "demo_tiles",
            [f"data.dataset={out}", "data.image_size=32", "epochs=1", "batch_size=4", "workers=2",
             "placement=strict_spread", "eval.levels=[patient]"],
        )  # fmt: skip
        before = _ids("RayTrainWorker")
        outcome = run_training(recipe, stack.mlflow_url, str(tmp_path / "ckpt"))
        assert outcome.error is None and "val_loss" in outcome.metrics
        nodes = _nodes_of("RayTrainWorker", before)
        assert len(nodes) == 2, f"training workers on {nodes}"
        assert nodes == {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        local.remove_node("second")
        _wait(lambda: _alive() == 1, 90, "the second node to leave")


class Glassy(torch.nn.Module):
    """Background (class 0) the brighter a tile is."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.mean(dim=(1, 2, 3))
        return torch.stack([(b - 1.2) * 20, -(b - 1.2) * 20], dim=1)


def test_ingest_actors_that_hold_gpus_for_the_background_model(stack, tmp_path, monkeypatch):
    """``gpus_per_worker``: on a cluster without GPUs that cannot grow, refused before any actor starts (Ray would
    wait for one without end); once a node with a GPU (as Ray counts it: this machine has none to use) joins, the
    run holds as many actors as its GPUs allow, all on that node, and applies the model (on the CPU, as CUDA
    shows nothing here)."""
    slides = tmp_path / "slides"
    make_slides(slides, n=2, size=1024, seed=5)
    model = tmp_path / "bg.ts"
    torch.jit.script(Glassy()).save(str(model))
    out = "s3://shards/multinode/gpu"
    cfg = WsiIngestConfig(
        sources=[str(slides)], out=out, tile_size=128, store_size=32, split="train=1.0", tissue_threshold=0.01,
        background_model=str(model), gpus_per_worker=1, workers=2,
    )  # fmt: skip
    monkeypatch.setenv(FIXED_ENV, "1")  # as the CLI sets it for the local stack
    with pytest.raises(ValueError, match=r"gpus_per_worker 1: the cluster's 1 node\(s\) hold no actor of 1 GPU"):
        run_ingest("wsi", cfg)
    local = LocalStack(stack)
    local.add_node("gpu", num_cpus=1, num_gpus=1)
    try:
        _wait(lambda: _alive() == 2, 60, "the GPU node to join")
        before = _ids("IngestWorker")
        manifest, _ = run_ingest("wsi", cfg)
        assert manifest.counts()["ingested"] == 2 and sum(r.background_dropped for r in manifest.inputs) > 0
        gpu_node = {n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU")}
        assert _nodes_of("IngestWorker", before) == gpu_node  # one actor (one GPU), there
    finally:
        local.remove_node("gpu")
        _wait(lambda: _alive() == 1, 90, "the GPU node to leave")
