"""Near copies (``--near-copies``): an image saved again, resized or re-encoded, is found by its perceptual hash and
kept in its original's split, as a byte-for-byte copy is; the search by bands finds every pair a brute force finds."""

import itertools
import random

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from ingest.config import ImagesIngestConfig
from ingest.copies import groups_of, near_pairs, picture_hash
from ingest.plan import plan_images

KEY = b"near-copies"


def _picture(seed: int, size: int = 256) -> np.ndarray:
    """A grey picture with structure at every scale (blurred noise of three sizes), as a scan has."""
    rng = np.random.default_rng(seed)
    out = np.zeros((size, size), np.float32)
    for cells, weight in ((4, 1.0), (16, 0.5), (64, 0.25)):
        out += weight * cv2.resize(rng.normal(0, 1, (cells, cells)).astype(np.float32), (size, size))
    return cv2.normalize(out, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


SAVED_AGAIN = {
    "as PNG": lambda img: cv2.imencode(".png", img)[1].tobytes(),
    "at JPEG quality 60": lambda img: _jpeg(img, 60),
    "at 200 px": lambda img: _jpeg(cv2.resize(img, (200, 200), interpolation=cv2.INTER_AREA)),
    "at 512 px": lambda img: _jpeg(cv2.resize(img, (512, 512), interpolation=cv2.INTER_CUBIC), 75),
    "in colour": lambda img: _jpeg(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)),
}


def test_a_picture_saved_again_hashes_near_it_and_other_pictures_far():
    pictures = [_picture(seed) for seed in range(12)]
    hashes = [picture_hash(_jpeg(p)) for p in pictures]
    for how, save in SAVED_AGAIN.items():
        moved = [(h ^ picture_hash(save(p))).bit_count() for p, h in zip(pictures, hashes, strict=True)]
        assert max(moved) <= 6, (how, moved)
    apart = [(a ^ b).bit_count() for a, b in itertools.combinations(hashes, 2)]
    assert min(apart) > 16, sorted(apart)[:5]
    assert picture_hash(b"not an image") is None and picture_hash(_jpeg(pictures[0])) >> 63 == 0


def test_16_bit_pictures_hash_by_their_own_values_not_their_top_byte():
    """An MR export in 16 bits whose values stay under 256 was black cut to 8 bits: every such picture hashed alike,
    one near copy of every other. Kept in 16 bits, each hashes as itself, and as its 8-bit JPEG saved again."""
    pictures = [_picture(seed) for seed in range(6)]
    dim = [cv2.imencode(".png", p.astype(np.uint16) * 3 // 4)[1].tobytes() for p in pictures]  # values under 192
    hashes = [picture_hash(d) for d in dim]
    assert min((a ^ b).bit_count() for a, b in itertools.combinations(hashes, 2)) > 16
    wide = [cv2.imencode(".png", p.astype(np.uint16) * 16)[1].tobytes() for p in pictures]  # 12-bit values
    assert max((h ^ picture_hash(w)).bit_count() for h, w in zip(hashes, wide, strict=True)) <= 6
    assert max((h ^ picture_hash(_jpeg(p))).bit_count() for h, p in zip(hashes, pictures, strict=True)) <= 6


@pytest.mark.parametrize("within", [0, 1, 3, 6, 10])
def test_the_search_by_bands_finds_what_a_brute_force_finds(within):
    rng = random.Random(within)
    hashes = {f"i{i:03d}": rng.getrandbits(64) for i in range(300)}
    for i in range(0, 300, 7):  # planted: a near copy each, 0 to within + 2 bits away
        flips = rng.sample(range(64), rng.randint(0, within + 2))
        hashes[f"n{i:03d}"] = hashes[f"i{i:03d}"] ^ sum(1 << b for b in flips)
    hashes["broken"] = None
    brute = sorted(
        (a, b)
        for a, b in itertools.combinations(sorted(k for k, v in hashes.items() if v is not None), 2)
        if (hashes[a] ^ hashes[b]).bit_count() <= within
    )
    assert near_pairs(hashes, within) == brute and brute


def test_a_near_copy_of_a_near_copy_joins_the_group():
    assert groups_of([("c", "d"), ("a", "b"), ("b", "c"), ("x", "y")]) == [["a", "b", "c", "d"], ["x", "y"]]


def test_near_copies_share_a_split_and_say_so(tmp_path):
    """A collection whose image was saved again, smaller and in another class folder: with ``--near-copies`` the
    two share a split over every seed, each names the other and says which labels they bear; without, no word."""
    root = tmp_path / "images"
    for k, cls in enumerate(("glioma", "meningioma")):
        (root / cls).mkdir(parents=True)
        for i in range(6):
            (root / cls / f"{i}.jpg").write_bytes(_jpeg(_picture(10 * k + i)))
    small = cv2.resize(_picture(0), (180, 180), interpolation=cv2.INTER_AREA)
    (root / "meningioma" / "again.jpg").write_bytes(_jpeg(small, 70))
    pair = [str(root / "glioma" / "0.jpg"), str(root / "meningioma" / "again.jpg")]
    splits = set()
    for seed in range(8):
        cfg = ImagesIngestConfig(sources=[str(root)], out=str(tmp_path / "o"), split="train=0.5,val=0.5", seed=seed,
                                 near_copies=6)  # fmt: skip
        plan = plan_images(cfg, KEY)
        units = {plan.private[u.id]: u for u in plan.units}
        original, again = units[pair[0]], units[pair[1]]
        assert original.split == again.split and original.patient != again.patient
        splits.add(original.split)
    assert splits == {"train", "val"}  # the seed moves the pair, never apart
    said = "one of 2 near copies (pictures within 6 bits of 64): in one split, labelled glioma and meningioma"
    assert original.meta["warnings"] == [said] == again.meta["warnings"]
    assert original.meta["copies"] == [again.id] and again.meta["copies"] == [original.id]
    assert sum(bool(u.meta.get("warnings")) for u in plan.units) == 2  # the other pictures are no one's copies
    plain = plan_images(cfg.model_copy(update={"near_copies": 0}), KEY)
    assert not any(u.meta.get("warnings") for u in plain.units)
    with pytest.raises(ValidationError, match="near copies are kept together"):
        ImagesIngestConfig(sources=["a"], out="o", near_copies=6, duplicates="apart")
    from cluster.cli import build_parser
    from cluster.cli_ingest import ingest_config

    typed = build_parser().parse_args(["ingest", "images", "a", "--out", "o", "--near-copies", "6"])
    assert ingest_config(typed).near_copies == 6


def test_a_near_copy_appended_later_joins_its_originals_split(tmp_path):
    """``--append`` of a picture saved again whose original the dataset holds: it joins the original's split,
    whatever split the seed gave that, and nothing held is said to have changed."""
    from ingest.rerun import _kept_splits as kept_splits
    from ingest.rerun import differences
    from tests.datasets import held_manifest

    root = tmp_path / "images"
    for k, cls in enumerate(("glioma", "meningioma")):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{i}.jpg").write_bytes(_jpeg(_picture(10 * k + i)))
    again = root / "glioma" / "a_again.jpg"  # sorts before its original
    for seed in range(6):
        again.unlink(missing_ok=True)
        cfg = ImagesIngestConfig(sources=[str(root)], out=str(tmp_path / "o"), split="train=0.5,val=0.5", seed=seed,
                                 near_copies=6, append=True)  # fmt: skip
        before = plan_images(cfg, KEY)
        previous = held_manifest(before, cfg)
        again.write_bytes(_jpeg(cv2.resize(_picture(13), (300, 300)), 80))  # meningioma/3.jpg, larger
        plan = plan_images(cfg, KEY)
        splits = kept_splits(previous, plan, cfg)
        by_path = {plan.private[u.id]: u.id for u in plan.units}
        assert splits[by_path[str(again)]] == splits[by_path[str(root / "meningioma" / "3.jpg")]], seed
        assert differences(previous, "images", plan, cfg, splits) == []
