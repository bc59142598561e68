"""Lanes: a CPU-mode worker's loader threads split between several pipelines, each reading its own part of the
worker's share (shards.lanes, ShardBatches, WorkerData)."""

import hashlib

import pytest

from shards.lanes import lane_count, lane_threads
from tests.datasets import make_dataset
from training.config import load_recipe
from training.data import WorkerData


def test_many_threads_are_split_into_lanes_of_four_and_small_shares_and_gpus_stay_whole():
    assert lane_count(16, False, 10_000, 64) == 4
    assert lane_count(5, False, 10_000, 64) == 2
    assert lane_count(2, False, 10_000, 64) == 1  # this machine: one pipeline, as before
    assert lane_count(16, True, 10_000, 64) == 1  # a GPU pipeline decodes and augments on the GPU
    assert lane_count(16, False, 130, 64) == 2  # every lane reads at least a batch
    assert lane_count(16, False, 10, 64) == 1
    assert lane_count(16, False, 10_000, 64, steps=3) == 3  # and takes at least one of the pass's steps
    assert lane_count(1, False, 10_000, 64, wanted=3) == 3  # the recipe's loader_lanes
    assert lane_count(1, False, 200, 64, wanted=8) == 3
    assert lane_threads(16, 4) == [4, 4, 4, 4]
    assert lane_threads(5, 2) == [3, 2]
    assert lane_threads(2, 3) == [1, 1, 1]


def _reader(prefix, manifest, reader: str, lanes: int, rank: int = 0, world: int = 1, *more) -> WorkerData:
    overrides = [f"data.dataset={prefix}", f"data.reader={reader}", "data.image_size=16", "batch_size=3"]
    overrides += ["data.loader_threads=2", f"data.loader_lanes={lanes}", *more]
    return WorkerData(load_recipe("demo_tiles", overrides), manifest, rank, world, None)


def _digests(batches) -> list[str]:
    """Each sample's image, as a digest: the synthetic images are noise, so no two samples share one."""
    return [hashlib.sha1(image.tobytes()).hexdigest() for x, _, _ in batches for image in x]


@pytest.mark.parametrize("reader", ["stream", "ranged"])
def test_lanes_read_each_workers_share_exactly_once(tmp_path, reader):
    """Evaluation with three lanes: every sample of the split once across two workers, each worker its own
    share (the one lane's), each lane's padding trimmed."""
    prefix = str(tmp_path / "ds")
    manifest = make_dataset(prefix, {"train": 8, "val": 23}, shard_samples=4)
    for rank in range(2):
        one, three = _reader(prefix, manifest, reader, 1, rank, 2), _reader(prefix, manifest, reader, 3, rank, 2)
        try:
            assert three.lanes(23, None) == 3 and one.lanes(23, None) == 1
            batches = three.batches("val", 0, False)
            assert len(batches.pipes) == 3 and sum(batches.shares) == batches.share == (11 if rank == 0 else 12)
            want, got = _digests(one.batches("val", 0, False)), _digests(batches)
            assert len(got) == len(set(got)) == len(want) and sorted(got) == sorted(want)
        finally:
            one.close()
            three.close()


def test_ranged_lanes_give_what_streamed_lanes_give(tmp_path):
    """Evaluation with three lanes: the ranged reader's batches are the streaming reader's, one for one."""
    prefix = str(tmp_path / "ds")
    manifest = make_dataset(prefix, {"train": 8, "val": 23}, shard_samples=4)
    stream, ranged = _reader(prefix, manifest, "stream", 3), _reader(prefix, manifest, "ranged", 3)
    try:
        want, got = list(stream.batches("val", 0, False)), list(ranged.batches("val", 0, False))
        assert (
            [len(m) for _, _, m in got] == [len(m) for _, _, m in want] == [3, 3, 3, 3, 3, 3, 1, 2, 2]
        )  # lanes of 7, 8, 8
        for (x, y, metas), (wx, wy, wmetas) in zip(got, want, strict=True):
            assert (x == wx).all() and (y == wy).all() and metas == wmetas
    finally:
        stream.close()
        ranged.close()


@pytest.mark.parametrize("sampler", ["shuffle", "balanced"])
def test_lanes_taken_in_turn_give_the_one_lanes_training_order(tmp_path, sampler):
    """Ranged reads: the worker's draws are dealt to the lanes a batch each, so the batches come in the order
    one pipeline gives (the augmentations differ: each lane has its own seed)."""
    prefix = str(tmp_path / "ds")
    manifest = make_dataset(prefix, {"train": 20, "val": 4}, shard_samples=4)
    runs = []
    for lanes in (1, 2):
        data = _reader(prefix, manifest, "ranged", lanes, 0, 1, f"data.sampler={sampler}")
        try:
            steps = data.steps_per_epoch()
            sources = data._sources("train", 1, True, steps, lanes)
            runs.append([i for b in range(steps) for i in sources[b % lanes]._ids(b // lanes)])
            batches = list(data.batches("train", 1, True))
            assert len(batches) == steps == 6 and all(x.shape == (3, 3, 16, 16) for x, _, _ in batches)
        finally:
            data.close()
    assert runs[0] == runs[1]


def test_a_streamed_training_pass_with_lanes_takes_its_steps_from_every_lane(tmp_path):
    """DALI's reader: lane 0 streams the first half of the worker's (epoch-ordered) shards, lane 1 the second;
    a shard is a patient here, and each lane's half holds at least two samples of each of its patients."""
    prefix = str(tmp_path / "ds")
    manifest = make_dataset(prefix, {"train": 20, "val": 4}, shard_samples=4, samples_per_patient=4)
    data = _reader(prefix, manifest, "stream", 2)
    try:
        batches = data.batches("train", 0, True)
        assert len(batches.pipes) == 2 and batches.shares == [10, 10]
        patients = [m["patient"] for _, _, metas in batches for m in metas]
        assert len(patients) == 3 * data.steps_per_epoch() == 18
        assert sorted(set(patients)) == [f"trainp{i}" for i in range(5)]
    finally:
        data.close()


def test_loader_threads_default_to_the_workers_cpus():
    for overrides, threads in (([], 1), (["cpus_per_worker=16"], 16), (["cpus_per_worker=0.5"], 1)):
        for extra, want in (([], threads), (["data.loader_threads=3"], 3)):
            assert load_recipe("demo_tiles", [*overrides, *extra]).dali_threads == want


def test_the_dry_run_says_how_each_worker_reads():
    from cluster.cli_train import loader_line

    assert loader_line(load_recipe("demo_tiles")).endswith("on a CPU worker 1 pipeline(s) of 1 thread(s)")
    line = loader_line(load_recipe("demo_tiles", ["cpus_per_worker=14"]))
    assert line.startswith("loader: 14 DALI thread(s) per worker; on a GPU worker one pipeline (mixed decoding)")
    assert line.endswith("on a CPU worker 4 pipeline(s) of 4 + 4 + 3 + 3 thread(s)")
    assert loader_line(load_recipe("demo_tiles", ["data.loader_lanes=3"])).endswith(
        "3 pipeline(s) of 1 + 1 + 1 thread(s)"
    )
