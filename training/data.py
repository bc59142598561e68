"""A worker's view of the dataset: per-epoch DALI pipelines over its part of the shards."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field

from shards import manifest as mf
from shards.dali import Augment, ShardBatches, build_pipeline, epoch_order, fetch_indices
from training.config import TrainRecipe
from training.state import epoch_seed


@dataclass
class WorkerData:
    """Shards and indices of the train and validation splits, as seen by worker ``rank`` of ``world``."""

    recipe: TrainRecipe
    manifest: mf.Manifest
    rank: int
    world: int
    device_id: int | None
    _index: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        d = self.recipe.data
        self._dir = tempfile.TemporaryDirectory(prefix="tessera-idx-")
        for split in (d.train_split, d.val_split):
            if self.manifest.missing_splits(split):
                raise ValueError(
                    f"{d.dataset}: the manifest has no {self.manifest.missing_splits(split)} split "
                    f"(has {sorted(self.manifest.splits)})"
                )
            self._index[split] = fetch_indices(self.urls(split), f"{self._dir.name}/{split}")

    def urls(self, split: str) -> list[str]:
        return self.manifest.shard_urls(self.recipe.data.dataset, split)

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
        pipe = build_pipeline(
            urls,
            index,
            r.batch_size,
            d.image_size,
            train,
            self.rank,
            self.world,
            seed=epoch_seed(r.seed, epoch, self.rank),
            device_id=self.device_id,
            num_threads=d.loader_threads,
            augment=Augment(**d.augment.model_dump()),
            frames=d.frames,
        )
        total = self.manifest.num_samples(split)
        steps = self.steps_per_epoch() if train else None
        # The recipe's task decides the label: a binary recipe on an RSNA dataset reads `.cls` (any), not the vectors.
        multilabel = r.task == "multilabel"
        return ShardBatches(pipe, total, self.rank, self.world, train, steps, multilabel)

    def close(self) -> None:
        self._dir.cleanup()
