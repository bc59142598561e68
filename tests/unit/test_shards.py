import errno
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from shards import manifest as mf
from shards.index import index_text, parse_index
from shards.schema import check_key, decode_image, encode_image, make_sample, to_bytes
from shards.verify import verify_dataset
from shards.writer import ShardWriter, concat_shards, read_tar_samples, ustar_header


def _samples(n, size=32):
    rng = np.random.default_rng(0)
    for i in range(n):
        rgb = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        yield make_sample(f"slide{i // 4}_{i:04d}", encode_image(rgb, "png"), "png", i % 2, {"i": i})


def test_writer_targets_size_and_publishes_complete_shards(tmp_path):
    with ShardWriter(str(tmp_path), target_bytes=20_000) as w:
        for s in _samples(12):
            w.write(s)
    infos = w.shards
    assert len(infos) > 1
    assert sum(i.samples for i in infos) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [i.name for i in infos] + [i.name.replace(".tar", ".idx") for i in infos]
    )
    for info in infos:
        data = (tmp_path / info.name).read_bytes()
        assert len(data) == info.size and hashlib.sha256(data).hexdigest() == info.sha256
    # each sample's class, in order, as runs: what the balanced sampler and class weights read
    assert [c for i in infos for c in mf.decode_runs(i.classes)] == [i % 2 for i in range(12)]


def test_class_runs_round_trip():
    labels = [0, 0, 0, 1, -1, -1, 3, 0]
    assert mf.encode_runs(labels) == "0x3 1x1 -1x2 3x1 0x1"
    assert mf.decode_runs(mf.encode_runs(labels)) == labels
    assert mf.decode_runs("0x2 0x1") == [0, 0, 0]  # parts joined without merging their runs


def test_samples_without_an_integer_class_are_recorded_as_minus_one(tmp_path):
    with ShardWriter(str(tmp_path)) as w:
        w.write({"__key__": "a", "png": b"x", "cls": 2})
        w.write({"__key__": "b", "png": b"x"})
        w.write({"__key__": "c", "png": b"x", "cls": "tumour"})
    assert w.shards[0].classes == "2x1 -1x2"


def test_index_matches_dalis_wds2idx(tmp_path):
    with ShardWriter(str(tmp_path), target_bytes=1 << 30) as w:
        for s in _samples(5):
            w.write(s)
    ours = (tmp_path / "shard-000000.idx").read_text()
    ref = tmp_path / "ref.idx"
    wds2idx = Path(sys.executable).parent / "wds2idx"
    subprocess.run([str(wds2idx), str(tmp_path / "shard-000000.tar"), str(ref)], check=True, capture_output=True)
    assert ours.strip() == ref.read_text().strip()
    samples = parse_index(ours)
    assert len(samples) == 5 and [m.ext for m in samples[0]] == ["cls", "json", "png"]
    # offsets point at the data: read the cls member straight from the tar bytes
    blob = (tmp_path / "shard-000000.tar").read_bytes()
    cls = samples[1][0]
    assert blob[cls.offset : cls.offset + cls.size] == b"1"


def test_round_trip_and_duplicate_keys(tmp_path):
    with ShardWriter(str(tmp_path)) as w:
        for s in _samples(3):
            w.write(s)
        with pytest.raises(ValueError, match="duplicate sample key"):
            w.write(next(_samples(1)))
    back = read_tar_samples(tmp_path / "shard-000000.tar")
    assert [b["cls"] for b in back] == [b"0", b"1", b"0"]
    assert decode_image(back[0]["png"]).shape == (32, 32, 3)


def test_keys_reject_dots_and_slashes():
    assert check_key("abc_01-x") == "abc_01-x"
    for bad in ("a.b", "a/b", "", "x" * 91):
        with pytest.raises(ValueError):
            check_key(bad)


def test_index_text_needs_samples():
    with pytest.raises(ValueError):
        index_text([])


def test_verify_detects_tampering(tmp_path):
    prefix = str(tmp_path / "ds")
    with ShardWriter(f"{prefix}/train") as w:
        for s in _samples(4):
            w.write(s)
    m = mf.Manifest(dataset=prefix, kind="test", splits={"train": mf.SplitInfo(num_samples=4, shards=w.shards)})
    mf.save(m, prefix)
    assert verify_dataset(prefix) == []
    m.splits["train"].shards[0].classes = "1x4"
    mf.save(m, prefix)
    assert verify_dataset(prefix) == [f"{prefix}/train/shard-000000.tar: sample classes differ from the manifest's"]
    tar = Path(prefix) / "train" / "shard-000000.tar"
    with tarfile.open(tar, "a") as tf:  # append a stray member
        info = tarfile.TarInfo("extra.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    assert any("sha256" in p for p in verify_dataset(prefix))
    tar.write_bytes(tar.read_bytes()[:-512])  # truncated
    assert any("size" in p for p in verify_dataset(prefix))


def test_patient_leak_check():
    m = mf.Manifest(
        dataset="x",
        kind="wsi",
        inputs=[
            mf.InputRecord(id="a", kind="wsi", status="ingested", patient="p1", split="train"),
            mf.InputRecord(id="b", kind="wsi", status="ingested", patient="p1", split="val"),
        ],
    )
    with pytest.raises(ValueError, match="p1"):
        mf.check_patient_disjoint(m)
    brief = mf.ManifestBrief.model_validate_json(mf.dumps(m))  # what a training driver reads
    assert mf.patients_by_split(brief.inputs) == mf.patients_by_split(m.inputs) == {"train": {"p1"}, "val": {"p1"}}
    with pytest.raises(ValueError, match="p1"):
        mf.check_patient_disjoint(brief)


def test_a_dataset_version_is_the_same_grown_or_made_again(capsys):
    """A run records its manifest's sha256. A dataset that only grew since (--append, --retry-failed) lists that
    version among its amendments: training on it is still refused (other data than the run's first epochs), but
    evaluating on its held-out split is allowed (its patients kept their splits); one made again is refused for
    both."""
    from shards import manifest as mf
    from training.evaluation import check_own_dataset

    first = mf.Manifest(dataset="s3://b/d", kind="wsi")
    v1 = first.model_dump_json().encode()
    grown = first.model_copy(update={"amended": [mf.Amendment(time="t", added=2, previous_sha256=mf.sha256_of(v1))]})
    v2 = grown.model_dump_json().encode()
    twice = grown.model_copy(
        update={"amended": [*grown.amended, mf.Amendment(time="u", retried=1, previous_sha256=mf.sha256_of(v2))]}
    )
    v3 = twice.model_dump_json().encode()
    remade = mf.Manifest(dataset="s3://b/d", kind="wsi", created="later")
    v4 = remade.model_dump_json().encode()

    assert mf.change_since(None, grown, v2) is None and mf.change_since(mf.sha256_of(v2), grown, v2) is None
    assert mf.change_since(mf.sha256_of(v1), grown, v2) == "grown"
    assert mf.change_since(mf.sha256_of(v1), twice, v3) == "grown" == mf.change_since(mf.sha256_of(v2), twice, v3)
    assert mf.change_since(mf.sha256_of(v1), remade, v4) == "replaced"

    mf.check_same_data(mf.sha256_of(v2), "s3://b/d", grown, v2, "run r1")
    with pytest.raises(
        ValueError,
        match=r"s3://b/d was amended \(ingest --append, --retry-failed, --replace-changed or dataset --compact\) since",
    ):
        mf.check_same_data(mf.sha256_of(v1), "s3://b/d", grown, v2, "run r1")
    remade_message = r"s3://b/d was made again since run r1 started .*its first epochs did; start a new one"
    with pytest.raises(ValueError, match=remade_message):
        mf.check_same_data(mf.sha256_of(v1), "s3://b/d", remade, v4, "run r1")

    check_own_dataset(mf.sha256_of(v1), twice, v3, "s3://b/d", "test", "r1")
    assert "grew by 3 input(s) since run r1 trained on it" in capsys.readouterr().out
    check_own_dataset(mf.sha256_of(v2), twice, v3, "s3://b/d", "test", "r1")
    assert "grew by 1 input(s)" in capsys.readouterr().out
    merged = mf.Amendment(time="w", merged=4, merged_into=1, previous_sha256=mf.sha256_of(v3))
    compacted = twice.model_copy(update={"amended": [*twice.amended, merged]})
    check_own_dataset(mf.sha256_of(v3), compacted, compacted.model_dump_json().encode(), "s3://b/d", "test", "r1")
    assert "s3://b/d had 4 small shard(s) merged since run r1" in capsys.readouterr().out
    with pytest.raises(
        ValueError, match=r"test split may hold patients .* give --dataset s3://b/d \(metrics external_test_\*\)"
    ):
        check_own_dataset(mf.sha256_of(v1), remade, v4, "s3://b/d", "test", "r1")


def test_a_datasets_account_says_why_inputs_were_skipped_or_failed():
    """`tessera dataset` (and the ingest's summary) said "skipped 100, failed 0" and no more: the reasons, kept in
    the manifest, are now counted, commonest first, the rarest folded into one line."""
    from cluster.cli_dataset import dataset_lines
    from shards import manifest as mf

    def rec(i: int, status: str, reason: str | None) -> mf.InputRecord:
        return mf.InputRecord(id=f"i{i}", kind="image", status=status, reason=reason)

    skips = ["outside the slice folder 'brain'"] * 3 + ["not a slice image"] * 2
    failures = [f"unreadable: reason {k}" for k in range(7)]
    m = mf.Manifest(
        dataset="s3://b/d",
        kind="images",
        inputs=[rec(i, "skipped", r) for i, r in enumerate(skips)]
        + [rec(10 + i, "failed", r) for i, r in enumerate(failures)],
    )
    assert m.reasons("skipped") == ["3: outside the slice folder 'brain'", "2: not a slice image"]
    assert m.reasons("failed", most=5) == [f"1: unreadable: reason {k}" for k in range(5)] + ["2: 2 other reason(s)"]
    assert m.reasons("ingested") == []
    lines = dataset_lines(m, m.model_dump_json().encode())
    assert "rendered with: not recorded (made before Tessera recorded it)" in lines
    at = lines.index("inputs: ingested 0, skipped 5, failed 7")
    assert lines[at + 1 : at + 4] == [
        "  skipped 3: outside the slice folder 'brain'",
        "  skipped 2: not a slice image",
        "  failed 1: unreadable: reason 0",
    ]
    assert lines[-1] == "  failed 2: 2 other reason(s)"

    m.rendered_with = {"tessera": "images rendering 1", "numpy": "2.4.6"}
    m.amended = [mf.Amendment(time="t", added=2, rendered_with=m.rendered_with | {"numpy": "2.5.0"})]
    lines = dataset_lines(m, b"")
    assert "rendered with: tessera images rendering 1, numpy 2.4.6" in lines
    assert (
        lines[-1]
        == "  amended t: 2 added, 0 retried, 0 replaced (from version None, rendered otherwise: numpy 2.4.6 -> 2.5.0)"
    )
    m.amended = []
    m.config = {"background_model": "models:/bg/3", "background_model_sha256": "ab" * 32, "background_threshold": 0.5}
    m.inputs[0].background_dropped, m.inputs[1].background_dropped = 40, 2
    assert dataset_lines(m, b"")[-1] == (
        f"background model: models:/bg/3 (sha256 {'ab' * 8}), dropped 42 tiles at P(background) >= 0.5"
    )


def test_an_error_while_writing_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="source broke"), ShardWriter(str(tmp_path / "out")) as w:
        w.write(next(_samples(1)))
        raise RuntimeError("source broke")
    assert not [p for p in (tmp_path / "out").rglob("*")]  # the incomplete shard was discarded, not published
    assert not w._spool.exists()


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_concatenated_parts_equal_one_shard_written_sample_by_sample(tmp_path, monkeypatch, kernel_copy):
    if not kernel_copy:  # a file system without copy_file_range: read and write instead

        def unsupported(*args, **kwargs):
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", unsupported)
    samples = list(_samples(10))
    parts, runs = [], []
    for k, chunk in enumerate((samples[:3], samples[3:4], samples[4:])):
        with ShardWriter(str(tmp_path / f"part{k}"), target_bytes=1 << 30) as w:
            for s in chunk:
                w.write(s)
        idx = parse_index((tmp_path / f"part{k}" / "shard-000000.idx").read_text())
        parts.append((tmp_path / f"part{k}" / "shard-000000.tar", idx))
        runs.append(w.shards[0].classes)
    info = concat_shards(parts, str(tmp_path / "joined"), 7, " ".join(runs))
    tar = tmp_path / "joined" / "shard-000007.tar"
    assert info.name == tar.name and info.samples == 10 and info.size == tar.stat().st_size
    assert mf.decode_runs(info.classes) == [i % 2 for i in range(10)]
    assert hashlib.sha256(tar.read_bytes()).hexdigest() == info.sha256
    got = read_tar_samples(tar)
    assert [g["__key__"] for g in got] == [s["__key__"] for s in samples]
    assert all(g["png"] == s["png"] for g, s in zip(got, samples, strict=True))
    # The joined index is what DALI's own tool computes for the joined tar.
    ref = tmp_path / "ref.idx"
    wds2idx = Path(sys.executable).parent / "wds2idx"
    subprocess.run([str(wds2idx), str(tar), str(ref)], check=True, capture_output=True)
    assert (tmp_path / "joined" / "shard-000007.idx").read_text().strip() == ref.read_text().strip()
    with pytest.raises(ValueError, match="duplicate sample key"):
        concat_shards([parts[0], parts[0]], str(tmp_path / "dup"), 0)
    with open(parts[2][0], "r+b") as f:  # a part cut short after staging
        f.truncate(2048)
    with pytest.raises(ValueError, match=r"part .*part2/shard-000000.tar is shorter than its index says"):
        concat_shards(parts, str(tmp_path / "short"), 0)
    assert not (tmp_path / "short").exists() or not list((tmp_path / "short").glob("*.tar"))


def test_local_shards_are_published_by_rename_and_leave_no_spool(tmp_path, monkeypatch):
    """Built beside its destination, a shard is renamed into place: no second copy of its bytes."""
    import shutil

    def no_copy(*args, **kwargs):
        raise AssertionError("a local shard was copied, not renamed")

    monkeypatch.setattr(shutil, "copyfile", no_copy)
    with ShardWriter(str(tmp_path / "part"), target_bytes=20_000) as w:
        for s in _samples(12):
            w.write(s)
    part = tmp_path / "part" / "shard-000000.tar"
    info = concat_shards([(part, parse_index(part.with_suffix(".idx").read_text()))], str(tmp_path / "out"), 0)
    assert len(w.shards) > 1 and info.samples == w.shards[0].samples
    for folder in ("part", "out"):  # only published shards remain: the spool folders are gone
        assert all(p.suffix in (".tar", ".idx") for p in (tmp_path / folder).iterdir())


def test_a_shard_crossing_file_systems_is_copied(tmp_path, monkeypatch):
    import errno
    import os

    from shards import storage

    src = tmp_path / "built"
    src.write_bytes(b"tar bytes")
    real, calls = os.replace, []

    def cross_device_once(a, b):  # the rename from the spool to the destination crosses file systems
        calls.append(b)
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "cross-device")
        return real(a, b)  # put_file's own rename of its copy, within the destination's folder

    monkeypatch.setattr(os, "replace", cross_device_once)
    storage.move_file(src, str(tmp_path / "dest"))
    assert (tmp_path / "dest").read_bytes() == b"tar bytes" and not src.exists()


def test_unfiltered_png_decodes_exactly_with_pil_opencv_and_dali():
    import cv2
    from nvidia.dali import fn, pipeline_def, types

    rng = np.random.default_rng(1)
    rgb = np.zeros((37, 53, 3), np.uint8)  # odd sizes: no row padding assumed
    rgb[5:30, 8:40] = rng.integers(0, 256, (25, 32, 3), dtype=np.uint8)
    rgb[..., 2] = 255  # saturated, as a window clips
    data = encode_image(rgb, "png", flat=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert np.array_equal(decode_image(data), rgb)  # PIL, which checks every chunk's CRC
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1], rgb)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        raw = fn.external_source(source=lambda: [np.frombuffer(data, np.uint8)], batch=True)
        return fn.decoders.image(raw, device="cpu", output_type=types.RGB)

    pipe = decode()
    pipe.build()
    (out,) = pipe.run()
    assert np.array_equal(np.asarray(out.as_tensor())[0], rgb)


def test_jpeg_is_opencvs_encoding_from_rgb_of_any_layout():
    import cv2

    rgb = np.random.default_rng(2).integers(0, 256, (64, 90, 3), dtype=np.uint8)
    for view in (rgb, rgb[::2, 1::2]):  # a strided view is made contiguous first
        ref = cv2.imencode(".jpg", np.ascontiguousarray(view[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])[1]
        assert encode_image(view, "jpg", 85) == ref.tobytes()
    with pytest.raises(ValueError, match="unknown image format 'gif'"):
        encode_image(rgb, "gif")


def test_shards_are_byte_for_byte_what_tarfile_writes(tmp_path):

    for name, size in [("a.jpg", 0), ("slide_x0000_y0600.json", 511), ("k" * 99, 512), ("d" * 60 + "/" + "k" * 60, 9)]:
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o644
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT)
    samples = list(_samples(5))
    with ShardWriter(str(tmp_path / "ours")) as w:
        for sample in samples:
            w.write(sample)
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for sample in samples:
            for ext in sorted(k for k in sample if not k.startswith("__")):
                data = to_bytes(sample[ext])
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size, info.mode = len(data), 0o644
                tf.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours" / w.shards[0].name).read_bytes() == ref.getvalue()


def test_a_files_stamp_is_the_same_listed_or_stat_ed_and_changes_when_it_is_rewritten(tmp_path):
    from shards import storage

    (tmp_path / "a").mkdir()
    files = [tmp_path / "a" / "x.svs", tmp_path / "y.svs"]
    for f in files:
        f.write_bytes(b"slide" * 10)
    assert dict(storage.list_stamps(str(tmp_path))) == {str(f): storage.stat_stamp(str(f)) for f in files}
    before = storage.stat_stamp(str(files[0]))
    os.utime(files[0], ns=(10**18, 10**18))  # the same size, written again later
    assert storage.stat_stamp(str(files[0])) != before
    assert storage.stat_stamp(str(tmp_path / "gone.svs")) is None


def test_a_manifests_reasons_name_no_path():
    """An error's message names the file it failed on, and a folder may name the patient: an image deleted after it
    was listed failed with `No such file or directory: '/data/DOE_JOHN_1960/t000.png'` in the manifest."""
    from shards import manifest as mf

    cases = {
        "FileNotFoundError: [Errno 2] No such file or directory: '/data/DOE_JOHN_1960/t000.png'": (
            "FileNotFoundError: [Errno 2] No such file or directory: '…'"
        ),
        "StorageError: s3://raw/DOE_JOHN/a.svs: EndpointConnectionError: Could not connect to the endpoint URL: "
        '"http://127.0.0.1:9900/raw/DOE_JOHN/a.svs" (after 3 attempts)': (
            "StorageError: s3://raw/…: EndpointConnectionError: Could not connect to the endpoint URL: "
            '"http://127.0.0.1:9900/…" (after 3 attempts)'
        ),
        "cannot identify image file '/data/DOE JOHN/scan 1.png'": "cannot identify image file '…'",
        "boxes: YOLO file ~/DOE/b.txt line 3": "boxes: YOLO file … line 3",
        "SlideError: read failed at (12, 40) level 2: and/or 1/2 on 2026/12/03": (
            "SlideError: read failed at (12, 40) level 2: and/or 1/2 on 2026/12/03"
        ),
        "not a whole-slide DICOM (SOP class 1.2.840.10008.5.1.4.1.1.77.1.6)": (
            "not a whole-slide DICOM (SOP class 1.2.840.10008.5.1.4.1.1.77.1.6)"
        ),
    }
    for said, kept in cases.items():
        assert mf.without_paths(said) == kept
    rec = mf.InputRecord(id="a", kind="image", status="failed", reason=next(iter(cases)), warnings=[next(iter(cases))])
    assert "DOE" not in rec.reason and "DOE" not in rec.warnings[0]
    assert "DOE" not in mf.RECORD.validate_json(mf.RECORD.dump_json(rec)).reason


def test_a_manifest_says_what_of_a_split_no_sample_stands_for():
    """What a competition would find missing from a submission of a split: its inputs that failed or made no
    sample, and the slices left out of its series; other splits' and the inputs never assigned one not counted, nor
    a slide's tiles left out (its other tiles call it)."""
    from shards import manifest as mf

    def rec(i, status, split, left_out=0):
        return mf.InputRecord(id=str(i), kind="dicom", status=status, split=split, left_out=left_out)

    inputs = [rec(1, "ingested", "test", 2), rec(2, "ingested", "test", 1), rec(3, "failed", "test")]
    inputs += [rec(4, "skipped", "test"), rec(5, "failed", "train"), rec(6, "ingested", "train", 4)]
    inputs += [rec(7, "skipped", None)]  # not in the label table: no split
    manifest = mf.Manifest(dataset="d", kind="dicom", classes=[], splits={}, inputs=inputs, config={})
    said = manifest.not_called("test")
    assert (
        said
        == "2 input(s) that failed or made no sample and 3 slice(s) that could not be read, left out of their series"
    )
    assert manifest.not_called("train") == (
        "1 input(s) that failed or made no sample and 4 slice(s) that could not be read, left out of their series"
    )
    assert manifest.not_called("val") is None
    slides = [mf.InputRecord(id="s", kind="wsi", status="ingested", split="test", left_out=3)]  # damaged tiles
    assert mf.Manifest(dataset="d", kind="wsi", classes=[], inputs=slides, config={}).not_called("test") is None
    assert b"left_out" not in mf.RECORD.dump_json(rec(8, "ingested", "test"), exclude_defaults=True)  # stored if any


def test_a_prefix_without_a_manifest_is_no_dataset_and_says_why(tmp_path):
    from shards import storage

    with pytest.raises(storage.Missing, match=r"/none: no dataset there: no manifest.json, .*no ingest has completed"):
        mf.load(str(tmp_path / "none"))
    # an ingest that has staged work but not written its manifest yet (running, or stopped: run it again)
    (tmp_path / "half" / "_staging" / "parts").mkdir(parents=True)
    (tmp_path / "half" / "_staging" / "parts" / "a.tar").write_bytes(b"x")
    with pytest.raises(storage.Missing, match=r"/half: no dataset there: .*an ingest into it is running, or stopped"):
        mf.load_with_bytes(str(tmp_path / "half"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / mf.MANIFEST_NAME).write_text("{")  # there but unreadable: not called missing
    with pytest.raises(ValueError) as exc:
        mf.load(str(tmp_path / "bad"))
    assert not isinstance(exc.value, storage.Missing)


def test_a_datasets_account_says_what_options_shaped_it():
    """What another dataset must match for a model of this one: tiles, resolution, encoding, split."""
    from cluster.cli_dataset import dataset_lines
    from ingest.config import DicomIngestConfig, WsiIngestConfig
    from shards import manifest as mf

    wsi = WsiIngestConfig(sources=["x"], out="s3://b/d", tile_size=512, store_size=256, mpp=0.5, workers=4)
    m = mf.Manifest(dataset="s3://b/d", kind="wsi", config=wsi.public())
    assert dataset_lines(m, b"")[1] == (
        "made with: split=train=0.7,val=0.15,test=0.15 seed=0 split_balance=overall format=jpg quality=90 "
        "tile_size=512 store_size=256 mpp=0.5 tissue_threshold=0.3 color_profile=ignore region_tiles=256"
    )  # not its place, workers or shard size; not the options left unset
    ct = DicomIngestConfig(sources=["x"], out="s3://b/ct", split="train=1.0")
    line = dataset_lines(mf.Manifest(dataset="s3://b/ct", kind="dicom", config=ct.public()), b"")[1]
    assert "windows=brain,subdural,soft" in line and "mode=slice" in line and "frames" not in line
    series = DicomIngestConfig(sources=["x"], out="s3://b/ct", mode="series", frames=8).public()
    line = dataset_lines(mf.Manifest(dataset="d", kind="dicom", config=series), b"")[1]
    assert "mode=series neighbours=0 frames=8" in line


def test_a_manifest_is_stored_with_its_inputs_last_one_line_each_and_reads_back_whole_or_without_them(tmp_path):
    shard = mf.ShardInfo(name="shard-000000.tar", size=10, sha256="0" * 64, samples=3, classes="0x2 1x1")
    m = mf.Manifest(
        dataset=str(tmp_path),
        kind="images",
        classes=["a", "b"],
        splits={"train": mf.SplitInfo(num_samples=3, shards=[shard])},
        amended=[mf.Amendment(time="t", added=1, previous_sha256="f" * 64)],
        inputs=[
            mf.InputRecord(id="1", kind="image", status="ingested", label=0, split="train", samples=2, shards=["x"]),
            mf.InputRecord(id="2", kind="image", status="failed", reason="unreadable", warnings=["w"]),
            mf.InputRecord(id="3", kind="image", status="ingested", label=1, split="train", samples=1, shards=["x"]),
        ],
    )
    url = mf.save(m, str(tmp_path))
    text = Path(url).read_text()
    lines = text.splitlines()
    first = lines.index('  "inputs": [')
    assert lines[first + 1 : first + 4] == [
        '    {"id":"1","kind":"image","status":"ingested","label":0,"split":"train","samples":2,"shards":["x"]},',
        '    {"id":"2","kind":"image","status":"failed","reason":"unreadable","warnings":["w"]},',
        '    {"id":"3","kind":"image","status":"ingested","label":1,"split":"train","samples":1,"shards":["x"]}',
    ]
    assert lines[first + 4 :] == ["  ]", "}"]
    loaded, data = mf.load_with_bytes(str(tmp_path))
    assert loaded == m and data == text.encode() and json.loads(data)["inputs"][1]["reason"] == "unreadable"
    head, same = mf.load_head(str(tmp_path))
    assert same == data and head.model_dump() == m.model_dump(exclude={"inputs"})
    assert head.sample_classes("train") == [0, 0, 1] and head.num_samples("train") == 3
    brief, same = mf.load_brief(str(tmp_path))  # a training driver's: the head and a brief of each record
    assert same == data and brief.model_dump(exclude={"inputs"}) == head.model_dump()
    fields = {"status", "split", "patient", "label", "site"}
    assert [asdict(b) for b in brief.inputs] == [{k: v for k, v in asdict(r).items() if k in fields} for r in m.inputs]
    # a manifest written before (the whole of it indented) reads the same, whole or not
    Path(url).write_text(m.model_dump_json(indent=2))
    assert mf.load(str(tmp_path)) == m and mf.load_head(str(tmp_path))[0] == head
    empty = mf.Manifest(dataset="e", kind="wsi")
    assert mf.Manifest.model_validate_json(mf.dumps(empty)) == empty


def test_a_manifests_records_read_in_pieces_are_those_read_at_once(tmp_path, monkeypatch):
    """Records are parsed a few MB at a time (``shards.manifest_json``), each piece ending at a line's end:
    whatever the piece size, the records are those of one parse, strings with brackets and commas included."""
    from shards import manifest_json

    odd = "unreadable: [truncated], at 2,048 bytes\n  ]"  # what a reason may hold
    records = [
        mf.InputRecord(id=f"{i:04d}", kind="image", status="failed" if i % 7 == 0 else "ingested", reason=odd)
        if i % 7 == 0
        else mf.InputRecord(id=f"{i:04d}", kind="image", status="ingested", split="train", shards=["train/s.tar"])
        for i in range(50)
    ]
    whole = mf.Manifest(dataset=str(tmp_path), kind="images", inputs=records)
    mf.save(whole, str(tmp_path))
    for piece in (1, 200, 1 << 20):
        monkeypatch.setattr(manifest_json, "PIECE", piece)
        assert mf.load(str(tmp_path)) == whole
        brief, _ = mf.load_brief(str(tmp_path))
        assert [(b.status, b.split) for b in brief.inputs] == [(r.status, r.split) for r in records]
    empty = mf.Manifest(dataset="e", kind="wsi")
    mf.save(empty, str(tmp_path))
    assert mf.load(str(tmp_path)) == empty and mf.load_brief(str(tmp_path))[0].inputs == []
    # a manifest written before (its records indented over several lines) is read at once, not cut in pieces
    (tmp_path / mf.MANIFEST_NAME).write_text(whole.model_dump_json(indent=2))
    monkeypatch.setattr(manifest_json, "PIECE", 200)
    assert mf.load(str(tmp_path)) == whole and len(mf.load_brief(str(tmp_path))[0].inputs) == 50


def test_a_manifest_read_whole_holds_a_record_in_under_600_bytes():
    """A dataset of a million images has a million records, all held by an ingest that amends it and by `tessera
    dataset`: as pydantic models they took about 1.6 KB each (a dict and a set of the fields given beside the
    values), as slotted dataclasses about 0.48 KB."""
    import gc
    import tracemalloc

    n = 20_000
    records = [
        mf.InputRecord(
            id=f"{i:016x}",
            kind="image",
            status="ingested",
            item=f"{i ^ 0x5A5A:016x}",
            patient=f"{i // 3:016x}",
            label=i % 4,
            split="train",
            samples=1,
            shards=[f"train/shard-{i // 5000:06d}.tar"],
            fingerprint=f"{i * 7:016x}",
        )
        for i in range(n)
    ]
    data = mf.dumps(mf.Manifest(dataset="d", kind="images", inputs=records))
    del records
    gc.collect()
    tracemalloc.start()
    try:
        m = mf.Manifest.model_validate_json(data)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(m.inputs) == n and m.inputs[5].shards == ["train/shard-000000.tar"]
    assert held / n < 600, f"{held / n:.0f} bytes a record"


def test_local_files_are_deleted_one_by_one_absent_ones_too(tmp_path):
    from shards import storage

    (tmp_path / "a").write_text("a")
    (tmp_path / "b").write_text("b")
    storage.delete_many([str(tmp_path / "a"), str(tmp_path / "gone"), f"file://{tmp_path / 'b'}"])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(storage.StorageError, match=str(tmp_path)):
        storage.delete_many([str(tmp_path)])  # a folder is no file


def test_verify_names_each_bad_shard_in_the_manifests_order(tmp_path, monkeypatch):
    """Shards are checked several at a time (streamed, never read whole into memory); the problems come back in
    the manifest's order, a missing shard among them."""
    import shards.verify as verify

    monkeypatch.setattr(verify, "SHARDS_AT_ONCE", 3)
    prefix = str(tmp_path / "ds")
    with ShardWriter(f"{prefix}/train", target_bytes=1) as w:  # a shard per sample
        for s in _samples(5):
            w.write(s)
    m = mf.Manifest(dataset=prefix, kind="test", splits={"train": mf.SplitInfo(num_samples=5, shards=w.shards)})
    mf.save(m, prefix)
    assert len(w.shards) == 5 and verify_dataset(prefix) == []
    shard = [Path(prefix) / "train" / s.name for s in w.shards]
    shard[3].write_bytes(shard[3].read_bytes()[:-512])
    shard[1].unlink()
    m.splits["train"].num_samples = 6
    mf.save(m, prefix)
    problems = verify_dataset(prefix)
    assert [p.split(": ")[0] for p in problems] == [str(shard[1]), str(shard[3]), str(shard[3]), "train"]
    assert "missing" in problems[0] and "size" in problems[1] and "sha256" in problems[2]
    assert problems[3] == "train: shard sample counts do not add up to 6"
