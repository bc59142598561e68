"""A detector's zoom, rotation and flips (:mod:`training.box_augment`): the pixels move as the classifiers' DALI
pipeline moves them, and the boxes move with the pixels; a box that leaves the image goes with its label."""

import numpy as np
import pytest
import torch

from shards.cpu_kernels import rotated
from training.box_augment import moved, moved_boxes, placement, warped
from training.config import AugmentConfig

BLACK = torch.tensor([-2.0, -1.5, -1.0])  # black as some normalisation has it


def _one(x, boxes, **aug):
    tgts = [{"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.arange(len(boxes))}]
    out, tgts = moved(x[None], tgts, AugmentConfig(**aug), np.random.default_rng(0), BLACK)
    return out[0], tgts[0]


def _extent(image: torch.Tensor, above: float) -> list[float]:
    ys, xs = torch.nonzero(image[0] > above, as_tuple=True)
    return [float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1]


def test_flips_move_the_boxes_with_the_pixels():
    x = torch.zeros(3, 8, 8)
    x[:, 1:3, 0:2] = 1  # a block at x 0-2, y 1-3
    out, t = _one(x, [[0, 1, 2, 3]], hflip=1.0, vflip=1.0)
    assert t["boxes"].tolist() == [[6, 5, 8, 7]] == [_extent(out, 0.5)]
    same, kept = _one(x, [], hflip=0.0)
    assert torch.equal(same, x) and kept["boxes"].shape == (0, 4)


def test_a_quarter_turn_is_anticlockwise_and_its_box_is_the_blocks():
    x = torch.zeros(3, 16, 16)
    x[:, 2:6, 9:15] = 1  # x 9-15, y 2-6: top right
    out, t = _one(x, [[9, 2, 15, 6]], rotate_p=1.0, rotate_degrees=(90, 90))
    torch.testing.assert_close(out, torch.rot90(x, 1, dims=(-2, -1)), atol=1e-5, rtol=0)  # np.rot90's turn
    assert t["boxes"].tolist() == [[2, 1, 6, 7]] and _extent(out, 0.5) == [2, 1, 6, 7]  # to the top left


def test_rotation_resamples_as_the_classifiers_opencv_rotation():
    """The same angle, centre and border (edge pixels replicated) as :func:`shards.cpu_kernels.rotated`; both
    bilinear, OpenCV's in fixed point: within a level or two of 255."""
    rgb = np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    theirs = rotated(rgb, np.float32(30)).astype(np.float32)
    ours = warped(torch.from_numpy(rgb).permute(2, 0, 1).float(), placement(40, 30, 1.0), BLACK, frame=False)
    assert np.abs(ours.permute(1, 2, 0).numpy() - theirs).max() <= 2


def test_zoom_in_enlarges_about_the_centre_and_zoom_out_frames_in_black():
    x = torch.zeros(3, 64, 64)
    x[:, 24:40, 24:40] = 1
    out, t = _one(x, [[24, 24, 40, 40]], zoom_p=1.0, zoom=(2.0, 2.0))
    assert t["boxes"].tolist() == [[16, 16, 48, 48]] and _extent(out, 0.5) == [16, 16, 48, 48]
    out, t = _one(torch.ones(3, 64, 64), [[0, 0, 64, 64]], zoom_p=1.0, zoom=(0.5, 0.5))
    assert t["boxes"].tolist() == [[16, 16, 48, 48]] and _extent(out, 0.5) == [16, 16, 48, 48]
    assert torch.equal(out[:, :16], BLACK.view(3, 1, 1).expand(3, 16, 64))  # the frame is black, exactly


def test_a_bf16_batch_is_moved_in_float32_and_stays_bf16():
    """A GPU's bf16 batch: resampled in float32 (the frame's black too), returned in its own type."""
    x = torch.rand(3, 32, 32)
    for frame in (False, True):
        want = warped(x, placement(32, 20, 0.7), BLACK, frame)
        got = warped(x.bfloat16(), placement(32, 20, 0.7), BLACK, frame)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, atol=0.02, rtol=0.01)


def test_a_box_moved_out_of_view_goes_with_its_label_and_one_partly_in_view_is_clipped():
    boxes = torch.tensor([[0.0, 0, 8, 8], [10, 10, 30, 30], [62, 20, 64, 40]])
    got, keep = moved_boxes(boxes, placement(64, 0, 2.0), 64)
    # x' = 2x - 32: the first lies wholly outside; the second is [-12, 28] a side, 49 % of it in view; the third
    # [92, 96] in x: outside
    assert keep.tolist() == [False, True, False] and got[1].tolist() == [0, 0, 28, 28]
    _, t = _one(torch.zeros(3, 64, 64), boxes.tolist(), zoom_p=1.0, zoom=(2.0, 2.0))
    assert t["labels"].tolist() == [1] and t["boxes"].tolist() == [[0, 0, 28, 28]]
    sliver = torch.tensor([[0.0, 0, 20, 20]])  # [-32, 8] a side: 8 px of 40 in view, 4 % of its area
    assert moved_boxes(sliver, placement(64, 0, 2.0), 64)[1].tolist() == [False]


@pytest.mark.parametrize("degrees", [30.0, -45.0])
def test_a_turned_box_encloses_its_turned_block(degrees):
    x = torch.zeros(3, 64, 64)
    x[:, 20:30, 34:50] = 1
    out, t = _one(x, [[34, 20, 50, 30]], rotate_p=1.0, rotate_degrees=(degrees, degrees))
    x0, y0, x1, y1 = t["boxes"][0].tolist()
    e = _extent(out, 0.5)
    assert x0 <= e[0] and y0 <= e[1] and e[2] <= x1 and e[3] <= y1  # the block's pixels inside its box
    assert max(e[0] - x0, e[1] - y0, x1 - e[2], y1 - e[3]) <= 1.5  # and the box no looser than its edge pixels


def test_the_draws_repeat_for_the_same_generator():
    x = torch.rand(4, 3, 32, 32)
    aug = AugmentConfig(hflip=0.5, rotate_p=0.5, rotate_degrees=(0, 45), zoom_p=0.5, zoom=(0.5, 2))

    def run():
        tgts = [{"boxes": torch.tensor([[4.0, 4, 20, 20]]), "labels": torch.tensor([0])} for _ in range(4)]
        return moved(x, tgts, aug, np.random.default_rng(11), BLACK)

    (a, ta), (b, tb) = run(), run()
    assert torch.equal(a, b) and all(torch.equal(p["boxes"], q["boxes"]) for p, q in zip(ta, tb, strict=True))
    assert not torch.equal(a, x)  # something moved
