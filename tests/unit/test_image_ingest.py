"""Image-folder ingest: decoding, boxes and crops, per-slice tables, and the planner on synthetic trees."""

import hashlib
import json
import shutil

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from ingest.config import ImagesIngestConfig
from ingest.images import (
    Box,
    ImageError,
    crop,
    csv_boxes,
    decode_rgb,
    normalise,
    read_slice_table,
    slice_number,
    yolo_boxes,
)
from ingest.plan import plan_images
from ingest.synthetic import MRI_CLASSES, make_ct_ich, make_mri_folders
from ingest.units import Work, work_samples

KEY = b"test-key"


def _png(arr: np.ndarray) -> bytes:
    return cv2.imencode(".png", arr)[1].tobytes()


def test_decode_grey_colour_alpha_and_16_bit():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = decode_rgb(_png(grey))
    assert rgb.shape == (3, 4, 3) and all(np.array_equal(rgb[..., c], grey) for c in range(3))
    bgra = np.zeros((2, 2, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 10, 200, 7  # blue 10, red 200
    assert decode_rgb(_png(bgra))[0, 0].tolist() == [200, 0, 10]
    wide = np.linspace(0, 60000, 400).astype(np.uint16).reshape(20, 20)
    out = decode_rgb(_png(wide))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255  # percentile-stretched
    # 16-bit colour (BGR as OpenCV writes it): its colours kept, the channels stretched alike (it was made grey)
    colour = np.zeros((20, 20, 3), np.uint16)
    colour[..., 2], colour[..., 1], colour[..., 0] = 60000, wide, 0  # red, a green ramp, no blue
    out = decode_rgb(_png(colour))
    assert out[..., 0].min() == 255 and out[..., 2].max() == 0 and out[..., 1].min() == 0
    assert np.all(np.diff(out[..., 1].ravel().astype(int)) >= 0)  # the ramp, as a ramp
    with pytest.raises(ImageError, match="not a decodable image"):
        decode_rgb(b"\xff\xd8 truncated jpeg")


def test_decode_turns_by_exif_orientation_and_converts_cmyk():
    """A photo's pixels as its viewer (and the tool its boxes were drawn in) shows them; CMYK as colour."""
    import io

    from PIL import Image

    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :10] = 255  # a white strip on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: shown turned 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "JPEG", exif=exif.tobytes())
    shown = decode_rgb(buf.getvalue())
    assert shown.shape == (80, 40, 3)
    assert shown[:10].mean() > 200 and shown[20:].mean() < 30  # the strip at the top, as shown
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (200, 30, 10)).convert("CMYK").save(buf, "TIFF")
    assert np.abs(decode_rgb(buf.getvalue()).astype(int) - [200, 30, 10]).max() <= 2


def _jpeg(arr: np.ndarray, **options) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **options)
    return buf.getvalue()


def test_a_jpeg_whose_scan_is_damaged_is_refused_saying_how_and_the_rest_decode_as_opencv_does():
    """OpenCV decodes a JPEG whose scan ends early (its end marker in place) with the missing part grey, or one
    whose blocks fell out of sync, printing libjpeg's warning where no caller sees it: such an image is refused."""
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(120, 40, (96, 128, 3)), 0, 255).astype(np.uint8)
    for options in ({}, {"subsampling": 0}, {"progressive": True}, {"restart_marker_blocks": 2}):
        data = _jpeg(image, **options)
        opencv = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert np.array_equal(decode_rgb(data), opencv), options
    grey = _jpeg(image[..., 0])
    assert np.array_equal(
        decode_rgb(grey), cv2.cvtColor(cv2.imdecode(np.frombuffer(grey, np.uint8), 0), cv2.COLOR_GRAY2RGB)
    )
    good = _jpeg(image, restart_marker_blocks=2)
    scan = good.index(b"\xff\xda") + 14
    cut = good[: (scan + len(good)) // 2] + b"\xff\xd9"
    assert cv2.imdecode(np.frombuffer(cut, np.uint8), cv2.IMREAD_COLOR) is not None  # decoded, half grey
    with pytest.raises(ImageError, match=r"^damaged JPEG data: Corrupt JPEG data: premature end of data segment$"):
        decode_rgb(cut)
    restart = good.index(b"\xff\xd3", scan)  # RST3 made RST5: the blocks after it out of place
    with pytest.raises(ImageError, match="damaged JPEG data: Corrupt JPEG data: found marker 0xd5 instead of RST3"):
        decode_rgb(good[:restart] + b"\xff\xd5" + good[restart + 2 :])
    over = good[:-2] + bytes(range(1, 41)) + b"\xff\xd9"  # bytes after the last block, as careless writers leave
    assert np.array_equal(decode_rgb(over), decode_rgb(good))  # every block whole: decoded as OpenCV does


def test_a_damaged_jpeg_fails_its_image_with_the_reason_and_the_others_are_ingested(tmp_path):
    from ingest.staging import process_work
    from ingest.units import batch_images

    make_mri_folders(tmp_path, per_class=2, size=32)
    hurt = tmp_path / "images" / "glioma" / "gl_0001.jpg"
    data = hurt.read_bytes()
    hurt.write_bytes(data[: len(data) * 2 // 3] + b"\xff\xd9")  # its scan ends early
    cfg = ImagesIngestConfig(sources=[str(tmp_path / "images")], out=str(tmp_path / "out"), split="train=1.0")
    plan = plan_images(cfg, KEY)
    [work] = batch_images(plan.units, 100)
    per = {r.unit: r for r in process_work(work, cfg).per_unit()}
    [damaged] = [u.id for u in plan.units if u.sources[0] == str(hurt)]
    assert per.pop(damaged).reason.endswith("damaged JPEG data: Corrupt JPEG data: premature end of data segment")
    assert len(per) == len(plan.units) - 1 and all(r.status == "ingested" and r.samples == 1 for r in per.values())


def test_a_tiff_of_several_images_is_ingested_from_its_first_with_a_warning(tmp_path):
    """OpenCV reads a TIFF's first page alone: a stack of slices or channels (pages of full resolution) says how
    many were left out in its warnings, where a TIFF with a thumbnail (a reduced page) or one page says nothing."""
    import tifffile

    from ingest.images import stack_notes
    from ingest.staging import process_work
    from ingest.units import batch_images

    make_mri_folders(tmp_path, per_class=1, size=32)
    first = np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)
    folder = tmp_path / "images" / "glioma"
    tifffile.imwrite(folder / "stack.tif", np.stack([first, first[::-1], first[:, ::-1]]), photometric="rgb")
    with tifffile.TiffWriter(folder / "thumb.tif") as tif:
        tif.write(first, photometric="rgb")
        tif.write(first[::4, ::4], photometric="rgb", subfiletype=1)  # a reduced-resolution page
    tifffile.imwrite(folder / "one.tif", first, photometric="rgb")
    said = "a TIFF of 3 images (pages): its first is the sample, the other 2 are left out"
    assert stack_notes((folder / "stack.tif").read_bytes()) == [said]
    assert stack_notes((folder / "thumb.tif").read_bytes()) == stack_notes(_png(first)) == []
    assert np.array_equal(decode_rgb((folder / "stack.tif").read_bytes()), first)  # the first page
    cfg = ImagesIngestConfig(sources=[str(tmp_path / "images")], out=str(tmp_path / "out"), split="train=1.0")
    plan = plan_images(cfg, KEY)
    [work] = batch_images(plan.units, 100)
    names = {u.id: u.sources[0].rsplit("/", 1)[1] for u in plan.units}
    per = {names[r.unit]: r for r in process_work(work, cfg).per_unit()}
    assert per["stack.tif"].warnings == [said] and per["stack.tif"].samples == 1
    assert all(not r.warnings and r.status == "ingested" for name, r in per.items() if name != "stack.tif")


def test_yolo_and_csv_boxes_normalised_and_cropped():
    (box,) = yolo_boxes("2 0.5 0.5 0.2 0.4\n\n")
    assert (box.x0, box.y0, box.x1, box.y1, box.label) == pytest.approx((0.4, 0.3, 0.6, 0.7, "2"))
    with pytest.raises(ValueError, match=r"b\.txt: line 1"):
        yolo_boxes("1 0.5 0.5 1.5 0.1", "b.txt")
    table = csv_boxes("image,x_min,y_min,x_max,y_max,label\ndir/a.jpg,10,20,30,60,glioma\n")
    (b,) = normalise(table["a"], width=100, height=200)
    assert b.as_list() == [0.1, 0.1, 0.3, 0.3, "glioma"]
    with pytest.raises(ValueError, match="lacks column"):
        csv_boxes("image,x,y\n")
    rgb = np.arange(100 * 200 * 3, dtype=np.uint32).reshape(200, 100, 3).astype(np.uint8)
    # box 10..30 x 20..60 px; 10 % margin adds 2 px in x and 4 px in y on each side
    assert crop(rgb, b, margin=0.1).shape == (48, 24, 3)
    np.testing.assert_array_equal(crop(rgb, b, margin=0.0), rgb[20:60, 10:30])
    assert crop(rgb, Box(0.0, 0.0, 0.05, 0.05), margin=1.0).shape == (20, 10, 3)  # clipped at the corner


def test_ct_ich_table_and_slice_names():
    text = (
        "PatientNumber,SliceNumber,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,"
        "No_Hemorrhage,Fracture_Yes_No\n49,1,0,0,0,0,0,1,0\n49,2,1,0,0,1,0,0,1\n"
    )
    table, subtypes = read_slice_table(text)
    # [any, epidural, intraparenchymal, intraventricular, subarachnoid, subdural]
    assert subtypes and table[("49", 1)] == [0, 0, 0, 0, 0, 0] and table[("49", 2)] == [1, 1, 0, 1, 0, 0]
    generic, subtypes = read_slice_table("patient,slice,label\n007,3,1\n")
    assert not subtypes and generic == {("7", 3): [1, 0, 0, 0, 0, 0]}
    with pytest.raises(ValueError, match="line 2: labels must be 0 or 1"):
        read_slice_table("patient,slice,label\n1,1,2\n")
    with pytest.raises(ValueError, match="line 3 repeats patient 1 slice 1"):
        read_slice_table("patient,slice,label\n1,1,1\n1,1,0\n")
    assert slice_number("12") == 12 and slice_number("12_HGE_Seg") is None


def test_class_folders_with_yolo_boxes_and_crops(tmp_path):
    labels = make_mri_folders(tmp_path, per_class=2, size=48)
    (tmp_path / "images" / "glioma" / "notes.txt").write_text("a stray file")
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=str(tmp_path / "out"), boxes=str(labels), crop=True
    )
    plan = plan_images(cfg, KEY)
    assert plan.classes == sorted(MRI_CLASSES) and len(plan.units) == 8
    assert [r.reason for r in plan.skipped] == ["not an image file (extension .txt)"]
    by_class = {plan.classes[u.label]: u for u in plan.units}
    assert by_class["notumor"].meta.get("yolo") is None and len(by_class["glioma"].meta["yolo"]) == 1
    (tumour,) = work_samples(Work(by_class["glioma"]), cfg)
    meta = json.loads(tumour["json"])
    assert meta["crop"] == 0 and len(meta["boxes"]) == 1 and tumour["cls"] == str(plan.classes.index("glioma"))
    crop_shape = cv2.imdecode(np.frombuffer(tumour["jpg"], np.uint8), cv2.IMREAD_COLOR).shape
    assert crop_shape[0] < 48 and crop_shape[1] < 48  # the crop, not the whole image
    (whole,) = work_samples(Work(by_class["notumor"]), cfg)
    assert json.loads(whole["json"])["crop"] is None
    assert cv2.imdecode(np.frombuffer(whole["jpg"], np.uint8), cv2.IMREAD_COLOR).shape == (48, 48, 3)
    text = json.dumps([u.item for u in plan.units] + [u.patient for u in plan.units] + [str(whole)])
    assert "gl_0000" not in text and str(tmp_path) not in text  # file names stay private
    assert "mpp" not in meta and "width_um" not in json.loads(whole["json"])  # no scale given, none recorded


def test_images_of_a_given_scale_record_it(tmp_path):
    """``--mpp``: each sample's stored µm/px and the width in µm it shows, whole or cropped, after --store-size."""
    labels = make_mri_folders(tmp_path, per_class=1, size=48)
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=str(tmp_path / "out"), boxes=str(labels), crop=True, mpp=2.0,
        store_size=24,
    )  # fmt: skip
    plan = plan_images(cfg, KEY)
    by_class = {plan.classes[u.label]: u for u in plan.units}
    (whole,) = work_samples(Work(by_class["notumor"]), cfg)
    assert {k: json.loads(whole["json"])[k] for k in ("mpp", "width_um")} == {"mpp": 4.0, "width_um": 96.0}
    (tumour,) = work_samples(Work(by_class["glioma"]), cfg)
    meta = json.loads(tumour["json"])
    crop_w = round((meta["boxes"][0][2] - meta["boxes"][0][0]) * 48 * 1.2)  # the box and its 10 % margins
    assert abs(meta["width_um"] - 2.0 * crop_w) <= 2.0 * 2  # within a pixel each side of the rounding
    stored_w = cv2.imdecode(np.frombuffer(tumour["jpg"], np.uint8), cv2.IMREAD_COLOR).shape[1]
    assert meta["mpp"] == pytest.approx(meta["width_um"] / stored_w, rel=1e-5)


def test_label_csv_layout_skips_unlisted_images(tmp_path):
    make_mri_folders(tmp_path, per_class=1, size=32)
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("image,label,patient\ngl_0000.jpg,tumour,P1\nno_0000.jpg,healthy,P1\ngl_0009.jpg,tumour,P2\n")
    cfg = ImagesIngestConfig(sources=[str(tmp_path / "images")], out=str(tmp_path / "o"), labels=str(csv_path))
    plan = plan_images(cfg, KEY)
    assert plan.classes == ["healthy", "tumour"]
    assert len(plan.units) == 2 and len({u.patient for u in plan.units}) == 1  # one patient, one split
    assert len({u.split for u in plan.units}) == 1
    assert sorted(r.reason for r in plan.skipped) == ["not in the label table"] * 2
    (row,) = plan.unmatched  # gl_0009: no such image
    assert {plan.private[u.item] for u in plan.units} == {u.sources[0] for u in plan.units}
    assert {plan.private[u.patient] for u in plan.units} == {"patient P1"}
    assert plan.private[row] == f"{csv_path}: row gl_0009" and row not in {r.id for r in plan.skipped}


def test_ct_ich_sequences(tmp_path):
    csv_path = make_ct_ich(tmp_path, patients=4, slices=8, size=32)
    (tmp_path / "Patients_CT" / "050" / "brain" / "5.jpg").unlink()  # a gap in one patient's slices
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "Patients_CT")], out=str(tmp_path / "o"), labels=str(csv_path),
        slice_folder="brain", mode="series", frames=4, split="train=0.5,val=0.5",
    )  # fmt: skip
    plan = plan_images(cfg, KEY)
    assert plan.classes == ["no hemorrhage", "hemorrhage"] and plan.multilabel[0] == "any"
    assert [u.label for u in plan.units] == [1, 0, 1, 0]  # patients 049..052; even ones bleed
    reasons = sorted({r.reason for r in plan.skipped})
    assert reasons == [
        "not a slice image: its name is not a slice number (a mask or another file)",
        "outside the slice folder 'brain'",
    ]
    gap = plan.units[1]
    assert len(gap.sources) == 7 and gap.meta["warnings"] == [
        "slice numbers skip 1 value(s) between 1 and 8",
        "1 slice(s) of the table have no image",
    ]
    assert [s.rsplit("/", 1)[1] for s in plan.units[0].sources] == [f"{k}.jpg" for k in range(1, 9)]
    (sample,) = work_samples(Work(plan.units[0]), cfg)
    meta = json.loads(sample["json"])
    assert sorted(k for k in sample if k.endswith(".jpg")) == [f"{j:03d}.jpg" for j in range(4)]
    assert meta["slices"] == [0, 2, 5, 7] and meta["labels"][:3] == [1, 0, 1] and sample["cls"] == "1"
    assert "049" not in json.dumps(meta) and "049" not in plan.units[0].patient
    assert "image" not in meta  # four slices: the sample stands for no one slice
    # one sample per slice: each named by its slice's pseudonym, which the private map traces to the file
    per_slice = cfg.model_copy(update={"mode": "slice"})
    names = [json.loads(s["json"])["image"] for s in work_samples(Work(plan.units[0]), per_slice)]
    assert [plan.private[n] for n in names] == plan.units[0].sources and len(set(names)) == 8

    # Without --slice-folder the bone images collide with the brain ones: skipped, and the reason says why.
    both = plan_images(cfg.model_copy(update={"slice_folder": None}), KEY)
    assert any("duplicate slice" in (r.reason or "") and "--slice-folder" in r.reason for r in both.skipped)

    # A patient of the table without a folder of images: not an input, but the plan says the row found none.
    assert plan.unmatched == []
    shutil.rmtree(tmp_path / "Patients_CT" / "052")
    (row,) = plan_images(cfg, KEY).unmatched
    assert plan_images(cfg, KEY).private[row].startswith(f"{csv_path}: row ")


def test_images_config_checks():
    with pytest.raises(ValidationError, match="crop needs boxes"):
        ImagesIngestConfig(sources=["x"], out="o", crop=True)
    with pytest.raises(ValidationError, match="needs layout sequences"):
        ImagesIngestConfig(sources=["x"], out="o", layout="folders", mode="series")


def test_images_batched_per_split_and_a_bad_image_fails_alone(tmp_path):
    from ingest.rendering import rendered_with
    from ingest.staging import process_work
    from ingest.units import batch_images
    from shards.writer import read_tar_samples

    make_mri_folders(tmp_path, per_class=2, size=32)
    (tmp_path / "images" / "glioma" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=str(tmp_path / "out"), split="train=0.5,val=0.5", images_per_task=3
    )
    plan = plan_images(cfg, KEY)
    works = batch_images(plan.units, cfg.images_per_task)
    assert sorted(u.id for w in works for u in w.batch) == sorted(u.id for u in plan.units)  # each image once
    assert all(len(w.batch) <= 3 and len({u.split for u in w.batch}) == 1 for w in works)
    assert [w.id for w in works] == [w.id for w in batch_images(plan.units, 3)]  # the same work when resumed
    broken = next(u for u in plan.units if u.sources[0].endswith("broken.jpg"))
    work = next(w for w in works if broken in w.batch)
    rec = process_work(work, cfg)
    assert rec.status == "ingested" and set(rec.members) == {u.id for u in work.batch}
    assert rec.rendered_with == rendered_with(cfg) and rec.rendered_with["tessera"].startswith("images rendering ")
    per = {r.unit: r for r in rec.per_unit()}
    assert per[broken.id].status == "failed" and "not a decodable image" in per[broken.id].reason
    assert per[broken.id].samples == 0 and all(r.id == work.id for r in per.values())
    good = [u for u in work.batch if u is not broken]
    assert all(per[u.id].status == "ingested" and per[u.id].samples == 1 for u in good)
    staged = read_tar_samples(tmp_path / "out" / "_staging" / work.id / "shard-000000.tar")
    assert sorted(s["__key__"] for s in staged) == sorted(u.item for u in good) and rec.samples == len(good)
    # a batch with a failure is not recorded as done (a re-run retries it); a whole one is
    assert not (tmp_path / "out" / "_staging" / f"{work.id}.json").exists()
    whole = next(w for w in works if broken not in w.batch)
    assert process_work(whole, cfg).status == "ingested"
    assert (tmp_path / "out" / "_staging" / f"{whole.id}.json").exists()


def test_a_replaced_image_or_redrawn_box_gets_another_fingerprint_and_its_staged_batch_is_made_again(tmp_path):
    """Fingerprints: the same files plan to the same ones; an image rewritten in place, or whose YOLO box file
    changed, gets another and the rest keep theirs; a batch staged from the old files is not taken for the new."""
    from ingest.staging import done_records, process_work, reusable
    from ingest.units import batch_images

    labels = make_mri_folders(tmp_path, per_class=2, size=32)
    cfg = ImagesIngestConfig(
        sources=[str(tmp_path / "images")], out=str(tmp_path / "out"), boxes=str(labels), split="train=1.0"
    )
    plan = plan_images(cfg, KEY)
    before = {u.sources[0]: u.fingerprint for u in plan.units}
    assert len(set(before.values())) == len(before) == 8 and all(before.values())
    assert {u.sources[0]: u.fingerprint for u in plan_images(cfg, KEY).units} == before
    assert not any(str(tmp_path) in f or "gl_0000" in f for f in before.values())  # a keyed digest, not a name
    (work,) = batch_images(plan.units, 8)
    assert process_work(work, cfg).fingerprint == work.fingerprint
    assert reusable(done_records(cfg), [work]) == {work.id}

    glioma = sorted((tmp_path / "images" / "glioma").glob("*.jpg"))
    cv2.imwrite(str(glioma[0]), np.full((40, 40, 3), 200, np.uint8))  # rescanned in place
    (labels / f"{glioma[1].stem}.txt").write_text("0 0.5 0.5 0.2 0.2\n")  # its box redrawn
    again = plan_images(cfg, KEY)
    after = {u.sources[0]: u.fingerprint for u in again.units}
    assert {k for k in before if after[k] != before[k]} == {str(glioma[0]), str(glioma[1])}
    (redo,) = batch_images(again.units, 8)
    assert redo.id == work.id and reusable(done_records(cfg), [redo]) == set()  # the same images, other files


def test_copies_are_found_by_their_content_and_an_md5_etag_is_not_downloaded(tmp_path):
    from ingest.copies import content_digest, copy_groups

    (tmp_path / "a.png").write_bytes(b"same")
    (tmp_path / "b.png").write_bytes(b"other")
    assert content_digest(str(tmp_path / "a.png")) == hashlib.md5(b"same").hexdigest()  # the bytes' MD5
    assert content_digest(str(tmp_path / "b.png")) == hashlib.md5(b"other").hexdigest()
    etag = "0123456789abcdef0123456789abcdef"
    assert content_digest("s3://raw/x.png", f"4-{etag}") == etag  # the listing said it: nothing read
    groups = copy_groups({"c": "1", "a": "1", "b": "2", "e": "3", "d": "3", "f": "3"})
    assert groups == [["a", "c"], ["d", "e", "f"]]


def test_an_image_held_twice_lands_in_one_split_or_once(tmp_path):
    """A Kaggle-style collection whose copies sit under two names (the same image in Training and Testing, or
    in two class folders): by default the copies share a split, and each says so (and which labels they bear when
    those differ); ``drop`` keeps the first alone; ``apart`` looks for none. Each stays its own patient, so that a
    copy found among images added later changes nothing of those a dataset holds."""
    make_mri_folders(tmp_path / "mri", per_class=3, size=32, seed=2)
    images = tmp_path / "mri" / "images"
    original = sorted((images / "glioma").iterdir())[0]
    names = [original, images / "glioma" / "zz_again.jpg", images / "meningioma" / "zz_mislabelled.jpg"]
    shutil.copy(original, names[1])  # the same class
    shutil.copy(original, names[2])  # another class: a label in doubt
    for seed in range(6):  # whatever split the seed gives the first, the copies follow
        cfg = ImagesIngestConfig(sources=[str(images)], out=str(tmp_path / "o"), split="train=0.5,val=0.5", seed=seed)
        plan = plan_images(cfg, KEY)
        units = {plan.private[u.id]: u for u in plan.units}
        trio = [units[str(p)] for p in names]
        assert len({u.split for u in trio}) == 1 and len({u.patient for u in trio}) == 3
    said = "one of 3 byte-for-byte copies: in one split, labelled glioma and meningioma"
    assert all(u.meta["warnings"] == [said] for u in trio)
    assert sorted(trio[0].meta["copies"]) == sorted([trio[1].id, trio[2].id])
    assert sum(bool(u.meta.get("warnings")) for u in plan.units) == 3 and len(plan.units) == 14
    assert len({u.split for u in plan.units}) == 2  # the rest still split

    dropped = plan_images(cfg.model_copy(update={"duplicates": "drop"}), KEY)
    assert len(dropped.units) == 12 and {r.reason for r in dropped.skipped} == {
        "a byte-for-byte copy of an image ingested (--duplicates drop), labelled glioma and meningioma"
    }
    kept = next(u for u in dropped.units if dropped.private[u.id] == str(original))
    assert kept.meta["warnings"] == [
        "one of 3 byte-for-byte copies: kept, the others skipped, labelled glioma and meningioma"
    ]

    apart = plan_images(cfg.model_copy(update={"duplicates": "apart"}), KEY)
    assert len({u.patient for u in apart.units}) == 14 and not any(u.meta.get("warnings") for u in apart.units)
    fingerprints = {u.id: u.fingerprint for u in apart.units}
    assert all(fingerprints[u.id] == u.fingerprint for u in plan.units)  # copies are no change to a file


def test_a_copy_appended_later_joins_its_originals_split(tmp_path):
    """``--append`` of images among which a copy of one the dataset holds (and two copies of a new one): the
    copy joins the held image's split, the new pair one split, and nothing held is said to have changed."""
    from ingest.rerun import _kept_splits as kept_splits
    from ingest.rerun import differences
    from tests.datasets import held_manifest

    make_mri_folders(tmp_path / "mri", per_class=4, size=32, seed=3)
    images = tmp_path / "mri" / "images"
    old = sorted((images / "pituitary").iterdir())[0]
    added = {images / "glioma" / "aa_copy_of_old.jpg": old}  # sorts before its original
    new = images / "notumor" / "new.jpg"
    added[images / "meningioma" / "new_again.jpg"] = new
    for seed in range(8):  # whatever splits the seed gives, the copies follow
        cfg = ImagesIngestConfig(
            sources=[str(images)], out=str(tmp_path / "o"), split="train=0.5,val=0.5", seed=seed, append=True
        )
        for path in [*added, new]:
            path.unlink(missing_ok=True)
        before = plan_images(cfg, KEY)
        previous = held_manifest(before, cfg)
        cv2.imwrite(str(new), np.full((32, 32), 77, np.uint8))
        for copy, original in added.items():
            shutil.copy(original, copy)
        plan = plan_images(cfg, KEY)
        splits = kept_splits(previous, plan, cfg)
        by_path = {plan.private[u.id]: u.id for u in plan.units}
        for copy, original in added.items():
            assert splits[by_path[str(copy)]] == splits[by_path[str(original)]], seed
        assert differences(previous, "images", plan, cfg, splits) == []


def test_a_dataset_made_before_copies_were_looked_for_is_compared_as_keeping_them_apart(tmp_path):
    """Its recorded options lack ``duplicates``: they read as ``apart``, what it did, so a run that would group
    copies (the default now) is told its options differ rather than moving that dataset's copies unsaid."""
    from ingest.config import changed_options

    cfg = ImagesIngestConfig(sources=[str(tmp_path)], out=str(tmp_path / "o"))
    old = {k: v for k, v in cfg.public().items() if k != "duplicates"}
    assert changed_options(cfg.recorded_options(old), cfg.output_options()) == "duplicates 'apart' -> 'together'"
    same = cfg.model_copy(update={"duplicates": "apart"})
    assert changed_options(same.recorded_options(old), same.output_options()) == ""
