"""DALI pipelines over WebDataset shards: decode, augment, normalise, on the GPU when there is one.

One pipeline definition serves both devices: with ``device_id=None`` DALI runs in CPU mode (decode on the CPU),
with a GPU id it uses "mixed" decoding and GPU operators. Shards may be local paths or ``s3://`` URLs (DALI
reads S3 itself, from ``AWS_ENDPOINT_URL`` and the usual keys); the small ``.idx`` files are fetched locally.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from shards import storage

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@dataclass(frozen=True)
class Augment:
    """Training augmentations, each applied to a sample with its probability (paper 000 uses 50 %)."""

    hflip: float = 0.5
    vflip: float = 0.5


def fetch_indices(shard_urls: list[str], dest: str | None = None) -> list[str]:
    """Local copies of the ``.idx`` beside each shard (DALI opens index files locally)."""
    dest = dest or tempfile.mkdtemp(prefix="tessera-idx-")
    out = []
    for i, url in enumerate(shard_urls):
        idx_url = url[: -len(".tar")] + ".idx"
        out.append(str(storage.get_file(idx_url, os.path.join(dest, f"{i:06d}.idx"))))
    return out


def shard_range(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """Samples ``[start, end)`` that DALI's reader gives shard ``shard_id`` of ``num_shards``."""
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


def build_pipeline(
    shard_urls: list[str],
    index_paths: list[str],
    batch_size: int,
    image_size: int,
    train: bool,
    shard_id: int = 0,
    num_shards: int = 1,
    seed: int = 0,
    device_id: int | None = None,
    num_threads: int = 1,
    augment: Augment | None = None,
):
    """A built DALI pipeline yielding ``(images[N, 3, S, S] float, cls bytes, json bytes)``.

    Training pipelines shuffle (seeded) and augment; evaluation pipelines read in order and pad the last
    batch so that a worker's share is read exactly once per pass.
    """
    from nvidia.dali import fn, pipeline_def, types

    aug = augment or Augment()
    gpu = device_id is not None

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed)
    def pipe():
        jpegs, cls, meta = fn.readers.webdataset(
            paths=shard_urls,
            index_paths=index_paths,
            ext=["jpg;png", "cls", "json"],
            missing_component_behavior="error",
            random_shuffle=train,
            initial_fill=256 if train else 1,
            shard_id=shard_id,
            num_shards=num_shards,
            pad_last_batch=not train,
            stick_to_shard=True,
            name="reader",
        )
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.resize(images, resize_x=image_size, resize_y=image_size)
        mirror = 0
        if train:
            mirror = fn.random.coin_flip(probability=aug.hflip)
            images = fn.flip(images, vertical=fn.random.coin_flip(probability=aug.vflip), horizontal=0)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            mirror=mirror,
        )
        return images, cls, meta

    p = pipe()
    p.build()
    return p


def _to_numpy(tensor_list) -> np.ndarray:
    if hasattr(tensor_list, "as_cpu"):
        tensor_list = tensor_list.as_cpu()
    return np.asarray(tensor_list.as_tensor())


class ShardBatches:
    """Batches from one worker's share of a split: ``(images, labels, metas)`` as NumPy / Python.

    ``steps`` fixes how many batches a training pass yields, so every worker takes the same number of
    optimiser steps; evaluation passes yield the worker's share exactly once (padding trimmed).
    """

    def __init__(self, pipeline, total: int, shard_id: int, num_shards: int, train: bool, steps: int | None):
        self.pipe = pipeline
        self.train = train
        start, end = shard_range(total, shard_id, num_shards)
        self.share = end - start
        self.batch_size = pipeline.max_batch_size
        self.steps = steps if steps is not None else math.ceil(self.share / self.batch_size)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, list[dict]]]:
        left = self.share
        for _ in range(self.steps):
            images, cls, meta = self.pipe.run()
            x = _to_numpy(images)
            labels = np.array([int(bytes(np.asarray(c)).decode()) for c in cls], dtype=np.int64)
            metas = [json.loads(bytes(np.asarray(m)).decode()) for m in meta]
            if not self.train:
                n = min(left, len(labels))
                x, labels, metas = x[:n], labels[:n], metas[:n]
                left -= n
            yield x, labels, metas
