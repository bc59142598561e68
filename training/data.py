"""A worker's view of the dataset: per-epoch DALI pipelines over its part of the shards."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from shards import manifest as mf
from shards import probes, scratch, storage
from shards.dali import Augment, ShardBatches, epoch_order, fetch_indices, sample_exts, shard_range
from shards.lanes import build_lanes, deal, lane_count, lane_parts
from shards.sampling import (
    Sample,
    SampleSource,
    ShardFiles,
    balanced_indices,
    eval_indices,
    read_labels,
    shuffled_indices,
    split_samples,
)
from training.config import TrainRecipe
from training.losses import class_counts
from training.state import epoch_seed


def wait_for_store(url: str, wait_s: float, who: str) -> None:
    """Wait up to ``wait_s`` while the store of ``url`` does not answer, saying so as ``who`` (``rank 0``, a sweep's
    ``trial ID``); a :class:`StorageError` if it stays down."""
    if down := probes.stores_down([url]):
        print(f"{who}: {down}; waiting up to {wait_s:.0f} s for it (data.outage_wait_s)", flush=True)
        if not probes.answers_within([url], wait_s):
            raise storage.StorageError(f"{down} for {wait_s:.0f} s")
        print(f"{who}: the store of {url} answers again; going on", flush=True)


@dataclass
class WorkerData:
    """Shards and indices of ``splits`` (default: the recipe's train and validation splits), as seen by worker
    ``rank`` of ``world``."""

    recipe: TrainRecipe
    manifest: mf.ManifestHead  # no input records: see train_counts
    rank: int
    world: int
    device_id: int | None
    _index: dict[str, list[str]] = field(default_factory=dict)
    _access: dict[str, tuple[ShardFiles, list[Sample]]] = field(default_factory=dict)
    splits: tuple[str, ...] = ()
    labelled: bool = True  # False: samples without ``.cls`` (a dataset ingested without labels), read as -1

    def __post_init__(self) -> None:
        d = self.recipe.data
        self._dir = scratch.directory("idx")
        for split in self.splits or (d.train_split, d.val_split):
            if self.manifest.missing_splits(split):
                raise ValueError(
                    f"{d.dataset}: the manifest has no {self.manifest.missing_splits(split)} split "
                    f"(has {sorted(self.manifest.splits)})"
                )
            self._index[split] = fetch_indices(self.urls(split), f"{self._dir.name}/{split}")

    def urls(self, split: str) -> list[str]:
        return self.manifest.shard_urls(self.recipe.data.dataset, split)

    def _random_access(self, split: str) -> tuple[ShardFiles, list[Sample]]:
        """Ranged reads of ``split``'s samples (the ranged reader's, the balanced sampler's and its labels')."""
        if split not in self._access:
            files = ShardFiles(self.urls(split), self.recipe.data.read_requests)
            self._access[split] = files, split_samples(self._index[split])
        return self._access[split]

    @cached_property
    def train_labels(self) -> np.ndarray:
        """Every train sample's ``.cls`` label: from the manifest, or (a manifest from before it recorded them)
        read once from the shards, one small ranged read per sample."""
        recorded = self.manifest.sample_classes(self.recipe.data.train_split)
        if recorded is not None:
            return np.array(recorded, dtype=np.int64)
        return read_labels(*self._random_access(self.recipe.data.train_split))

    def train_counts(self, classes: int) -> list[int]:
        """Train samples per class, counted from the samples themselves: a series' manifest label is ``any``
        over its slices, so per-slice labelled datasets cannot be counted from the manifest."""
        d = self.recipe.data
        if not self.manifest.multilabel and self.manifest.sample_classes(d.train_split) is None:
            # a manifest from before shards recorded their classes: its input records, rather than a read per sample
            return class_counts(mf.load(d.dataset).inputs, d.train_split, classes)
        return np.bincount(self.train_labels[self.train_labels >= 0], minlength=classes).tolist()

    def _sources(
        self, split: str, epoch: int, train: bool, steps: int | None, lanes: int = 1
    ) -> list[SampleSource] | None:
        """Each lane's samples of ``split`` by ranged reads (a :class:`SampleSource` per lane), or None for DALI's
        reader. Training draws are class-balanced (seeded by seed, epoch, rank) or this worker's share of one
        global permutation (seeded by seed, epoch), dealt to the lanes a batch each in turn, so that the lanes
        taken in turn give the one lane's order; evaluation reads each lane's part of the worker's share in
        order, as DALI's reader would."""
        r, d = self.recipe, self.recipe.data
        balanced = train and d.sampler == "balanced"
        if not (balanced or d.ranged):
            return None
        files, samples = self._random_access(split)
        if balanced:
            if not (self.train_labels >= 0).any():
                raise ValueError(f"{d.dataset}: sampler balanced, but no {split} sample has a label")
            order = balanced_indices(
                self.train_labels, steps * r.batch_size, np.random.default_rng([r.seed, epoch, self.rank])
            )
        elif train:
            rng = np.random.default_rng([r.seed, epoch])
            order = shuffled_indices(len(samples), self.rank, self.world, steps * r.batch_size, rng)
        exts = sample_exts(d.frames, self.labelled)
        if train:
            orders = deal(order, r.batch_size, lanes)
        else:
            parts = lane_parts(self.rank, lanes)
            orders = [eval_indices(len(samples), part, self.world * lanes, r.batch_size) for part in parts]
        return [SampleSource(files, samples, order, r.batch_size, exts) for order in orders]

    def steps_per_epoch(self) -> int:
        """Optimiser micro-steps per training epoch, the same on every worker."""
        d = self.recipe.data
        per_worker = d.epoch_samples or self.manifest.num_samples(d.train_split) // self.world
        return max(1, per_worker // self.recipe.batch_size)

    def batches(self, split: str, epoch: int, train: bool) -> ShardBatches:
        """One pass over this worker's part of ``split``.

        Training passes take the shards in :func:`epoch_order` for ``epoch`` and seed DALI from (seed, epoch,
        rank), so a resumed run sees the same data in the same order as an uninterrupted one.
        """
        r, d = self.recipe, self.recipe.data
        urls, index = self.urls(split), self._index[split]
        if train:
            order = epoch_order(len(urls), r.seed, epoch)
            urls, index = [urls[i] for i in order], [index[i] for i in order]
        steps = self.steps_per_epoch() if train else None
        total = self.manifest.num_samples(split)
        lanes = self.lanes(total, steps)
        augment = d.augment.model_dump()
        if r.task == "detect":  # a detector's zoom, rotation and flips move its boxes too: training.box_augment
            augment |= {"hflip": 0.0, "vflip": 0.0, "rotate_p": 0.0, "zoom_p": 0.0}
        pipes = build_lanes(
            lanes,
            urls,
            index,
            r.batch_size,
            d.image_size,
            train,
            shard_id=self.rank,
            num_shards=self.world,
            seeds=[epoch_seed(r.seed, epoch, part) for part in lane_parts(self.rank, lanes)],
            num_threads=r.dali_threads,
            sources=self._sources(split, epoch, train, steps, lanes),
            device_id=self.device_id,
            augment=Augment(**augment),
            frames=d.frames,
            labelled=self.labelled,
        )
        # The recipe's task decides the label: a binary recipe on an RSNA dataset reads `.cls` (any), not the vectors.
        multilabel = r.task == "multilabel"
        return ShardBatches(pipes, total, self.rank, self.world, train, steps, multilabel)

    def lanes(self, total: int, steps: int | None) -> int:
        """The pipelines this worker's loader threads are split into (:func:`shards.lanes.lane_count`, with
        the recipe's ``data.loader_lanes`` where it sets them); one on a GPU."""
        d = self.recipe.data
        start, end = shard_range(total, self.rank, self.world)
        gpu = self.device_id is not None
        return lane_count(self.recipe.dali_threads, gpu, end - start, self.recipe.batch_size, steps, d.loader_lanes)

    def close(self) -> None:
        for files, _ in self._access.values():
            files.close()
        self._dir.cleanup()
