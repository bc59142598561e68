"""An ingest actor holds OpenCV to the CPUs Ray gave it (OpenCV ignores Ray's OMP_NUM_THREADS)."""

import os

import pytest
import ray

from ingest.actors import IngestWorker
from ingest.config import WsiIngestConfig


def test_an_ingest_actor_runs_opencv_on_as_many_threads_as_it_holds_cpus(stack, tmp_path):
    def opencv_threads(_self) -> int:
        import cv2

        return cv2.getNumThreads()

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a node with more cores than the actor holds")
    cfg = WsiIngestConfig(sources=[str(tmp_path)], out=str(tmp_path / "out"))
    actor = IngestWorker.options(num_cpus=1).remote(cfg)
    try:
        assert ray.get(actor.__ray_call__.remote(opencv_threads)) == 1
    finally:
        ray.kill(actor)


def test_a_run_goes_on_with_the_workers_the_cluster_has_room_for(stack, tmp_path, capsys):
    """Two workers asked for where the cluster has a CPU free (the other held, as a training run holds its own):
    the run gives work only to the worker that started, and ends, saying so. Before, the worker still waiting
    for a CPU was given a slide at once, and the run waited for it as long as the CPU stayed held."""
    from ray.util.placement_group import placement_group, remove_placement_group

    from ingest.runner import run_ingest
    from ingest.synthetic import make_slides

    make_slides(tmp_path / "slides", n=2, size=1024, seed=5)
    held = placement_group([{"CPU": ray.cluster_resources()["CPU"] - 1}])
    ray.get(held.ready(), timeout=60)
    try:
        cfg = WsiIngestConfig(
            sources=[str(tmp_path / "slides")], out=str(tmp_path / "out"), tile_size=128, workers=2, split="train=1.0"
        )
        manifest, _ = run_ingest("wsi", cfg)
    finally:
        remove_placement_group(held)
    assert [r.status for r in manifest.inputs] == ["ingested"] * 2
    assert "1 of 2 ingest workers started: the cluster had no room for the rest" in capsys.readouterr().out
