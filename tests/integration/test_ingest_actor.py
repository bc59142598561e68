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
