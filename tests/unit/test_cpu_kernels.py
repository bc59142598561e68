"""The OpenCV kernels of DALI's CPU pipelines, on hand-made arrays."""

import numpy as np

from shards.cpu_kernels import resized, resized_batch, rotated, rotated_batch


def test_halving_averages_each_2x2_block_rounding_half_up():
    image = np.zeros((4, 4, 3), np.uint8)
    image[:2, :2] = [[[0, 10, 255]], [[1, 10, 255]]]  # a block of means 0.5, 10 and 255
    image[2:, 2:] = 7
    out = resized(image, 2)
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [1, 10, 255] and out[1, 1].tolist() == [7, 7, 7] and out[0, 1].max() == 0


def test_resizing_keeps_a_single_channel_axis():
    assert resized(np.full((6, 6, 1), 9, np.uint8), 3).shape == (3, 3, 1)
    assert rotated(np.full((5, 5, 1), 9, np.uint8), np.float32(30)).shape == (5, 5, 1)


def test_quarter_turns_are_exact_and_anticlockwise():
    image = np.arange(5 * 5 * 3, dtype=np.uint8).reshape(5, 5, 3)
    assert np.array_equal(rotated(image, np.float32(90)), np.rot90(image))
    assert np.array_equal(rotated(image, np.float32(-90)), np.rot90(image, -1))


def test_edges_are_replicated_not_black():
    out = rotated(np.full((8, 8, 3), 200, np.uint8), np.float32(45))
    assert out.min() == 200 and out.max() == 200  # the corners the turn uncovers take the edge's value


def test_every_frame_of_a_sequence_turns_alike():
    frame = np.random.default_rng(0).integers(0, 256, (9, 9, 3), dtype=np.uint8)
    frames = np.stack([frame, frame[::-1]])
    out = rotated(frames, np.float32(30))
    assert out.shape == frames.shape
    assert np.array_equal(out[0], rotated(frame, np.float32(30)))
    assert np.array_equal(out[1], rotated(frame[::-1], np.float32(30)))


def test_the_batch_forms_give_each_samples_own_result_in_order_on_any_thread_count():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(5)]
    angles = [np.float32(a) for a in (0, 30, 90, -45, 10)]
    for threads in (1, 3):
        turned = rotated_batch(images, angles, threads)
        assert all(np.array_equal(t, rotated(i, a)) for t, i, a in zip(turned, images, angles, strict=True))
        halved = resized_batch(images, 4, threads)
        assert all(np.array_equal(h, resized(i, 4)) for h, i in zip(halved, images, strict=True))
        assert resized_batch([], 4, threads) == [] and rotated_batch([], [], threads) == []  # no sample chosen
