"""Lanes: several CPU-mode DALI pipelines sharing one worker's loader threads, each reading its own part of the
worker's share, taken in turn by :class:`shards.dali.ShardBatches`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

# Loader threads per CPU-mode pipeline ("lane"), from the H200 machine's 16 cores (see :func:`lane_count`).
THREADS_PER_LANE = 4


def lane_count(
    threads: int, gpu: bool, share: int, batch_size: int, steps: int | None = None, wanted: int | None = None
) -> int:
    """How many CPU-mode pipelines ("lanes") a worker's ``threads`` loader threads are split into.

    DALI runs a pipeline's CPU operators one after another (``OperatorConcurrency``: CPU operators never run
    in parallel), each spread over the batch's samples, so every thread waits at each operator's end for the
    slowest sample: one pipeline does not fill many cores. Several pipelines, each reading its own part of the
    share, wait independently. The loader benchmark's pipeline on 16 cores (images/s): one pipeline of 16
    threads 1341, 2 x 8 1827, 4 x 4 2001, 8 x 2 1998, 16 x 1 1891 (there, with CUDA present, a CPU-mode
    pipeline took about a second to build; on the 2-core VM without it, 15 ms). A GPU pipeline stays whole
    (its decoding and augmentation are on the GPU). Every lane gets at least a batch of the ``share`` (and a
    training pass's ``steps``), so a small split is read as before. ``wanted`` replaces the number from the
    threads (a recipe's ``data.loader_lanes``), within those bounds.
    """
    if gpu:
        return 1
    return max(1, min(wanted_lanes(threads, wanted), share // batch_size, steps or share))


def wanted_lanes(threads: int, wanted: int | None = None) -> int:
    """The lanes ``threads`` loader threads make before :func:`lane_count`'s bounds: one per
    :data:`THREADS_PER_LANE`, or ``wanted``."""
    return wanted or math.ceil(threads / THREADS_PER_LANE)


def lane_threads(threads: int, lanes: int) -> list[int]:
    """``threads`` split between ``lanes`` as evenly as whole threads go (at least one each)."""
    return [max(1, threads // lanes + (j < threads % lanes)) for j in range(lanes)]


def describe(threads: int, lanes: int) -> str:
    """``lanes`` and their threads as the dry run and the loader benchmark say them: "2 pipeline(s) of 3 + 2
    thread(s)"."""
    return f"{lanes} pipeline(s) of {' + '.join(str(t) for t in lane_threads(threads, lanes))} thread(s)"


def lane_parts(shard_id: int, lanes: int) -> range:
    """The parts of ``num_shards * lanes`` that worker ``shard_id``'s ``lanes`` read, lane ``j`` the ``j``-th:
    consecutive, so together exactly the worker's share of ``num_shards``."""
    return range(shard_id * lanes, (shard_id + 1) * lanes)


def deal(order: np.ndarray, batch_size: int, lanes: int) -> list[np.ndarray]:
    """A worker's sample ``order`` (whole batches) dealt to ``lanes`` a batch each in turn: the lanes' batches
    taken in turn are ``order``'s."""
    batches = order.reshape(-1, batch_size)
    return [batches[j::lanes].ravel() for j in range(lanes)]


def build_lanes(
    lanes: int,
    *where: Any,
    shard_id: int = 0,
    num_shards: int = 1,
    seeds: list[int] | None = None,
    num_threads: int = 1,
    sources: list | None = None,
    **options: Any,
) -> list:
    """``lanes`` built pipelines that read worker ``shard_id``'s share together: lane ``j`` reads part
    ``lane_parts(shard_id, lanes)[j]`` of ``num_shards * lanes`` (:func:`lane_parts`), with its
    share of ``num_threads``, seed ``seeds[j]`` and source ``sources[j]``. One lane is :func:`build_pipeline`'s
    own pipeline. ``where`` (shard URLs, index paths, batch size, image size, train) and ``options`` (device_id,
    augment, frames, labelled) go to :func:`build_pipeline`."""
    from shards.dali import build_pipeline  # here: shards.dali takes lane_parts from this module

    threads = lane_threads(num_threads, lanes)
    return [
        build_pipeline(
            *where,
            shard_id=part,
            num_shards=num_shards * lanes,
            seed=seeds[j] if seeds else 0,
            num_threads=threads[j],
            source=sources[j] if sources else None,
            **options,
        )
        for j, part in enumerate(lane_parts(shard_id, lanes))
    ]
