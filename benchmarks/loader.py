"""Loader benchmark: images/s of Tessera's DALI pipeline against a torchvision + PIL DataLoader, same shards,
same augmentations (paper 000's: flips, sharpness 2, linear rotation, colour jitter, each on 50 %), same output
(float ``[N, 3, S, S]``, ImageNet-normalised), same cores (DALI threads = DataLoader workers).

Usage: ``python benchmarks/loader.py [--images 512] [--tile 512] [--size 256] [--batch 32] [--cores 2]
[--balanced]`` (``--balanced`` also times DALI fed by paper 003's balanced sampler instead of its reader).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np


def write_shards(root: Path, n: int, tile: int) -> list[str]:
    from shards.schema import encode_image, make_sample
    from shards.writer import ShardWriter

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (tile, tile, 3), dtype=np.uint8)
    with ShardWriter(str(root), target_bytes=32 << 20) as w:
        for i in range(n):
            rgb = np.roll(base, i * 7, axis=(0, 1))  # distinct images without paying for n random draws
            w.write(make_sample(f"t{i:06d}", encode_image(rgb, "jpg", 90), "jpg", i % 2, {"slide": f"s{i % 8}"}))
    return [str(root / s.name) for s in w.shards]


def dali_rate(urls: list[str], n: int, size: int, batch: int, cores: int, passes: int, balanced: bool = False) -> float:
    """DALI's images/s: its WebDataset reader, or (``balanced``) paper 003's sampler reading by ranged reads."""
    from shards.dali import Augment, ShardBatches, build_pipeline, fetch_indices, sample_exts
    from shards.sampling import SampleSource, ShardFiles, balanced_indices, read_labels, split_samples
    from training.config import load_recipe

    aug = Augment(**load_recipe("strip_ai_resnet50").data.augment.model_dump())
    index = fetch_indices(urls)
    steps = n // batch
    source, files = None, None
    if balanced:
        files, samples = ShardFiles(urls), split_samples(index)
        order = balanced_indices(read_labels(files, samples), (passes + 1) * steps * batch, np.random.default_rng(0))
        source = SampleSource(files, samples, order, batch, sample_exts(0))
    pipe = build_pipeline(urls, index, batch, size, True, num_threads=cores, augment=aug, source=source)
    batches = ShardBatches(pipe, n, 0, 1, True, steps)
    for _ in batches:  # warm-up pass
        pass
    t = time.perf_counter()
    for _ in range(passes):
        for x, _, _ in batches:
            assert x.shape == (batch, 3, size, size)
    rate = passes * steps * batch / (time.perf_counter() - t)
    if files:
        files.close()
    return rate


def torchvision_rate(urls: list[str], n: int, size: int, batch: int, cores: int, passes: int) -> float:
    import torch
    import webdataset as wds
    from torchvision import transforms as T

    aug = T.Compose(
        [
            T.Resize((size, size)),
            T.RandomHorizontalFlip(0.5),
            T.RandomVerticalFlip(0.5),
            T.RandomAdjustSharpness(2.0, p=0.5),
            # linear, as the recipe (torchvision's default is nearest); it has no edge replication, so fill
            T.RandomApply([T.RandomRotation(90, interpolation=T.InterpolationMode.BILINEAR)], p=0.5),
            T.RandomApply([T.ColorJitter(brightness=0.2, saturation=0.5, hue=0.5)], p=0.5),
            T.ToTensor(),
            T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    ds = (
        wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=wds.split_by_node)
        .shuffle(256)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(aug, int)
    )
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=cores, persistent_workers=True)
    steps = n // batch

    def one_pass():
        for i, (x, _) in enumerate(loader):
            if i + 1 >= steps:
                break
            assert x.shape == (batch, 3, size, size)

    one_pass()  # warm-up (workers start)
    t = time.perf_counter()
    for _ in range(passes):
        one_pass()
    return passes * steps * batch / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--tile", type=int, default=512, help="stored JPEG size in px")
    ap.add_argument("--size", type=int, default=256, help="model input size in px")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--balanced", action="store_true", help="also time DALI fed by the balanced sampler")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp) / "train", args.images, args.tile)
        common = (urls, args.images, args.size, args.batch, args.cores, args.passes)
        base = torchvision_rate(*common)
        dali = dali_rate(*common)
        sampled = dali_rate(*common, balanced=True) if args.balanced else None
    print(f"{args.images} JPEG tiles {args.tile} px -> {args.size} px, batch {args.batch}, {args.cores} cores")
    print(f"torchvision + PIL DataLoader: {base:8.1f} images/s")
    print(f"Tessera DALI (CPU mode):      {dali:8.1f} images/s")
    print(f"ratio DALI / torchvision: {dali / base:.2f}x (target >= 1.5x)")
    if sampled is not None:
        print(f"Tessera DALI, balanced sampler: {sampled:8.1f} images/s")
        print(f"ratio balanced / DALI reader: {sampled / dali:.2f}x; balanced / torchvision: {sampled / base:.2f}x")


if __name__ == "__main__":
    main()
