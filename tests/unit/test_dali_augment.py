"""The DALI pipeline (CPU mode) against reference implementations, on one-sample shards."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torchvision.transforms.functional import adjust_sharpness

from shards.dali import IMAGENET_MEAN, IMAGENET_STD, Augment, build_pipeline, fetch_indices
from shards.schema import encode_image, make_sample
from shards.writer import ShardWriter

SIZE = 48


def _shard(tmp_path, frames=0):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image[:, : SIZE // 2] //= 3  # structure, so flips and rotations are visible
    png = encode_image(image, "png")
    with ShardWriter(str(tmp_path / "train")) as w:
        w.write(make_sample("only", [png] * frames if frames else png, "png", 1, {"patient": "p"}))
    urls = [str(tmp_path / "train" / w.shards[0].name)]
    return image, urls, fetch_indices(urls, str(tmp_path / "idx"))


def _pixels(x) -> np.ndarray:
    """A pipeline's normalised CHW (or FCHW) batch back to pixel values, HWC (or FHWC), as floats."""
    chw = np.asarray(x.as_tensor()) * np.reshape(IMAGENET_STD, (3, 1, 1)) + np.reshape(IMAGENET_MEAN, (3, 1, 1))
    return np.moveaxis(chw, -3, -1)


def _uint8(pixels: np.ndarray) -> np.ndarray:
    return np.rint(pixels).clip(0, 255).astype(np.uint8)


def _run(urls, idx, aug, frames=0, train=True):
    pipe = build_pipeline(urls, idx, 1, SIZE, train, augment=aug, frames=frames, seed=5)
    x, _, _ = pipe.run()
    return _uint8(_pixels(x)[0])


def test_identity_and_flips(tmp_path):
    image, urls, idx = _shard(tmp_path)
    plain = _run(urls, idx, Augment(), train=False)
    assert np.abs(plain.astype(int) - image).max() <= 1
    both = _run(urls, idx, Augment(hflip=1.0, vflip=1.0))
    assert np.abs(both.astype(int) - image[::-1, ::-1]).max() <= 1


def test_sharpness_matches_torchvision_inside_the_border(tmp_path):
    image, urls, idx = _shard(tmp_path)
    ours = _run(urls, idx, Augment(sharpness_p=1.0, sharpness_factor=2.0))
    ref = adjust_sharpness(torch.from_numpy(image).permute(2, 0, 1), 2.0).permute(1, 2, 0).numpy()
    assert np.abs(ours[1:-1, 1:-1].astype(int) - ref[1:-1, 1:-1]).max() <= 1
    assert not np.array_equal(ours, image)


def test_zoom_out_pads_with_black(tmp_path):
    _, urls, idx = _shard(tmp_path)
    out = _run(urls, idx, Augment(zoom_p=1.0, zoom=(0.5, 0.5)))
    assert out[:10, :10].max() <= 1 and out[-10:, -10:].max() <= 1  # outside the centred half-size image
    assert out[SIZE // 4 : 3 * SIZE // 4, SIZE // 4 : 3 * SIZE // 4].mean() > 20


@pytest.mark.parametrize("zoom", [(1.3125, 1.3125), (1.3125, 1.3126)])  # a constant, and a per-sample draw
def test_zoom_in_enlarges_about_the_centre(tmp_path, zoom):
    """48 px zoomed 1.3125 times is 63 px: the 15 px margin is odd, so enlarging the whole image and cropping it
    at a whole pixel would be half a pixel off centre."""
    image, urls, idx = _shard(tmp_path)
    out = _run(urls, idx, Augment(zoom_p=1.0, zoom=zoom))
    z, c = zoom[0], SIZE / 2  # output pixel centre i + 0.5 samples the input at (i + 0.5 - c) / z + c
    scale = np.array([[z, 0, (1 - z) * c - 0.5 + 0.5 * z], [0, z, (1 - z) * c - 0.5 + 0.5 * z]])
    ref = cv2.warpAffine(image, scale, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert np.abs(out.astype(int) - ref).max() <= 2


def test_rotation_interpolates_linearly_and_replicates_edges_like_opencv(tmp_path):
    """Paper 000's albumentations Rotate is linear with reflected borders; ours replicates edges (no black
    corners), as DALI's GPU rotation does (twice as fast as a constant fill)."""
    image, urls, idx = _shard(tmp_path)
    ours = _run(urls, idx, Augment(rotate_p=1.0, rotate_degrees=(30, 30)))
    turn = cv2.getRotationMatrix2D(((SIZE - 1) / 2, (SIZE - 1) / 2), 30, 1.0)
    ref = cv2.warpAffine(image, turn, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    assert np.array_equal(ours, ref)  # in CPU mode OpenCV's own kernel
    quarter = _run(urls, idx, Augment(rotate_p=1.0, rotate_degrees=(90, 90)))
    assert np.array_equal(quarter, np.rot90(image))


def test_a_batch_rotated_on_several_threads_keeps_each_sample_with_its_own_image(tmp_path):
    """The CPU rotation runs a batch at a time on the pipeline's threads: each output is its own input turned."""
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(4)]
    with ShardWriter(str(tmp_path / "four")) as w:
        for i, pixels in enumerate(images):
            w.write(make_sample(f"s{i}", encode_image(pixels, "png"), "png", 1, {"i": i}))
    urls = [str(tmp_path / "four" / w.shards[0].name)]
    aug = Augment(rotate_p=1.0, rotate_degrees=(30, 30))
    pipe = build_pipeline(
        urls, fetch_indices(urls, str(tmp_path / "idx")), 4, SIZE, True, num_threads=3, augment=aug, seed=1
    )
    x, _, metas = pipe.run()
    order = [json.loads(bytes(np.asarray(m)))["i"] for m in metas]  # the reader shuffles
    turn = cv2.getRotationMatrix2D(((SIZE - 1) / 2, (SIZE - 1) / 2), 30, 1.0)
    for out, i in zip(_uint8(_pixels(x)), order, strict=True):
        ref = cv2.warpAffine(images[i], turn, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        assert np.array_equal(out, ref)


@pytest.mark.parametrize("threads", [1, 3])
def test_a_rotation_that_no_sample_of_a_batch_draws_hands_the_batch_on_whole(tmp_path, threads):
    """The batch form is called on the samples that drew the rotation: none here (p = 0.001, 4 samples, 3 batches)."""
    image, urls, idx = _shard(tmp_path)
    pipe = build_pipeline(urls, idx, 4, SIZE, True, num_threads=threads, augment=Augment(rotate_p=0.001), seed=3)
    for _ in range(3):
        x, _, _ = pipe.run()
        assert all(np.array_equal(out, image) for out in _uint8(_pixels(x)))


@pytest.mark.parametrize("threads", [1, 3])
def test_images_of_the_output_size_pass_unchanged_and_others_are_resized(tmp_path, threads):
    """A batch of tiles stored at the training size, at twice it and at 2.5 times: the first come out
    unchanged (they skip the resize), the others scaled down by OpenCV's area average, as ingest's
    ``--store-size`` resizes (2x2 averages at twice the size, even of noise); on one thread or a pool."""
    rng = np.random.default_rng(1)
    double = rng.integers(0, 256, (2 * SIZE, 2 * SIZE, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0 : 5 * SIZE // 2, 0 : 5 * SIZE // 2]
    smooth = np.stack([yy * 2, xx * 2, (yy + xx)], axis=-1).clip(0, 255).astype(np.uint8)  # no aliasing
    image, _, _ = _shard(tmp_path)
    with ShardWriter(str(tmp_path / "mixed")) as w:
        for key, pixels in (("same", image), ("double", double), ("smooth", smooth)):
            w.write(make_sample(key, encode_image(pixels, "png"), "png", 1, {}))
    urls = [str(tmp_path / "mixed" / w.shards[0].name)]
    pipe = build_pipeline(urls, fetch_indices(urls, str(tmp_path / "idx2")), 3, SIZE, False, num_threads=threads)
    x, _, _ = pipe.run()
    same, halved, scaled = _uint8(_pixels(x))
    assert np.abs(same.astype(int) - image).max() <= 1
    for out, src in ((halved, double), (scaled, smooth)):
        ref = cv2.resize(src, (SIZE, SIZE), interpolation=cv2.INTER_AREA)
        assert np.array_equal(out, ref)  # in CPU mode OpenCV's own kernel


@pytest.mark.parametrize(("brightness", "contrast"), [(0.5, 0.0), (0.0, 0.5), (0.5, 0.5)])
def test_brightness_and_contrast_jitter_map_values_linearly_per_image(tmp_path, brightness, contrast):
    """Brightness (paper 004's only jitter) multiplies every value by one factor per image; contrast scales the
    distance from mid-grey by another: out = b * (128 + c * (in - 128)), rounded, as uint8."""
    image, urls, idx = _shard(tmp_path)
    aug = Augment(color_jitter_p=1.0, brightness=brightness, contrast=contrast)
    pipe = build_pipeline(urls, idx, 1, SIZE, True, augment=aug, seed=7)
    factors = set()
    for _ in range(3):
        x, _, _ = pipe.run()
        out, src = _pixels(x)[0].ravel(), image.ravel().astype(float)
        kept = (out > 0.5) & (out < 254.5)  # not clipped
        slope, offset = np.polyfit(src[kept], out[kept], 1)
        b = (offset + 128 * slope) / 128  # where mid-grey goes
        c = slope / b
        assert abs(b - 1) <= brightness + 0.01 and abs(c - 1) <= contrast + 0.01
        assert np.abs(out[kept] - (offset + slope * src[kept])).max() <= 1
        factors.add((round(b, 3), round(c, 3)))
    assert len(factors) == 3  # drawn anew for each image


@pytest.mark.parametrize(
    "aug",
    [
        Augment(rotate_p=1.0, rotate_degrees=(10, 80)),
        Augment(color_jitter_p=1.0, hue=0.5),
        Augment(color_jitter_p=1.0, brightness=0.5),
        Augment(zoom_p=1.0, zoom=(1.2, 1.8)),
    ],
)
def test_a_sequence_moves_together(tmp_path, aug):
    _, urls, idx = _shard(tmp_path, frames=3)
    frames = _run(urls, idx, aug, frames=3)
    assert frames.shape == (3, SIZE, SIZE, 3)
    assert np.array_equal(frames[0], frames[1]) and np.array_equal(frames[0], frames[2])
    plain = _run(urls, idx, Augment(), frames=3, train=False)
    assert not np.array_equal(frames[0], plain[0])


@pytest.mark.parametrize("frames", [0, 3])
def test_a_batch_copies_into_a_torch_tensor_of_its_shape_and_type(tmp_path, frames):
    """``to_torch`` is how a GPU pipeline's images reach the model (copied on the device, not through host memory);
    the same copy runs here from a CPU batch."""
    from shards.dali import to_torch

    _, urls, idx = _shard(tmp_path, frames)
    x, _, _ = build_pipeline(urls, idx, 1, SIZE, False, frames=frames).run()
    want = np.asarray(x.as_tensor())
    got = to_torch(x, torch.device("cpu"))
    assert got.dtype == torch.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got.numpy(), want)
    got.zero_()  # a copy: DALI's buffer, which the next run reuses, is left alone
    assert np.abs(np.asarray(x.as_tensor())).max() > 0


KILLED_WORKER = """
import os, sys
from shards.dali import CONVERTED_MODULE, Augment, build_pipeline
before = set(sys.modules)
pipe = build_pipeline(sys.argv[1:2], sys.argv[2:3], 1, 48, True, augment=Augment(hflip=1.0, rotate_p=1.0))
pipe.run()
print("\\n".join(sys.modules[n].__file__ for n in set(sys.modules) - before if n.startswith(CONVERTED_MODULE)))
sys.stdout.flush()
os._exit(0)  # as a Ray worker ends: no clean interpreter exit
"""


def test_a_built_pipeline_leaves_no_converted_code_in_the_temporary_folder(tmp_path):
    """DALI writes a module per function it converts (a pipeline's ``if`` per sample) to the temporary folder and
    deletes it only at a clean interpreter exit, which a Ray worker does not have."""
    _, urls, idx = _shard(tmp_path)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    worker = [sys.executable, "-c", KILLED_WORKER, *urls, *idx]
    run = subprocess.run(worker, env=env, cwd=Path(__file__).parents[2], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    written = run.stdout.split()
    assert written and all(path.startswith(str(scratch)) for path in written)  # it did convert, there
    assert list(scratch.iterdir()) == []
