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


def test_a_run_none_of_whose_workers_can_start_says_so_and_goes_on_when_one_can(stack, tmp_path, capsys, monkeypatch):
    """Every CPU held (by a training run, say): the run says, after a while, that its workers wait for room, and
    completes once a CPU is free. Before, it waited without a word."""
    import threading
    import time

    from ray.util.placement_group import placement_group, remove_placement_group

    from ingest import actors
    from ingest.runner import run_ingest
    from ingest.synthetic import make_slides

    monkeypatch.setattr(actors, "NO_ROOM_NOTE_S", 1.0)
    make_slides(tmp_path / "slides", n=2, size=1024, seed=6)
    held = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(held.ready(), timeout=60)
    cfg = WsiIngestConfig(
        sources=[str(tmp_path / "slides")], out=str(tmp_path / "out"), tile_size=128, workers=2, split="train=1.0"
    )
    done: dict = {}
    run = threading.Thread(target=lambda: done.update(manifest=run_ingest("wsi", cfg)[0]), daemon=True)
    out = ""
    try:
        run.start()
        deadline = time.monotonic() + 60
        while "no ingest worker has started" not in out and time.monotonic() < deadline and run.is_alive():
            time.sleep(0.5)
            out += capsys.readouterr().out
        assert "no ingest worker has started in 1 s: the cluster has no room for one (each needs 1 CPU; 0 of" in out
        assert run.is_alive()  # still waiting, for room
    finally:
        remove_placement_group(held)
    run.join(timeout=120)
    assert not run.is_alive()
    assert [r.status for r in done["manifest"].inputs] == ["ingested"] * 2
