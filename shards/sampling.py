"""Random access to a split's samples through the shards' ``.idx``, for samplers that choose which samples an
epoch sees (DALI's WebDataset reader streams a worker's shards, shuffled within a buffer, and cannot), and for
object stores, where that reader is latency-bound.

A sample's members lie together in its shard, so one ranged read (a ``pread`` locally, one GET on S3) fetches
all of them, and many such reads are in flight at once. DALI's reader instead issues its S3 reads one after
another, several per sample: with 20 ms added to each request it fell from 243 to 15 images/s in
``benchmarks/loader.py --s3``, where these ranged reads kept 276.

The balanced sampler is paper 003's (§6.3.2): samples are drawn with replacement with weights
``1 / n_c`` of their class, so every class is drawn equally often; the majority class is under-sampled and the
minority over-sampled (a hybrid of both), as PyTorch's ``WeightedRandomSampler`` does with those weights.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from shards import storage
from shards.dali import shard_range
from shards.index import Member, find_member, parse_index
from shards.schema import class_label

Sample = tuple[int, list[Member]]  # (shard number in the split, the sample's members in tar order)


def split_samples(index_paths: list[str]) -> list[Sample]:
    """Every sample of a split, in shard then tar order, from the local copies of its ``.idx`` files."""
    samples: list[Sample] = []
    for shard, path in enumerate(index_paths):
        with open(path) as f:
            samples += [(shard, members) for members in parse_index(f.read())]
    return samples


def balanced_indices(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` sample indices drawn with replacement so that each class present is equally likely.

    A sample of class ``c`` has weight ``1 / n_c``: classes are drawn uniformly, then a sample within the class.
    Unlabelled samples (``-1``) are never drawn.
    """
    labelled = np.flatnonzero(labels >= 0)
    if not len(labelled):
        raise ValueError("no labelled samples to draw from")
    _, inverse, counts = np.unique(labels[labelled], return_inverse=True, return_counts=True)
    weights = 1.0 / counts[inverse]
    return labelled[rng.choice(len(labelled), size=n, replace=True, p=weights / weights.sum())]


def shuffled_indices(total: int, rank: int, world: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """Worker ``rank``'s ``n`` samples of an epoch: its disjoint share of one global permutation of ``total``
    (the same ``rng`` state on every worker), repeated if ``n`` is more than the share."""
    start, end = shard_range(total, rank, world)
    share = rng.permutation(total)[start:end]
    if not len(share):
        raise ValueError(f"worker {rank} of {world} has no samples (the split has {total})")
    return np.resize(share, n)


def eval_indices(total: int, rank: int, world: int, batch_size: int) -> np.ndarray:
    """Worker ``rank``'s share of a split in order (the samples DALI's reader gives it), filled up to whole
    batches by repeating it (the caller trims the padding, as after the reader's ``pad_last_batch``)."""
    start, end = shard_range(total, rank, world)
    share = np.arange(start, end) if end > start else np.zeros(1, np.int64)
    return np.resize(share, -(-len(share) // batch_size) * batch_size)


def pick(members: list[Member], spec: str) -> Member:
    """The member whose extension is one of ``spec``'s ``;``-separated alternatives (the reader's ``ext``)."""
    m = find_member(members, *spec.split(";"))
    if m is not None:
        return m
    raise KeyError(f"sample {members[0].key} has no {spec} member (has {[m.ext for m in members]})")


class ShardFiles:
    """Ranged reads of a split's shards: ``pread`` on descriptors opened once locally, ranged GETs on S3,
    ``threads`` at a time (a GET's latency, not the bandwidth, is what limits a single reader)."""

    def __init__(self, urls: list[str], threads: int = 32) -> None:
        self.urls = urls
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="tessera-shard-read")

    def _fd(self, shard: int) -> int:
        with self._lock:
            if shard not in self._fds:
                self._fds[shard] = os.open(storage.parse(self.urls[shard]).path, os.O_RDONLY)
            return self._fds[shard]

    def read(self, shard: int, offset: int, size: int) -> bytes:
        url = self.urls[shard]
        try:
            if storage.parse(url).scheme == "s3":
                data = storage.get_bytes(url, size, offset)
            else:
                data = os.pread(self._fd(shard), size, offset)
        except OSError as exc:
            raise storage.StorageError(f"{url}: {exc}") from exc
        if len(data) != size:
            raise storage.StorageError(f"{url}: {size} bytes at {offset} asked, {len(data)} read (truncated shard?)")
        return data

    def read_many(self, spans: list[tuple[int, int, int]]) -> list[bytes]:
        """``read(*span)`` for each span, in order."""
        return [f.result() for f in self.submit(spans)]

    def submit(self, spans: list[tuple[int, int, int]]) -> list[Future[bytes]]:
        """``read(*span)`` for each span, started in the background."""
        return [self._pool.submit(self.read, *span) for span in spans]

    def close(self) -> None:
        self._pool.shutdown()
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def read_labels(files: ShardFiles, samples: list[Sample]) -> np.ndarray:
    """Each sample's ``.cls`` label (``-1`` where it has none): one small read per sample."""
    spans, where = [], []
    for i, (shard, members) in enumerate(samples):
        cls = find_member(members, "cls")
        if cls is not None:
            spans.append((shard, cls.offset, cls.size))
            where.append(i)
    labels = np.full(len(samples), -1, dtype=np.int64)
    labels[where] = [class_label(b) for b in files.read_many(spans)]
    return labels


class SampleSource:
    """A DALI ``external_source`` callable (batch mode): iteration ``i`` yields the members ``exts`` (the
    reader's extension specs, in order) of samples ``order[i * B : (i + 1) * B]``, one list of byte arrays per
    spec, as :func:`nvidia.dali.fn.readers.webdataset` would; ``StopIteration`` once ``order`` is used up.

    The next batch's reads start as soon as a batch is handed over, so they overlap decoding (DALI calls a
    plain callable from the thread that runs the pipeline, between runs).
    """

    def __init__(
        self, files: ShardFiles, samples: list[Sample], order: np.ndarray, batch_size: int, exts: list[str]
    ) -> None:
        self.files, self.samples, self.order = files, samples, order
        self.batch_size, self.exts = batch_size, exts
        self._ahead: tuple[int, list[Future[bytes]]] | None = None

    def __len__(self) -> int:
        return len(self.order) // self.batch_size

    def _span(self, i: int) -> tuple[int, int, int]:
        shard, members = self.samples[i]
        return shard, members[0].offset, members[-1].offset + members[-1].size - members[0].offset

    def _ids(self, iteration: int) -> np.ndarray:
        return self.order[iteration * self.batch_size : (iteration + 1) * self.batch_size]

    def _start(self, iteration: int) -> list[Future[bytes]]:
        return self.files.submit([self._span(i) for i in self._ids(iteration)])

    def __call__(self, iteration: int) -> tuple[list[np.ndarray], ...]:
        ids = self._ids(iteration)
        if len(ids) < self.batch_size:
            raise StopIteration
        ahead, self._ahead = self._ahead, None
        reads = ahead[1] if ahead and ahead[0] == iteration else self._start(iteration)
        if iteration + 1 < len(self):
            self._ahead = (iteration + 1, self._start(iteration + 1))
        outputs: list[list[np.ndarray]] = [[] for _ in self.exts]
        for i, blob in zip(ids, (f.result() for f in reads), strict=True):
            shard, members = self.samples[i]
            for out, spec in zip(outputs, self.exts, strict=True):
                try:
                    m = pick(members, spec)
                except KeyError as exc:
                    raise ValueError(f"{self.files.urls[shard]}: {exc.args[0]}") from None
                out.append(np.frombuffer(blob, np.uint8, m.size, m.offset - members[0].offset))
        return tuple(outputs)
