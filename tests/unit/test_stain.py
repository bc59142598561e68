"""HED stain jitter (``data.augment.hed_p``, ``hed_sigma``): the DALI graph against its numpy reference, the
reference against scikit-image's own stain separation, and the recipe's augmentation through the pipeline."""

import numpy as np
import pytest
from pydantic import ValidationError
from skimage.color import rgb2hed

from shards.dali import Augment, build_pipeline
from shards.stain import hed_jitter, hed_jittered, hed_jittered_batch, hed_jittered_fast
from tests.unit.test_dali_augment import _run, _shard
from training.config import AugmentConfig


def _tissue(seed: int = 0, size: int = 24) -> np.ndarray:
    """Pink and purple pixels (eosin, haematoxylin) with some white, as an H&E tile has."""
    rng = np.random.default_rng(seed)
    base = np.array([[230, 150, 190], [120, 70, 160], [245, 240, 245]], float)[rng.integers(0, 3, (size, size))]
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _dali(images: list[np.ndarray], alphas: list[np.ndarray], betas: list[np.ndarray], layout: str) -> list:
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None)
    def pipe():
        x = fn.external_source(source=lambda: images, batch=True, layout=layout)
        a = fn.external_source(source=lambda: alphas, batch=True)
        b = fn.external_source(source=lambda: betas, batch=True)
        return hed_jitter(x, a, b)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.asarray(out.at(i)) for i in range(len(images))]


def test_the_dali_graph_is_the_reference_per_sample_and_a_sequence_shares_its_map():
    rng = np.random.default_rng(1)
    images = [_tissue(i) for i in range(4)]
    alphas = [rng.uniform(0.8, 1.2, 3).astype(np.float32) for _ in images]
    betas = [rng.uniform(-0.2, 0.2, 3).astype(np.float32) for _ in images]
    for got, image, a, b in zip(_dali(images, alphas, betas, "HWC"), images, alphas, betas, strict=True):
        want = hed_jittered(image, a, b)
        assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 0.01  # float32 against 64
        assert not np.array_equal(got, image)
    [frames] = _dali([np.stack(images)], alphas[:1], betas[:1], "FHWC")  # one sample of 4 frames
    want = [hed_jittered(i, alphas[0], betas[0]) for i in images]
    assert all(np.abs(f.astype(int) - w).max() <= 1 for f, w in zip(frames, want, strict=True))


def test_the_cpu_kernel_is_the_reference_for_images_and_sequences():
    """DALI's CPU mode jitters through OpenCV (``hed_jittered_fast``; DALI's own arithmetic took 5-6 times as long)."""
    rng = np.random.default_rng(2)
    images = [_tissue(i, 32) for i in range(3)] + [np.stack([_tissue(7, 32), _tissue(8, 32)])]  # and a sequence
    alphas = [rng.uniform(0.8, 1.2, 3).astype(np.float32) for _ in images]
    betas = [rng.uniform(-0.2, 0.2, 3).astype(np.float32) for _ in images]
    for threads in (1, 2):
        for got, image, a, b in zip(
            hed_jittered_batch(images, alphas, betas, threads), images, alphas, betas, strict=True
        ):
            want = hed_jittered(image, a, b)
            assert got.shape == image.shape and got.dtype == np.uint8
            assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 0.01
    assert np.array_equal(hed_jittered_fast(images[0], np.ones(3), np.zeros(3)), images[0])


def test_the_stain_vectors_are_scikit_images():
    from skimage.color import hed_from_rgb, rgb_from_hed

    from shards.stain import HED_FROM_RGB, RGB_FROM_HED

    assert np.array_equal(RGB_FROM_HED, rgb_from_hed) and np.allclose(HED_FROM_RGB, hed_from_rgb, rtol=0, atol=1e-12)


def test_no_jitter_gives_the_image_back():
    every = np.arange(256, dtype=np.uint8)
    grey = np.stack([every] * 3, -1)[None]
    for image in (grey, _tissue(3)):
        assert np.array_equal(hed_jittered(image, np.ones(3), np.zeros(3)), image)


@pytest.mark.parametrize("stain", [0, 1])
def test_a_shift_of_one_stain_moves_that_stains_amount_alone_as_scikit_image_measures_it(stain):
    """Haematoxylin (0) or eosin (1) shifted by 0.05 in scikit-image's stain units: its ``rgb2hed`` of the output
    differs from the input's by about 0.05 in that stain and by little in the other (pixels not clipped)."""
    image = _tissue(4, 48)
    beta = np.zeros(3)
    beta[stain] = 0.05
    out = hed_jittered(image, np.ones(3), beta)
    kept = ((out > 8) & (out < 250)).all(-1) & ((image > 8) & (image < 250)).all(-1)
    moved = (rgb2hed(out) - rgb2hed(image))[kept]
    assert kept.mean() > 0.5
    assert abs(np.median(moved[:, stain]) - 0.05) < 0.005 and abs(np.median(moved[:, 1 - stain])) < 0.005


def test_the_recipes_jitter_draws_anew_for_each_image_and_moves_a_sequence_together(tmp_path):
    image, urls, idx = _shard(tmp_path)
    pipe = build_pipeline(urls, idx, 1, 48, True, augment=Augment(hed_p=1.0, hed_sigma=0.2), seed=3)
    seen = {_first(pipe) for _ in range(3)}
    assert len(seen) == 3  # a map drawn for each image
    off = _run(urls, idx, Augment(hed_p=1.0, hed_sigma=0.0))
    assert np.abs(off.astype(int) - image).max() <= 1  # sigma 0: the image as it was
    _, seq_urls, seq_idx = _shard(tmp_path / "seq", frames=3)
    frames = _run(seq_urls, seq_idx, Augment(hed_p=1.0, hed_sigma=0.2), frames=3)
    assert np.array_equal(frames[0], frames[1]) and np.array_equal(frames[0], frames[2])


def _first(pipe) -> bytes:
    x, _, _ = pipe.run()
    return np.asarray(x.as_tensor()).tobytes()


def test_the_recipe_takes_a_share_and_a_sigma():
    aug = AugmentConfig(hed_p=0.5, hed_sigma=0.2)
    assert (aug.hed_p, aug.hed_sigma) == (0.5, 0.2) and AugmentConfig().hed_p == 0.0
    with pytest.raises(ValidationError, match="hed_p"):
        AugmentConfig(hed_p=1.5)


def test_a_recipe_with_stain_jitter_is_refused_on_dicom_series_before_any_work():
    from shards import manifest as mf
    from training.config import RecipeError, load_recipe
    from training.preflight import check_against

    inputs = [mf.InputRecord(id="s", kind="dicom", status="ingested", item="s", label=0, split="val")]
    recipe = load_recipe("demo_tiles", ["data.dataset=ds", "data.augment.hed_p=0.5"])
    with pytest.raises(RecipeError, match=r"data\.augment\.hed_p: stain jitter .* and \S*ds holds DICOM series"):
        check_against(recipe, mf.Manifest(dataset="ds", kind="dicom", classes=["no", "yes"], inputs=inputs))
    slides = [mf.InputRecord(id="s", kind="wsi", status="ingested", item="s", label=0, split="val")]
    check_against(recipe, mf.Manifest(dataset="ds", kind="wsi", classes=["no", "yes"], inputs=slides))  # slides: yes
