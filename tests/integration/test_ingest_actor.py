"""Ingest actors on the cluster: OpenCV held to the CPUs Ray gave each (OpenCV ignores Ray's OMP_NUM_THREADS), a
run that has room for some or none of them, workers that render otherwise than their driver."""

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
    completes once a CPU is free, on as many workers as the cluster has CPUs. Before, it waited without a word,
    and ran on one worker (one per CPU free at its start, at least one)."""
    import threading
    import time

    from ray.util.placement_group import placement_group, remove_placement_group

    from ingest import actors, runner
    from ingest.runner import run_ingest
    from ingest.synthetic import make_slides

    monkeypatch.setattr(actors, "NO_ROOM_NOTE_S", 1.0)
    asked = []
    monkeypatch.setattr(runner, "Scheduler", lambda cfg, n: asked.append(n) or actors.Scheduler(cfg, n))
    make_slides(tmp_path / "slides", n=2, size=1024, seed=6)
    held = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(held.ready(), timeout=60)
    cfg = WsiIngestConfig(
        sources=[str(tmp_path / "slides")], out=str(tmp_path / "out"), tile_size=128, split="train=1.0"
    )  # workers: the default
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
    assert asked == [ray.cluster_resources()["CPU"]]


def test_workers_on_another_image_than_the_driver_are_named_after_the_work(stack, tmp_path, capsys, monkeypatch):
    """A dataset amended by a run whose driver renders as the dataset was rendered (said nothing before the work)
    but whose workers render otherwise (nodes on another image): the run says so after the work and records the
    workers' rendering."""
    from ingest import rendering
    from ingest.runner import run_ingest
    from ingest.synthetic import make_slides
    from shards import manifest as mf

    make_slides(tmp_path / "slides", n=1, size=1024, seed=7)
    out = str(tmp_path / "out")
    cfg = WsiIngestConfig(sources=[str(tmp_path / "slides")], out=out, tile_size=128, workers=1, split="train=1.0")
    made, _ = run_ingest("wsi", cfg)
    workers = made.rendered_with
    made.rendered_with = workers | {"numpy": "1.26.4"}  # as if made on an image with an older numpy
    mf.save(made, out)
    monkeypatch.setattr(rendering, "rendered_with", lambda _cfg: made.rendered_with)  # the driver on that image
    make_slides(tmp_path / "slides", n=1, size=1024, seed=8, first=1)  # one slide more
    capsys.readouterr()
    amended, _ = run_ingest("wsi", cfg.model_copy(update={"append": True}))
    said = capsys.readouterr().out
    assert "rendered otherwise than this run renders" not in said  # the driver: alike
    note = f"{out}: its samples were rendered otherwise than this run's workers rendered on nodes unlike its driver "
    assert note + f"(numpy 1.26.4 -> {workers['numpy']})" in said
    assert amended.amended[-1].rendered_with == workers


def test_the_actors_convert_a_slide_to_srgb_from_its_colour_profile(stack, tmp_path):
    """``--color-profile apply`` on the cluster: the actors that plan and cut the slide convert its tiles (each the
    stored tile in sRGB, as Pillow converts it), and the dataset records the choice and LittleCMS's version."""
    import io
    import json

    import numpy as np
    from PIL import Image, ImageCms

    from ingest.runner import run_ingest
    from ingest.synthetic import slide_array, swapped_profile, write_pyramid_tiff
    from shards.schema import decode_image
    from shards.writer import read_tar_samples

    icc = swapped_profile()
    write_pyramid_tiff(tmp_path / "s.tif", slide_array(1024, "CE", np.random.default_rng(2)), icc=icc)
    tiles = {}
    for colour in ("ignore", "apply"):
        cfg = WsiIngestConfig(sources=[str(tmp_path / "s.tif")], out=str(tmp_path / colour), tile_size=128,
                              format="png", split="train=1.0", color_profile=colour, workers=1)  # fmt: skip
        manifest, _ = run_ingest("wsi", cfg)
        [shard] = (tmp_path / colour / "train").glob("shard-*.tar")
        tiles[colour] = {s["__key__"]: decode_image(s["png"]) for s in read_tar_samples(shard)}
        warned = [w for w in manifest.inputs[0].warnings if "ICC colour profile" in w]
        assert len(warned) == (colour == "ignore")  # ignored: said; applied: nothing to say
    profile, srgb = ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB")
    intent = ImageCms.getDefaultIntent(profile)
    assert tiles["apply"].keys() == tiles["ignore"].keys() and len(tiles["apply"]) > 4
    for key, stored in tiles["ignore"].items():
        want = np.asarray(ImageCms.profileToProfile(Image.fromarray(stored), profile, srgb, renderingIntent=intent))
        assert np.array_equal(tiles["apply"][key], want), key
    recorded = json.loads((tmp_path / "apply" / "manifest.json").read_text())
    assert recorded["config"]["color_profile"] == "apply" and "littlecms" in json.dumps(recorded)
