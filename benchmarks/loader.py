"""Loader benchmark: images/s of Tessera's DALI pipeline against a torchvision + PIL DataLoader, same shards,
same augmentations (paper 000's: flips, sharpness 2, linear rotation, colour jitter, each on 50 %), same output
(float ``[N, 3, S, S]``, ImageNet-normalised), same cores (DALI threads = DataLoader workers).

Usage: ``python benchmarks/loader.py [--images 512] [--tile 512] [--size 256] [--content noise|ihc] [--batch 32]
[--cores 2] [--lanes N] [--balanced] [--gpu] [--s3 [--latency-ms MS]]``. The DALI side splits its threads into
pipelines as a training worker does (:func:`shards.lanes.lane_count`: one on 2 cores, 4 x 4 threads on 16); where
that is more than one, the one pipeline of all the threads is timed too. ``--lanes`` sets their number.
``--gpu`` also times the same pipeline on GPU 0
(DALI's mixed decoding and GPU augmentation, CUDA batches; the clock stops once the GPU is done).
``--content`` picks what the tiles show (see :func:`base_image`). ``--balanced`` also times DALI fed by paper
003's balanced sampler instead of its reader.
``--s3`` reads the shards from a real S3 server (``rclone serve s3`` on a temporary folder) instead of local disk,
and times DALI's reader against Tessera's ranged reads (shuffled, and through the balanced sampler) there; the
torchvision baseline reads local files only, so it is left out. ``--latency-ms`` adds that much to every request's
round trip, through a local TCP proxy, as a remote object store would.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def base_image(tile: int, content: str) -> np.ndarray:
    """``uint8[tile, tile, 3]``: uniform noise (``noise``: the JPEG decoder's worst case, ~7 bits/px at quality 90),
    or scikit-image's bundled immunohistochemistry micrograph (``ihc``: a real stained tissue field, ~2.7 bits/px),
    resized to ``tile``."""
    if content == "noise":
        return np.random.default_rng(0).integers(0, 255, (tile, tile, 3), dtype=np.uint8)
    import cv2
    from skimage import data

    return cv2.resize(data.immunohistochemistry(), (tile, tile), interpolation=cv2.INTER_AREA)


def write_shards(root: Path, n: int, tile: int, content: str = "noise", num_shards: int = 8) -> list[str]:
    """``n`` distinct JPEG tiles in ``num_shards`` shards of equal sample counts, so that DataLoader workers (a shard
    each in turn) finish a pass together whatever the JPEG sizes. WebDataset gives each worker whole shards: a
    worker beyond the shard count gets none, so there must be at least as many shards as workers."""
    from shards.schema import encode_image, make_sample
    from shards.writer import ShardWriter

    base = base_image(tile, content)
    urls = []
    for k in range(num_shards):
        with ShardWriter(str(root), target_bytes=1 << 62, start_index=k) as w:
            for i in range(n * k // num_shards, n * (k + 1) // num_shards):
                rgb = np.roll(base, i * 7, axis=(0, 1))  # distinct images without paying for n random draws
                w.write(make_sample(f"t{i:06d}", encode_image(rgb, "jpg", 90), "jpg", i % 2, {"slide": f"s{i % 8}"}))
        urls += [str(root / info.name) for info in w.shards]
    return urls


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
    try:
        while data := await src.read(1 << 16):
            if delay:
                await asyncio.sleep(delay)
            dst.write(data)
            await dst.drain()
    except ConnectionError:
        pass
    finally:
        dst.close()


def _serve_proxy(port: int, target: int, latency: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        await asyncio.gather(_pipe(reader, up_writer, latency), _pipe(up_reader, writer, 0.0))

    async def serve() -> None:
        async with await asyncio.start_server(handle, "127.0.0.1", port) as server:
            await server.serve_forever()

    asyncio.run(serve())


def _delay_proxy(target: int, latency: float) -> tuple[mp.Process, int]:
    """A TCP proxy to ``127.0.0.1:target`` that holds each client-to-server chunk ``latency`` seconds (a
    request is one chunk: one added round trip per request), and its port. A process, not a thread: DALI's
    S3 client holds the GIL while it waits for a reply (in ``Pipeline.build``), which would stall a thread."""
    from training.local_group import free_port

    port = free_port()
    proc = mp.get_context("spawn").Process(target=_serve_proxy, args=(port, target, latency), daemon=True)
    proc.start()
    _wait_port(port, proc)
    return proc, port


def _wait_port(port: int, proc) -> None:
    from cluster.procs import wait_until

    def listening() -> bool:
        if (proc.poll() if hasattr(proc, "poll") else proc.exitcode) is not None:
            raise RuntimeError(f"{proc} exited before listening on {port}")
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    if not wait_until(listening, timeout=10, interval=0.1):
        raise RuntimeError(f"nothing listens on {port} after 10 s")


@contextmanager
def s3_server(root: Path, latency_ms: float, flags: tuple[str, ...] = ()):
    """``rclone serve s3`` on ``root`` (with rclone's ``flags``) with the environment (boto3's and DALI's) pointed
    at it, through the delay proxy when ``latency_ms``; yields ``(upload_endpoint, read_endpoint)``."""
    from cluster.stack import executable
    from training.local_group import free_port

    port = free_port()
    env = dict(os.environ, RCLONE_AUTH_KEY='"bench,benchsecret"')  # CSV: quoted, one key pair
    cmd = [executable("rclone"), "serve", "s3", "--addr", f"127.0.0.1:{port}", str(root), "--config", "/dev/null"]
    cmd += flags
    proc, proxy = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), None
    try:
        _wait_port(port, proc)
        os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="benchsecret", AWS_REGION="us-east-1")
        proxy, read_port = _delay_proxy(port, latency_ms / 1000) if latency_ms else (None, port)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{read_port}"
    finally:
        if proxy:
            proxy.terminate()
        proc.terminate()
        proc.wait(10)


def upload(urls: list[str], bucket: str) -> list[str]:
    """Each shard and its ``.idx`` to ``s3://bucket/train/``; the shards' S3 URLs."""
    from shards import storage

    storage.ensure_bucket(f"s3://{bucket}/train")
    out = []
    for url in urls:
        for path in (Path(url), Path(url).with_suffix(".idx")):
            storage.put_file(path, f"s3://{bucket}/train/{path.name}")
        out.append(f"s3://{bucket}/train/{Path(url).name}")
    return out


def dali_rate(
    urls: list[str],
    n: int,
    size: int,
    batch: int,
    cores: int,
    passes: int,
    idx_dir: str,
    mode: str = "stream",
    device_id: int | None = None,
    lanes: int | None = None,
) -> tuple[float, int]:
    """DALI's images/s fed by its WebDataset reader (``stream``), by Tessera's ranged reads in a global
    permutation (``ranged``), or by paper 003's balanced sampler (``balanced``, also ranged reads); the shards'
    ``.idx`` are copied into ``idx_dir``. The ``cores`` threads are split into pipelines as a training worker
    splits them (:func:`shards.lanes.lane_count`; ``lanes`` sets their number); the rate and that number."""
    from shards.dali import Augment, ShardBatches, fetch_indices, sample_exts
    from shards.lanes import build_lanes, deal, lane_count
    from shards.sampling import (
        SampleSource,
        ShardFiles,
        balanced_indices,
        read_labels,
        shuffled_indices,
        split_samples,
    )
    from training.config import load_recipe

    aug = Augment(**load_recipe("strip_ai_resnet50").data.augment.model_dump())
    index = fetch_indices(urls, idx_dir)
    steps = n // batch
    lanes = lane_count(cores, device_id is not None, n, batch, steps, lanes)
    sources, files = None, None
    if mode != "stream":
        files, samples = ShardFiles(urls), split_samples(index)
        rng, draws = np.random.default_rng(0), (passes + 1) * steps * batch
        if mode == "balanced":
            order = balanced_indices(read_labels(files, samples), draws, rng)
        else:
            order = shuffled_indices(len(samples), 0, 1, draws, rng)
        sources = [SampleSource(files, samples, o, batch, sample_exts(0)) for o in deal(order, batch, lanes)]
    options = {"seeds": list(range(lanes)), "num_threads": cores, "sources": sources, "device_id": device_id}
    pipes = build_lanes(lanes, urls, index, batch, size, True, augment=aug, **options)
    batches = ShardBatches(pipes, n, 0, 1, True, steps)
    for _ in batches:  # warm-up pass
        pass
    t = time.perf_counter()
    for _ in range(passes):
        for x, _, _ in batches:
            assert x.shape == (batch, 3, size, size)
    if device_id is not None:
        import torch

        torch.cuda.synchronize()
    rate = passes * steps * batch / (time.perf_counter() - t)
    if files:
        files.close()
    return rate, lanes


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

    def one_pass() -> int:
        # A worker's share need not fill its last batch (--images not a multiple of the batch): count images.
        seen = 0
        for x, _ in loader:
            assert x.shape[1:] == (3, size, size) and len(x) <= batch
            seen += len(x)
            if seen >= steps * batch:
                break
        return seen

    one_pass()  # warm-up (workers start)
    t = time.perf_counter()
    seen = sum(one_pass() for _ in range(passes))
    return seen / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--tile", type=int, default=512, help="stored JPEG size in px")
    ap.add_argument("--size", type=int, default=256, help="model input size in px")
    ap.add_argument("--content", choices=["noise", "ihc"], default="noise", help="what the tiles show")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--balanced", action="store_true", help="also time DALI fed by the balanced sampler")
    ap.add_argument("--gpu", action="store_true", help="also time the pipeline on GPU 0 (mixed decoding)")
    ap.add_argument("--lanes", type=int, default=None, help="CPU-mode pipelines the cores are split into")
    ap.add_argument("--s3", action="store_true", help="read the shards from an S3 server (rclone), not local disk")
    ap.add_argument("--latency-ms", type=float, default=0.0, help="with --s3: added round trip per request")
    args = ap.parse_args()
    if args.s3:
        return main_s3(args)
    from shards.lanes import describe

    with tempfile.TemporaryDirectory() as tmp:
        shards = max(8, args.cores)  # a shard for every DataLoader worker (8: a whole number of each on 2 or 4)
        urls = write_shards(Path(tmp) / "train", args.images, args.tile, args.content, shards)
        common = (urls, args.images, args.size, args.batch, args.cores, args.passes)
        base = torchvision_rate(*common)
        dali, lanes = dali_rate(*common, f"{tmp}/idx", lanes=args.lanes)
        whole = dali_rate(*common, f"{tmp}/idx", lanes=1)[0] if lanes > 1 else None
        sampled = dali_rate(*common, f"{tmp}/idx", mode="balanced", lanes=args.lanes)[0] if args.balanced else None
        gpu = dali_rate(*common, f"{tmp}/idx", device_id=0)[0] if args.gpu else None
    print(
        f"{args.images} JPEG tiles ({args.content}) {args.tile} px -> {args.size} px, "
        f"batch {args.batch}, {args.cores} cores"
    )
    print(f"torchvision + PIL DataLoader: {base:8.1f} images/s")
    print(f"Tessera DALI (CPU mode):      {dali:8.1f} images/s ({describe(args.cores, lanes)})")
    print(f"ratio DALI / torchvision: {dali / base:.2f}x (target >= 1.5x)")
    if whole is not None:
        print(f"one pipeline of {args.cores} threads: {whole:8.1f} images/s (lanes / one: {dali / whole:.2f}x)")
    if gpu is not None:
        print(f"Tessera DALI (GPU 0, mixed):  {gpu:8.1f} images/s")
        print(f"ratio DALI GPU / torchvision: {gpu / base:.2f}x; GPU / DALI CPU mode: {gpu / dali:.2f}x")
    if sampled is not None:
        print(f"Tessera DALI, balanced sampler: {sampled:8.1f} images/s")
        print(f"ratio balanced / DALI reader: {sampled / dali:.2f}x; balanced / torchvision: {sampled / base:.2f}x")


def main_s3(args: argparse.Namespace) -> None:
    """DALI's reader against Tessera's ranged reads (shuffled and balanced), all from S3."""
    with tempfile.TemporaryDirectory() as tmp:
        urls = write_shards(Path(tmp) / "local", args.images, args.tile, args.content)
        (Path(tmp) / "s3").mkdir()
        with s3_server(Path(tmp) / "s3", args.latency_ms) as (upload_endpoint, read_endpoint):
            os.environ["AWS_ENDPOINT_URL"] = upload_endpoint
            s3_urls = upload(urls, "bench")
            os.environ["AWS_ENDPOINT_URL"] = read_endpoint  # boto3's client is cached per endpoint
            common = (s3_urls, args.images, args.size, args.batch, args.cores, args.passes)
            modes = ("stream", "ranged", "balanced")
            rates = {mode: dali_rate(*common, f"{tmp}/idx", mode=mode, lanes=args.lanes)[0] for mode in modes}
    print(
        f"{args.images} JPEG tiles ({args.content}) {args.tile} px -> {args.size} px, "
        f"batch {args.batch}, {args.cores} cores, "
        f"from S3 (rclone) with {args.latency_ms:g} ms added per request"
    )
    print(f"DALI's WebDataset reader (data.reader=stream):  {rates['stream']:8.1f} images/s")
    print(f"Tessera's ranged reads (data.reader=ranged):    {rates['ranged']:8.1f} images/s")
    print(f"ranged reads, balanced sampler:                 {rates['balanced']:8.1f} images/s")
    print(f"ratio ranged / stream: {rates['ranged'] / rates['stream']:.2f}x")


if __name__ == "__main__":
    main()
