"""Paper 004's lesion segmentation from its box: GrabCut on synthetic MR slices against the drawn lesion, the mask
clean-up on hand-made masks, the cut-out crop, the preparation filters, and SAM from a local checkpoint."""

import json

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from ingest import lesion
from ingest.config import ImagesIngestConfig
from ingest.images import Box
from ingest.plan import make_plan, plan_images
from ingest.synthetic import make_mri_folders, mri_image
from ingest.units import Work, work_samples
from tests.checkpoints import tiny_sam

KEY = b"k" * 32


def _mri(size=128, seed=0, label="glioma"):
    img, (cx, cy, w, h) = mri_image(size, label, np.random.default_rng(seed))
    rgb = cv2.GaussianBlur(cv2.cvtColor(img, cv2.COLOR_GRAY2RGB), (7, 7), 2.0)  # a soft edge, as a scan's
    yy, xx = np.mgrid[0:size, 0:size] / size
    truth = np.hypot(yy - cy, xx - cx) < w / 2  # the disc mri_image drew
    return rgb, Box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), truth


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


@pytest.mark.parametrize(("label", "seed"), [("glioma", 0), ("meningioma", 1), ("pituitary", 2)])
def test_grabcut_finds_the_drawn_lesion_in_its_box(label, seed):
    rgb, box, truth = _mri(label=label, seed=seed)
    (found,) = lesion.lesions(rgb, [box], lesion.GrabCut())
    assert found.mask is not None and _iou(found.mask, truth) > 0.9
    assert found.fraction == pytest.approx(np.pi / 4, abs=0.12)  # a disc in its bounding square
    again = lesion.lesions(rgb, [box], lesion.GrabCut())[0]
    assert np.array_equal(again.mask, found.mask)  # seeded: a re-run makes the same mask


def test_a_box_with_nothing_in_it_or_the_whole_image_finds_no_lesion():
    flat = np.full((64, 64, 3), 90, np.uint8)
    assert lesion.lesions(flat, [Box(0.3, 0.3, 0.6, 0.6)], lesion.GrabCut())[0].mask is None
    rgb, _, _ = _mri(size=64)
    whole = lesion.lesions(rgb, [Box(0.0, 0.0, 1.0, 1.0)], lesion.GrabCut())[0]
    assert whole.mask is None and whole.fraction == 0.0


def test_keep_lesion_takes_the_largest_component_inside_the_box_with_its_holes_filled():
    mask = np.zeros((10, 12), bool)
    mask[1:6, 1:6] = True  # 25 px, a hole at its centre
    mask[3, 3] = False
    mask[7:9, 8:10] = True  # 4 px, smaller
    mask[0, 11] = True  # outside the box
    kept = lesion.keep_lesion(mask, (0, 0, 11, 10))
    expected = np.zeros_like(mask)
    expected[1:6, 1:6] = True
    assert np.array_equal(kept, expected)
    assert not lesion.keep_lesion(np.zeros((4, 4), bool), (0, 0, 4, 4)).any()


def test_cut_out_blacks_out_what_is_not_the_lesion():
    rgb = np.arange(20 * 20 * 3, dtype=np.uint8).reshape(20, 20, 3) | 1  # no zero pixels
    box = Box(0.25, 0.25, 0.75, 0.75)
    mask = np.zeros((20, 20), bool)
    mask[8:12, 8:12] = True
    cut = lesion.cut_out(rgb, box, 0.0, mask)
    assert cut.shape == (10, 10, 3)
    assert np.array_equal(cut[3:7, 3:7], rgb[8:12, 8:12]) and cut.sum() == rgb[8:12, 8:12].sum()
    assert np.array_equal(lesion.cut_out(rgb, box, 0.0, None), rgb[5:15, 5:15])  # no mask: the box crop


def test_denoise_greys_and_removes_salt_noise():
    rgb = np.zeros((9, 9, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[4, 4] = 255  # one salt pixel
    grey = lesion.denoise(rgb, 0, True)
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert grey[0, 0, 0] == round(0.299 * 200)
    clean = lesion.denoise(rgb, 3, False)
    assert np.array_equal(clean[4, 4], [200, 0, 0])
    assert lesion.denoise(rgb, 0, False) is rgb


def test_config_needs_crop_for_segment_and_an_odd_median():
    with pytest.raises(ValidationError, match=r"segment grabcut .* needs crop"):
        ImagesIngestConfig(sources=["x"], out="o", boxes="b", segment="grabcut")
    with pytest.raises(ValidationError, match="median must be odd"):
        ImagesIngestConfig(sources=["x"], out="o", median=4)


def test_segmented_crops_of_an_image_folder(tmp_path):
    labels = make_mri_folders(tmp_path, per_class=1, size=128, seed=2)
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=str(tmp_path / "out"), boxes=str(labels), crop=True,
        crop_margin=0.2, segment="grabcut", median=3, format="png",
    )  # fmt: skip
    plan = plan_images(cfg, KEY)
    unit = next(u for u in plan.units if plan.classes[u.label] == "glioma")
    (sample,) = work_samples(Work(unit), cfg)
    meta = json.loads(sample["json"])
    assert meta["segmented"] is True and 0.6 < meta["lesion_fraction"] < 0.95
    cut = cv2.imdecode(np.frombuffer(sample["png"], np.uint8), cv2.IMREAD_COLOR)
    h, w = cut.shape[:2]
    assert (cut[0, 0] == 0).all() and (cut[h - 1, w - 1] == 0).all()  # the brain around the lesion is gone
    assert cut[h // 2, w // 2].min() > 180  # the lesion itself stays
    whole = next(u for u in plan.units if plan.classes[u.label] == "notumor")
    (plain,) = work_samples(Work(whole), cfg)
    assert "segmented" not in json.loads(plain["json"])  # no box: the whole image, nothing segmented


def test_sam_from_a_local_checkpoint_segments_every_box_and_a_wrong_one_is_named(tmp_path):
    from transformers import ViTConfig

    from ingest.sam import SamSegmenter, check_sam

    folder = tiny_sam(tmp_path / "sam")
    sam = SamSegmenter(folder)
    rgb, box, _ = _mri(size=96)
    masks = sam.masks(rgb, [(10, 20, 60, 70), lesion.box_rect(box, 96, 96)])
    assert [m.shape for m in masks] == [(96, 96), (96, 96)] and all(m.dtype == bool for m in masks)
    found = lesion.lesions(rgb, [box], sam)[0]
    if found.mask is not None:  # random weights: whatever it finds lies in the box
        x0, y0, x1, y1 = lesion.box_rect(box, 96, 96)
        assert found.mask.sum() == found.mask[y0:y1, x0:x1].sum()

    with pytest.raises(ValueError, match=r"SAM model '.*nowhere' cannot be loaded"):
        check_sam(str(tmp_path / "nowhere"))
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ValueError, match=r"is a 'vit' checkpoint, not a Segment Anything one"):
        check_sam(str(tmp_path / "vit"))
    labels = make_mri_folders(tmp_path / "mri", per_class=1, size=64)
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "mri" / "images")], out=str(tmp_path / "out"), boxes=str(labels), crop=True,
        segment="sam", sam_model=str(tmp_path / "vit"),
    )  # fmt: skip
    with pytest.raises(ValueError, match="not a Segment Anything one"):  # before any image is read
        make_plan("images", cfg, KEY)
    cfg = cfg.model_copy(update={"sam_model": folder})
    plan = make_plan("images", cfg, KEY)
    unit = next(u for u in plan.units if u.meta.get("yolo"))
    (sample,) = work_samples(Work(unit), cfg)
    assert {"segmented", "lesion_fraction"} <= set(json.loads(sample["json"]))


class _FindsNothing:
    """A segmenter that finds no lesion in any box (what GrabCut or SAM return for a box over no lesion)."""

    def masks(self, rgb, rects):
        return [np.zeros(rgb.shape[:2], bool) for _ in rects]


def test_a_box_with_no_lesion_found_is_a_warning_of_its_image_in_the_manifest(tmp_path, monkeypatch):
    from cluster.cli_dataset import dataset_lines
    from ingest.runner import _merge, manifest_summary
    from ingest.staging import process_work
    from ingest.units import batch_images
    from shards import manifest as mf

    labels = make_mri_folders(tmp_path, per_class=1, size=64)
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=str(tmp_path / "out"), boxes=str(labels), crop=True,
        segment="grabcut", split="train=1.0",
    )  # fmt: skip
    monkeypatch.setattr(lesion, "segmenter", lambda *_: _FindsNothing())
    plan = plan_images(cfg, KEY)
    (work,) = batch_images(plan.units, cfg.images_per_task)
    per = {r.unit: r for r in process_work(work, cfg).per_unit()}
    said = "box 0: grabcut found no lesion in it; its crop is kept unmasked"
    tumours = {u.id for u in plan.units if u.meta.get("yolo")}
    assert len(tumours) == 3 and all(per[u].warnings == [said] for u in tumours)
    assert all(per[u.id].warnings == [] for u in plan.units if u.id not in tumours)
    inputs = [_merge(u, ([], [], None, None), [per[u.id]]) for u in plan.units]
    assert sorted(r.warnings for r in inputs) == [[], [said], [said], [said]]
    manifest = mf.Manifest(dataset="s3://b/mri", kind="images", classes=plan.classes, config={}, inputs=inputs)
    assert manifest.warned() == [f"3: {said}"]
    assert "3 input(s) with warnings (`tessera dataset s3://b/mri` counts them)" in manifest_summary(manifest)
    assert dataset_lines(manifest, b"{}")[-2:] == ["warnings (inputs):", f"  3: {said}"]
