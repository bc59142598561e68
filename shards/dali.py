"""DALI pipelines over WebDataset shards: decode, augment, normalise, on the GPU when there is one.

One pipeline definition serves both devices: with ``device_id=None`` DALI runs in CPU mode (decode on the CPU),
with a GPU id it uses "mixed" decoding and GPU operators. Shards may be local paths or ``s3://`` URLs (DALI
reads S3 itself, from ``AWS_ENDPOINT_URL`` and the usual keys); the small ``.idx`` files are fetched locally.
Samples come from DALI's WebDataset reader or from a ``source`` of ranged reads (:mod:`shards.sampling`, the
faster one on S3).
Slice-sequence samples (``000.png``, ``001.png``...) are decoded per frame and stacked, and every augmentation
draws its parameters once per sample, so all frames of a sequence move together.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from shards import storage, transfers
from shards.lanes import lane_parts

IMAGENET_MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
IMAGENET_STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]
# DALI converts a pipeline with conditionals (``if`` on per-sample values) into modules of this name, each written
# to the temporary folder.
CONVERTED_MODULE = "__autograph_generated_file"
# torchvision's RandomAdjustSharpness blurs with this kernel and extrapolates away from the blur.
SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13


@dataclass(frozen=True)
class Augment:
    """Training augmentations; each ``*_p`` is the share of samples it applies to (see training's recipe)."""

    hflip: float = 0.0
    vflip: float = 0.0
    rotate_p: float = 0.0
    rotate_degrees: tuple[float, float] = (-90.0, 90.0)
    sharpness_p: float = 0.0
    sharpness_factor: float = 2.0
    color_jitter_p: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    zoom_p: float = 0.0
    zoom: tuple[float, float] = (1.0, 1.0)
    hed_p: float = 0.0
    hed_sigma: float = 0.05


def sharpen_kernel(factor: float) -> np.ndarray:
    """3x3 kernel of ``factor * image + (1 - factor) * smoothed`` (torchvision's adjust_sharpness)."""
    delta = np.zeros((3, 3), np.float32)
    delta[1, 1] = 1
    return (factor * delta + (1 - factor) * SMOOTH).astype(np.float32)


def _uniform(lo: float, hi: float):
    """A per-sample draw from ``[lo, hi]`` (the constant ``lo`` when the range is empty)."""
    from nvidia.dali import fn

    return fn.random.uniform(range=[lo, hi]) if hi > lo else float(lo)


def _pair(v):
    """``[v, v]`` per sample (a y and an x), from a per-sample draw or a constant."""
    from nvidia.dali import fn

    return [v, v] if isinstance(v, float) else fn.stack(v, v)


def _augment(images, aug: Augment, size: int, gpu: bool, layout: str, threads: int = 1):
    """Random augmentations of ``images`` (``layout`` HWC, or FHWC for sequences), each on its share of samples.

    Rotation on the CPU is OpenCV's (:mod:`shards.cpu_kernels`); on a GPU DALI's, computed in float and cast to
    uint8. Colour jitter computes in float and is then cast to uint8: the same pixels, bit for bit, but DALI's
    CPU kernels write uint8 slowly (a 256 px image: 1.31 ms straight to uint8, 0.92 ms through float). Jitter
    of brightness and contrast alone takes DALI's
    brightness_contrast, which has a fast uint8 path (the same pixels for brightness; contrast may differ by 1
    in rounding). Zooming in resamples only the part of the image that stays in view: 0.85 ms instead of 1.88
    for the whole image enlarged, then cropped (300 px, zoom 1-2), and exactly about the centre, which the
    crop's whole-pixel anchor was not.
    """
    from nvidia.dali import fn, types

    from shards.cpu_kernels import rotated_batch
    from shards.stain import stain_jittered

    def chosen(p: float):
        return fn.random.coin_flip(probability=p, dtype=types.BOOL)

    def uint8(floats):
        return fn.cast(floats, dtype=types.UINT8)  # rounds and saturates, as the kernels' own conversion

    if aug.zoom_p > 0 and chosen(aug.zoom_p):
        z = _uniform(*aug.zoom)
        if z >= 1:  # in: the central 1/z of the image resampled to the output, exactly about its centre
            lo, hi = _pair(0.5 - 0.5 / z), _pair(0.5 + 0.5 / z)
            images = fn.resize(images, size=[size, size], roi_start=lo, roi_end=hi, roi_relative=True)
        else:  # out: the image shrunk, in a black frame
            images = fn.resize(images, resize_x=size * z, resize_y=size * z)
            images = fn.crop(images, crop=(size, size), out_of_bounds_policy="pad", fill_values=0)
    if aug.rotate_p > 0 and chosen(aug.rotate_p):
        angle = _uniform(*aug.rotate_degrees)
        if gpu:
            images = uint8(fn.rotate(images, angle=angle, keep_size=True, dtype=types.FLOAT))
        else:
            rotate = partial(rotated_batch, threads=threads)  # a batch at a time: see shards.cpu_kernels
            images = fn.python_function(images, angle, function=rotate, batch_processing=True, output_layouts=layout)
    if aug.sharpness_p > 0 and chosen(aug.sharpness_p):
        images = fn.filter(images, types.Constant(sharpen_kernel(aug.sharpness_factor)), border="clamp")
    if aug.color_jitter_p > 0 and chosen(aug.color_jitter_p):
        brightness = _uniform(1 - aug.brightness, 1 + aug.brightness)
        contrast = _uniform(1 - aug.contrast, 1 + aug.contrast)
        if aug.saturation == 0 and aug.hue == 0:  # paper 004's brightness alone: 0.09 ms instead of 0.9 (300 px)
            images = fn.brightness_contrast(images, brightness=brightness, contrast=contrast)
        else:
            twisted = fn.color_twist(
                images,
                brightness=brightness,
                contrast=contrast,
                saturation=_uniform(1 - aug.saturation, 1 + aug.saturation),
                hue=_uniform(-360 * aug.hue, 360 * aug.hue),
                dtype=types.FLOAT,
            )
            images = uint8(twisted)
    if aug.hed_p > 0 and chosen(aug.hed_p):  # each stain's amount (shards.stain)
        images = stain_jittered(images, aug.hed_sigma, gpu, layout, threads)
    if aug.hflip > 0 or aug.vflip > 0:
        images = fn.flip(
            images,
            horizontal=fn.random.coin_flip(probability=aug.hflip),
            vertical=fn.random.coin_flip(probability=aug.vflip),
        )
    return images


def _decoded(encoded, size: int, gpu: bool, threads: int = 1):
    """``encoded`` images decoded (on the GPU: "mixed") to ``size`` px square, resized only where they are not.

    DALI resamples an image already of the output size too: 0.8 of the 1.3 ms that a 256 px JPEG took to decode
    and "resize" on a CPU core, for an unchanged image. Tiles stored at the training size (``--store-size``) are
    the common case. Other sizes are resized as ingest's ``--store-size`` resizes, by OpenCV's area filter
    (so a tile stored at twice the size becomes the one ``--store-size`` would have stored): on the CPU
    OpenCV's own (:mod:`shards.cpu_kernels`; DALI's CPU resize is slower); on a GPU, DALI's linear filter
    without antialiasing at exactly half (which averages 2x2, as the area filter; the antialiased one reads 4x4
    pixels per output pixel), antialiased at other sizes. The shape comes from the encoded header, on the CPU,
    before decoding.
    """
    from nvidia.dali import fn, types

    from shards.cpu_kernels import resized_batch

    images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
    shape = fn.peek_image_shape(encoded)
    if not gpu:
        if (shape[0] != size) | (shape[1] != size):
            resize = partial(resized_batch, size=size, threads=threads)  # a batch at a time (shards.cpu_kernels)
            images = fn.python_function(images, function=resize, batch_processing=True, output_layouts="HWC")
    elif (shape[0] == 2 * size) & (shape[1] == 2 * size):
        images = fn.resize(images, resize_x=size, resize_y=size, antialias=False)
    elif (shape[0] != size) | (shape[1] != size):
        images = fn.resize(images, resize_x=size, resize_y=size)
    return images


INDEX_FETCHES = 16  # a split of a thousand shards: a thousand GETs, at this many at a time


def fetch_indices(shard_urls: list[str], dest: str) -> list[str]:
    """Local copies in folder ``dest`` of the ``.idx`` beside each shard (DALI opens index files locally), in the
    shards' order, ``INDEX_FETCHES`` downloads at a time."""

    def fetch(job: tuple[int, str]) -> str:
        i, url = job
        return str(storage.get_file(url[: -len(".tar")] + ".idx", os.path.join(dest, f"{i:06d}.idx")))

    return transfers.concurrently(fetch, enumerate(shard_urls), INDEX_FETCHES, "tessera-idx")


def shard_range(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """Samples ``[start, end)`` that DALI's reader gives shard ``shard_id`` of ``num_shards``."""
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


def epoch_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """A fresh global order of the shards for ``epoch``, the same on every worker.

    DALI's shuffle only mixes within a worker's part; permuting the shard list before DALI splits it by
    worker rank moves shards between workers from one epoch to the next.
    """
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def image_exts(frames: int) -> list[str]:
    """Reader extensions of a sample's image(s): one image, or ``frames`` numbered slices."""
    if frames == 0:
        return ["jpg;png"]
    return [f"{j:03d}.jpg;{j:03d}.png" for j in range(frames)]


def sample_exts(frames: int, labelled: bool = True) -> list[str]:
    """The members a pipeline reads from each sample: its image(s), ``cls`` (not of an unlabelled dataset's
    samples, which have none) and ``json``."""
    return [*image_exts(frames), *(["cls"] if labelled else []), "json"]


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
    frames: int = 0,
    source=None,
    labelled: bool = True,
):
    """A built DALI pipeline yielding ``(images, cls bytes, json bytes)``; ``(images, json bytes)`` where not
    ``labelled`` (a dataset ingested without a label table, whose samples have no ``cls``).

    ``images`` is ``float[N, 3, S, S]`` (ImageNet-normalised), or ``float[N, T, 3, S, S]`` when ``frames`` is
    ``T``. Training pipelines shuffle (seeded) and augment; evaluation pipelines read in order and pad the last
    batch so that a worker's share is read exactly once per pass. A ``source`` (a
    :class:`~shards.sampling.SampleSource` for :func:`sample_exts`) replaces the WebDataset reader: samples in
    the order a sampler chose, decoded and augmented the same way.
    """
    from nvidia.dali import fn, pipeline_def, types

    aug = augment or Augment()
    gpu = device_id is not None
    exts = sample_exts(frames, labelled)

    @pipeline_def(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed, enable_conditionals=True
    )
    def pipe():
        if source is not None:
            members = fn.external_source(source=source, num_outputs=len(exts), batch=True)
        else:
            members = fn.readers.webdataset(
                paths=shard_urls,
                index_paths=index_paths,
                ext=exts,
                missing_component_behavior="error",
                random_shuffle=train,
                initial_fill=256 if train else 1,
                shard_id=shard_id,
                num_shards=num_shards,
                pad_last_batch=not train,
                stick_to_shard=True,
                name="reader",
            )
        encoded, rest = members[: len(image_exts(frames))], members[len(image_exts(frames)) :]
        decoded = [_decoded(e, image_size, gpu, num_threads) for e in encoded]
        images = decoded[0] if frames == 0 else fn.stack(*decoded, axis=0, axis_name="F")
        if train:
            images = _augment(images, aug, image_size, gpu, "HWC" if frames == 0 else "FHWC", num_threads)
        images = fn.crop_mirror_normalize(
            images,
            dtype=types.FLOAT,
            output_layout="CHW" if frames == 0 else "FCHW",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
        )
        return images, *rest

    with converted_code_removed():
        p = pipe()
        p.build()
    return p


@contextlib.contextmanager
def converted_code_removed() -> Iterator[None]:
    """Delete the files of the modules DALI writes while it converts a pipeline with conditionals, once built.

    DALI deletes them only at a clean interpreter exit, which a Ray worker does not have (it is killed when its
    run ends): each training worker would leave its handful of files in the node's temporary folder for good
    (``make demo`` left 8). A built pipeline no longer reads them; the modules stay loaded.
    """
    before = set(sys.modules)
    try:
        yield
    finally:
        for name in set(sys.modules) - before:
            path = getattr(sys.modules[name], "__file__", None) if name.startswith(CONVERTED_MODULE) else None
            if path:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)


def to_torch(tensor_list, device):
    """A dense batch copied into a new torch tensor on ``device`` (``torch.device``), on the device itself for a GPU
    batch: a GPU pipeline's images go to the model without a trip through host memory (``as_cpu`` and back)."""
    import torch
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type

    t = tensor_list.as_tensor()
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    return feed_ndarray(t, out, cuda_stream=stream)


def _images(tensor_list):
    """A batch of images: a NumPy array from a CPU pipeline, a CUDA tensor from a GPU one (:func:`to_torch`)."""
    from nvidia.dali.backend import TensorListGPU

    if isinstance(tensor_list, TensorListGPU):
        import torch

        return to_torch(tensor_list, torch.device("cuda", tensor_list.device_id()))
    return np.asarray(tensor_list.as_tensor())


def sample_labels(cls, metas: list[dict], multilabel: bool) -> np.ndarray:
    """``labels[N]`` from ``.cls``, or ``labels[N, L]`` from each sample's JSON ``labels`` vector."""
    if multilabel:
        return np.array([m["labels"] for m in metas], dtype=np.float32)
    return np.array([int(bytes(np.asarray(c)).decode()) for c in cls], dtype=np.int64)


class ShardBatches:
    """Batches from one worker's share of a split: ``(images, labels, metas)``; the images a NumPy array, or a
    CUDA tensor from a GPU pipeline; labels NumPy (-1 each from a pipeline of unlabelled samples), metas Python.

    ``pipelines`` is one pipeline or the lanes of :func:`shards.lanes.build_lanes`, taken in turn. ``steps``
    fixes how many batches a training pass yields, so every worker takes the same number of optimiser steps;
    evaluation passes yield the worker's share exactly once (each lane's padding trimmed).
    """

    def __init__(
        self,
        pipelines,
        total: int,
        shard_id: int,
        num_shards: int,
        train: bool,
        steps: int | None,
        multilabel: bool = False,
    ):
        self.pipes = list(pipelines) if isinstance(pipelines, list | tuple) else [pipelines]
        self.train = train
        self.multilabel = multilabel
        k = len(self.pipes)
        ranges = (shard_range(total, part, num_shards * k) for part in lane_parts(shard_id, k))
        self.shares = [end - start for start, end in ranges]
        self.share = sum(self.shares)
        self.batch_size = self.pipes[0].max_batch_size
        self._runs = [math.ceil(share / self.batch_size) for share in self.shares]
        self.steps = steps if steps is not None else sum(self._runs)

    def __len__(self) -> int:
        return self.steps

    def _order(self) -> Iterator[int]:
        """The lane of each batch: in turn, skipping the lanes whose share is read (evaluation)."""
        k = len(self.pipes)
        if self.train:
            yield from (s % k for s in range(self.steps))
            return
        for s in range(max(self._runs)):
            yield from (j for j in range(k) if s < self._runs[j])

    def __iter__(self) -> Iterator[tuple[Any, np.ndarray, list[dict]]]:
        left = list(self.shares)
        for j in self._order():
            images, *cls, meta = self.pipes[j].run()
            x = _images(images)
            metas = [json.loads(bytes(np.asarray(m)).decode()) for m in meta]
            labels = sample_labels(cls[0], metas, self.multilabel) if cls else np.full(len(metas), -1, np.int64)
            if not self.train:
                n = min(left[j], len(labels))
                x, labels, metas = x[:n], labels[:n], metas[:n]
                left[j] -= n
            yield x, labels, metas
