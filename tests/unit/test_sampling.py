"""Random access to samples through the shards' ``.idx``: paper 003's balanced sampler (class-even draws with
replacement), the ranged reader (a global permutation per epoch; evaluation in order) and the DALI pipeline
fed by them."""

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from shards import manifest as mf
from shards.dali import ShardBatches, build_pipeline, fetch_indices, sample_exts
from shards.sampling import (
    SampleSource,
    ShardFiles,
    balanced_indices,
    eval_indices,
    read_labels,
    shuffled_indices,
    split_samples,
)
from shards.schema import encode_image, make_sample
from shards.writer import ShardWriter
from tests.datasets import make_dataset
from training.config import RecipeError, load_recipe
from training.data import WorkerData
from training.losses import class_counts

SIZE = 16


def _png(label: int, i: int) -> bytes:
    """A flat image whose red channel is the label (0 or 250) and green channel the sample number."""
    rgb = np.zeros((SIZE, SIZE, 3), np.uint8)
    rgb[..., 0], rgb[..., 1] = 250 * label, i
    return encode_image(rgb, "png")


@pytest.fixture
def imbalanced(tmp_path):
    """18 samples of class 0 and 2 of class 1 over shards of 6: ``(urls, index paths, labels, pngs)``."""
    labels = [1 if i in (4, 13) else 0 for i in range(20)]
    pngs = [_png(label, i) for i, label in enumerate(labels)]
    urls = []
    for start in range(0, 20, 6):
        with ShardWriter(str(tmp_path / "train"), start_index=len(urls)) as w:
            for i in range(start, min(20, start + 6)):
                w.write(make_sample(f"s{i:03d}", pngs[i], "png", labels[i], {"i": i}))
        urls += [str(tmp_path / "train" / s.name) for s in w.shards]
    assert len(urls) == 4
    return urls, fetch_indices(urls, str(tmp_path / "idx")), np.array(labels), pngs


def test_balanced_draws_every_class_equally_often_and_only_classes_present():
    labels = np.array([0] * 90 + [2] * 10)  # class 1 is absent
    draws = balanced_indices(labels, 20000, np.random.default_rng(0))
    minority = int((labels[draws] == 2).sum())
    assert binomtest(minority, 20000, 0.5).pvalue > 0.01  # even classes, not 90:10
    assert set(labels[draws]) == {0, 2}
    # Within a class every sample is equally likely: over-sampled minority, under-sampled majority.
    per_sample = np.bincount(draws, minlength=100)
    assert per_sample[90:].min() > 800 and per_sample[:90].max() < 160
    again = balanced_indices(labels, 20000, np.random.default_rng(0))
    assert np.array_equal(draws, again)
    unlabelled = np.array([-1, 0, -1, 1])
    assert set(balanced_indices(unlabelled, 200, np.random.default_rng(1))) == {1, 3}
    with pytest.raises(ValueError, match="no labelled samples"):
        balanced_indices(np.array([-1, -1]), 4, np.random.default_rng(1))


def test_sample_source_reads_the_chosen_samples_bytes_across_shards(imbalanced):
    urls, idx, labels, pngs = imbalanced
    samples = split_samples(idx)
    files = ShardFiles(urls)
    try:
        assert read_labels(files, samples).tolist() == labels.tolist()
        source = SampleSource(files, samples, np.array([13, 0, 13, 19]), 2, sample_exts(0))
        assert len(source) == 2
        images, cls, meta = source(1)
        assert [bytes(b) for b in images] == [pngs[13], pngs[19]]
        assert [bytes(b) for b in cls] == [b"1", b"0"]
        assert [json.loads(bytes(b))["i"] for b in meta] == [13, 19]
        with pytest.raises(StopIteration):
            source(2)
        with pytest.raises(ValueError, match=r"shard-000000\.tar: sample s000 has no 000.jpg;000.png member"):
            SampleSource(files, samples, np.array([0]), 1, sample_exts(2))(0)
    finally:
        files.close()


def test_a_truncated_shard_is_named(imbalanced, tmp_path):
    urls, idx, _, _ = imbalanced
    with open(urls[3], "r+b") as f:
        f.truncate(1024)
    files = ShardFiles(urls)
    try:
        with pytest.raises(RuntimeError, match=r"shard-000003\.tar: .* asked, .* read \(truncated shard\?\)"):
            read_labels(files, split_samples(idx))
    finally:
        files.close()


def test_dali_pipeline_on_the_balanced_source_decodes_the_drawn_samples(imbalanced):
    urls, idx, labels, _ = imbalanced
    samples = split_samples(idx)
    files = ShardFiles(urls)
    order = balanced_indices(labels, 64, np.random.default_rng(3))
    source = SampleSource(files, samples, order, 8, sample_exts(0))
    pipe = build_pipeline(urls, idx, 8, SIZE, train=True, source=source)
    seen = []
    try:
        for x, y, metas in ShardBatches(pipe, len(labels), 0, 1, train=True, steps=8):
            i = np.array([m["i"] for m in metas])
            seen += i.tolist()
            assert np.array_equal(y, labels[i])
            red = x[:, 0, SIZE // 2, SIZE // 2] * 0.229 * 255 + 0.485 * 255  # undo the normalisation
            assert np.allclose(red, 250 * labels[i], atol=2)  # each image is the drawn sample's
    finally:
        files.close()
    assert seen == order.tolist()  # in the sampler's order, nothing skipped or repeated by the pipeline
    assert 0.25 < labels[seen].mean() < 0.75  # class 1 is 10 % of the split


def test_class_counts_come_from_the_samples_when_labels_are_per_slice(tmp_path):
    """An RSNA series' manifest label is ``any`` over its slices; class weights must count slices."""
    prefix = str(tmp_path / "ds")
    manifest = make_dataset(prefix, {"train": 12, "val": 4}, multilabel=True, seed=1)  # seed 1: both classes in train
    recipe = load_recipe("rsna_ich_binary", [f"data.dataset={prefix}", "data.sampler=shuffle"])
    truth = WorkerData(recipe, manifest, 0, 1, None)
    expected = np.bincount(truth.train_labels, minlength=2).tolist()
    for rec in manifest.inputs:
        rec.label = 1  # as if each input were a series with one positive slice
    for shard in manifest.splits["train"].shards:
        shard.classes = None  # a manifest from before classes were recorded: read from the shards instead
    data = WorkerData(recipe, manifest, 0, 1, None)
    try:
        assert data.train_counts(2) == expected
        assert sum(expected) == 12 and expected[0] > 0
    finally:
        data.close()
        truth.close()


def test_balanced_sampler_and_class_weights_do_not_combine():
    with pytest.raises(RecipeError, match="class_weights: must be none with sampler balanced"):
        load_recipe("rsna_ich_binary", ["data.class_weights=balanced"])


def test_shuffled_shares_are_disjoint_cover_the_split_and_change_per_epoch():
    def shares(epoch: int, world: int, n: int) -> list[list[int]]:
        return [shuffled_indices(23, r, world, n, np.random.default_rng([7, epoch])).tolist() for r in range(world)]

    three = shares(0, 3, 7)  # 23 samples over 3 workers: shares of 7, 8 and 8, each asked for 7
    flat = [i for share in three for i in share]
    assert len(set(flat)) == len(flat) == 21  # disjoint
    assert sorted(shares(0, 1, 23)[0]) == list(range(23))  # one worker: every sample once
    assert shares(0, 3, 7) == three and shares(1, 3, 7) != three  # seeded by epoch, the same on every worker
    longer = shuffled_indices(23, 0, 3, 17, np.random.default_rng([7, 0]))  # more than its share: it repeats
    assert longer[:7].tolist() == three[0] and longer[7:14].tolist() == three[0]
    with pytest.raises(ValueError, match="worker 0 of 5 has no samples"):
        shuffled_indices(4, 0, 5, 8, np.random.default_rng(0))


def test_eval_shares_are_the_readers_contiguous_ones_in_whole_batches():
    assert eval_indices(10, 0, 2, 4).tolist() == [0, 1, 2, 3, 4, 0, 1, 2]  # 0..4, filled up to 2 batches
    assert eval_indices(10, 1, 2, 5).tolist() == [5, 6, 7, 8, 9]
    assert eval_indices(3, 0, 4, 2).tolist() == [0, 0]  # an empty share still makes a whole (unused) batch


def test_the_next_batch_is_read_while_one_is_handed_over(imbalanced):
    urls, idx, _, _ = imbalanced
    files = ShardFiles(urls)
    submitted = []
    submit = files.submit
    files.submit = lambda spans: submitted.append(len(spans)) or submit(spans)
    try:
        source = SampleSource(files, split_samples(idx), np.arange(12), 4, sample_exts(0))
        source(0)
        assert submitted == [4, 4]  # batch 0, and batch 1 ahead
        source(1)
        assert submitted == [4, 4, 4]  # batch 1 was already under way; batch 2 ahead
        source(2)
        assert submitted == [4, 4, 4]  # nothing after the last batch
        with pytest.raises(StopIteration):
            source(3)
    finally:
        files.close()


@pytest.mark.parametrize(("world", "frames"), [(1, 0), (2, 0), (2, 3)])
def test_ranged_reader_gives_each_worker_what_dalis_reader_gives_it(tmp_path, world, frames):
    """Evaluation: the same samples (single images or slice sequences) in the same order per worker; training:
    every sample once per epoch across the workers, in a fresh order each epoch."""
    prefix = str(tmp_path / "ds")
    manifest = make_dataset(prefix, {"train": 14, "val": 11}, shard_samples=4, frames=frames)

    def data(reader: str, rank: int) -> WorkerData:
        overrides = [f"data.dataset={prefix}", f"data.reader={reader}", "data.image_size=16", "batch_size=3"]
        if frames:  # slice sequences go to a video model
            overrides += [f"data.frames={frames}", "model.name=temporal:resnet18"]
        return WorkerData(load_recipe("demo_tiles", overrides), manifest, rank, world, None)

    orders: dict[int, list[int]] = {0: [], 1: []}
    for rank in range(world):
        stream, ranged = data("stream", rank), data("ranged", rank)
        try:
            assert ranged.recipe.data.ranged and not stream.recipe.data.ranged
            for split in ("val", "train"):  # evaluation passes (the train split's for SWA's batch norm)
                want = list(stream.batches(split, 0, False))
                got = list(ranged.batches(split, 0, False))
                assert len(got) == len(want) > 0
                for (x, y, metas), (wx, wy, wmetas) in zip(got, want, strict=True):
                    assert np.array_equal(x, wx) and np.array_equal(y, wy) and metas == wmetas
            steps = ranged.steps_per_epoch()
            assert steps == 14 // world // 3
            for epoch in orders:
                orders[epoch] += ranged._sources("train", epoch, True, steps)[0].order.tolist()
                batches = list(ranged.batches("train", epoch, True))
                assert [x.shape for x, _, _ in batches] == [(3, *([frames] if frames else []), 3, 16, 16)] * steps
        finally:
            stream.close()
            ranged.close()
    assert len(set(orders[0])) == len(orders[0]) == steps * 3 * world  # no sample twice in an epoch
    assert orders[0] != orders[1]


def test_auto_reads_s3_datasets_by_ranges_and_local_ones_by_streaming():
    assert load_recipe("demo_tiles", ["data.dataset=s3://bucket/ds"]).data.ranged
    assert not load_recipe("demo_tiles", ["data.dataset=/data/ds"]).data.ranged
    assert load_recipe("demo_tiles", ["data.dataset=/data/ds", "data.reader=ranged"]).data.ranged
    assert not load_recipe("demo_tiles", ["data.dataset=s3://bucket/ds", "data.reader=stream"]).data.ranged


@pytest.mark.parametrize("reader", ["stream", "ranged"])
def test_a_dataset_without_labels_is_read_whole_its_labels_minus_one(tmp_path, reader):
    """Inputs ingested without a label table have no ``.cls``: the reader must not ask for one (DALI's reader
    fails on a missing member), and each sample is read once, in both readers."""
    prefix = str(tmp_path / "ds")
    manifest = make_dataset(prefix, {"test": 10}, labelled=False, shard_samples=4, size=16)
    recipe = load_recipe("demo_tiles", [f"data.dataset={prefix}", "data.image_size=16", f"data.reader={reader}"])
    recipe = recipe.model_copy(update={"batch_size": 4})
    seen = []
    for rank in range(2):
        data = WorkerData(recipe, manifest, rank, 2, None, splits=("test",), labelled=False)
        try:
            for x, y, metas in data.batches("test", 0, False):
                assert x.shape[1:] == (3, 16, 16) and y.tolist() == [-1] * len(metas)
                seen += [m["patient"] for m in metas]
        finally:
            data.close()
    assert len(seen) == 10 and sorted(set(seen)) == ["testp0", "testp1", "testp2"]
    labelled_reader = WorkerData(recipe, manifest, 0, 1, None, splits=("test",))
    try:
        # why the flag: a labelled reading of it fails (DALI: an "underful" sample; the ranged reader: no cls)
        with pytest.raises((RuntimeError, ValueError), match=r"Underful sample|no cls member"):
            list(labelled_reader.batches("test", 0, False))
    finally:
        labelled_reader.close()


def test_multiclass_counts_come_from_the_shards_class_runs_or_an_older_manifests_inputs(tmp_path):
    """A worker reads the manifest without its input records: class weights come from the shards' recorded
    classes, which count what the input records count; a manifest from before they were recorded is read whole."""
    prefix = str(tmp_path / "ds")
    manifest = make_dataset(prefix, {"train": 18, "val": 6}, classes=3, samples_per_patient=2, seed=2)
    recipe = load_recipe("strip_ai_resnet50", [f"data.dataset={prefix}", "data.sampler=shuffle"])
    expected = class_counts(manifest.inputs, "train", 3)
    head, _ = mf.load_head(prefix)
    data = WorkerData(recipe, head, 0, 1, None)
    try:
        assert not hasattr(head, "inputs") and sum(expected) == 18
        assert data.train_counts(3) == expected
    finally:
        data.close()
    for shard in manifest.splits["train"].shards:
        shard.classes = None
    for rec in manifest.inputs:
        rec.label = 0  # what the records say, not what a read of each sample would find
    mf.save(manifest, prefix)
    old = WorkerData(recipe, mf.load_head(prefix)[0], 0, 1, None)
    try:
        assert old.train_counts(3) == [18, 0, 0]
    finally:
        old.close()
