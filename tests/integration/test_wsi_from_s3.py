"""Slides on the object store: ingested like local ones, each downloaded to a worker's disk only while needed."""

import glob
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest

from ingest.compact import compact
from ingest.runner import run_ingest
from ingest.synthetic import SyntheticPatient, make_slides, slide_array, write_dicom_wsi
from ingest.synthetic_vendor import write_mirax, write_vms, write_vmu
from shards import storage
from shards.verify import verify_dataset
from shards.writer import read_tar_samples
from tests.integration.commands import wsi_config


def _samples(manifest, prefix: str, tmp: Path) -> dict[str, bytes]:
    out = {}
    for split in manifest.splits:
        for url in manifest.shard_urls(prefix, split):
            for s in read_tar_samples(storage.get_file(url, tmp / "x.tar")):
                out[s["__key__"]] = s["jpg"]
    return out


def _moved(out: str) -> tuple[int, int]:
    """Files and bytes the run's workers said they downloaded (its ``object store:`` line)."""
    found = re.search(r"object store: the workers downloaded (\d+) file\(s\), ([\d.]+) (GB|MB|kB|B) and uploaded", out)
    assert found, out
    return int(found[1]), int(float(found[2]) * {"GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1}[found[3]])


def test_slides_from_s3_give_the_same_samples_as_local_files(stack, tmp_path, capsys):
    paths, _ = make_slides(tmp_path / "slides", n=3, size=1024, seed=11)
    for p in paths:
        storage.put_file(p, f"s3://shards/src-slides/{p.name}")
    leftovers = set(glob.glob(os.path.join(tempfile.gettempdir(), "tessera-src-*")))
    # Several regions per slide and two workers: a slide's regions stay with the worker that planned it, and at
    # the run's end the last slide's go to both (ingest.dispatch), each downloading it once. One split: with a
    # split by patient the replaced slide below could be alone in its split (the pseudonym key, so the
    # assignment, is the session's), and then its replacement leaves no small shards to compact.
    options = {"region_tiles": 3, "workers": 2, "split": "train=1.0"}
    capsys.readouterr()
    local, _ = run_ingest("wsi", wsi_config(tmp_path / "slides", "s3://shards/wsi-local", **options))
    local_moved = _moved(capsys.readouterr().out)  # the parts packed into shards, downloaded
    remote, _ = run_ingest("wsi", wsi_config("s3://shards/src-slides/", "s3://shards/wsi-remote", **options))
    remote_moved = _moved(capsys.readouterr().out)
    # and each slide, once, or twice where its regions went to both workers at the end
    assert local_moved[0] + 3 <= remote_moved[0] <= local_moved[0] + 6
    assert remote_moved[1] - local_moved[1] >= 0.9 * sum(p.stat().st_size for p in paths)
    assert [r.status for r in remote.inputs] == ["ingested"] * 3
    assert sum(r.samples for r in remote.inputs) == sum(r.samples for r in local.inputs) > 6
    assert _samples(remote, "s3://shards/wsi-remote", tmp_path) == _samples(local, "s3://shards/wsi-local", tmp_path)
    # the workers deleted their copies when the run ended
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "tessera-src-*"))) <= leftovers
    # an object replaced in place (another ETag in the listing) is a difference from the dataset made of it;
    # --replace-changed ingests it again, and the dataset then holds what one made from today's objects holds
    storage.put_file(paths[1], f"s3://shards/src-slides/{paths[0].name}")
    with pytest.raises(ValueError, match=r"1 input\(s\) whose files changed since it was made"):
        run_ingest("wsi", wsi_config("s3://shards/src-slides/", "s3://shards/wsi-remote", **options))
    cfg = wsi_config("s3://shards/src-slides/", "s3://shards/wsi-remote", replace_changed=True, **options)
    replaced, _ = run_ingest("wsi", cfg)
    assert replaced.amended[-1].replaced == 1 and verify_dataset("s3://shards/wsi-remote") == []
    fresh, _ = run_ingest("wsi", wsi_config("s3://shards/src-slides/", "s3://shards/wsi-fresh", **options))
    assert _samples(replaced, "s3://shards/wsi-remote", tmp_path) == _samples(fresh, "s3://shards/wsi-fresh", tmp_path)
    # the replacement left small shards beside the dataset's: compacting on S3 joins them, the samples the same
    compacted, groups = compact("s3://shards/wsi-remote")
    assert groups and sum(len(i.shards) for i in compacted.splits.values()) < sum(
        len(i.shards) for i in replaced.splits.values()
    )
    assert verify_dataset("s3://shards/wsi-remote") == [] and compacted.amended[-1].merged > 1
    assert _samples(compacted, "s3://shards/wsi-remote", tmp_path) == _samples(fresh, "s3://shards/wsi-fresh", tmp_path)
    listed = {u for split in compacted.splits for u in compacted.shard_urls("s3://shards/wsi-remote", split)}
    assert {u for u in storage.list_urls("s3://shards/wsi-remote/") if u.endswith(".tar")} == listed


def test_dicom_wsi_from_s3_is_one_slide_read_with_all_its_files(stack, tmp_path):
    rng = np.random.default_rng(5)
    patient = SyntheticPatient("DOE^JOHN", "MRN4242", "19700101")
    write_dicom_wsi(tmp_path / "dwsi" / "clot_7", slide_array(768, "CE", rng), patient)
    for p in (tmp_path / "dwsi").rglob("*.dcm"):
        storage.put_file(p, f"s3://shards/src-dwsi/clot_7/{p.name}")
    options = {"tile_size": 128, "split": "train=1.0", "workers": 2, "region_tiles": 4}
    local, _ = run_ingest("wsi", wsi_config(tmp_path / "dwsi", "s3://shards/dwsi-local", **options))
    remote, _ = run_ingest("wsi", wsi_config("s3://shards/src-dwsi/", "s3://shards/dwsi-remote", **options))
    # four files (three levels and the label), one slide, every tile once
    assert [r.status for r in remote.inputs] == ["ingested"]
    assert remote.inputs[0].samples == local.inputs[0].samples > 5
    assert _samples(remote, "s3://shards/dwsi-remote", tmp_path) == _samples(local, "s3://shards/dwsi-local", tmp_path)


def test_mirax_from_s3_is_one_slide_downloaded_with_its_data_folder(stack, tmp_path):
    patient = SyntheticPatient("DOE^JANE", "MRN5151", "19800202")
    write_mirax(tmp_path / "mrx" / "clot_9.mrxs", slide_array(700, "LAA", np.random.default_rng(8)), patient)
    for p in (tmp_path / "mrx").rglob("*"):
        if p.is_file():
            storage.put_file(p, f"s3://shards/src-mrx/{p.relative_to(tmp_path / 'mrx').as_posix()}")
    options = {"tile_size": 128, "split": "train=1.0", "workers": 2, "region_tiles": 4}
    local, _ = run_ingest("wsi", wsi_config(tmp_path / "mrx", "s3://shards/mrx-local", **options))
    remote, _ = run_ingest("wsi", wsi_config("s3://shards/src-mrx/", "s3://shards/mrx-remote", **options))
    # the .mrxs and the three files of its folder: one slide, every tile once, nothing skipped
    assert [(r.status, r.samples > 5) for r in remote.inputs] == [("ingested", True)]
    assert remote.inputs[0].samples == local.inputs[0].samples
    assert _samples(remote, "s3://shards/mrx-remote", tmp_path) == _samples(local, "s3://shards/mrx-local", tmp_path)
    alone, _ = run_ingest("wsi", wsi_config("s3://shards/src-mrx/clot_9.mrxs", "s3://shards/mrx-alone", **options))
    assert _samples(alone, "s3://shards/mrx-alone", tmp_path) == _samples(local, "s3://shards/mrx-local", tmp_path)
    # its folder's files stamped by HEAD here, by the listing before: the same fingerprint
    assert alone.inputs[0].fingerprint == remote.inputs[0].fingerprint


@pytest.mark.parametrize("ext", ["vms", "vmu"])
def test_hamamatsu_from_s3_is_downloaded_with_the_images_its_key_file_names(stack, tmp_path, ext):
    """VMS (JPEG) and VMU (NGR): the key file is the slide; the files it names come down with it."""
    (tmp_path / ext).mkdir()
    patient = SyntheticPatient("ROE^JANE", "MRN6161", "19810303")
    write = write_vms if ext == "vms" else write_vmu
    write(tmp_path / ext / f"clot_5.{ext}", slide_array(700, "CE", np.random.default_rng(3)), patient)
    for p in (tmp_path / ext).iterdir():
        storage.put_file(p, f"s3://shards/src-{ext}/{p.name}")
    options = {"tile_size": 128, "split": "train=1.0", "workers": 2, "region_tiles": 4}
    local, _ = run_ingest("wsi", wsi_config(tmp_path / ext, f"s3://shards/{ext}-local", **options))
    remote_src = f"s3://shards/src-{ext}/clot_5.{ext}"
    remote, _ = run_ingest("wsi", wsi_config(remote_src, f"s3://shards/{ext}-remote", **options))
    assert [(r.status, r.samples > 5) for r in remote.inputs] == [("ingested", True)]
    remote_samples = _samples(remote, f"s3://shards/{ext}-remote", tmp_path)
    assert remote_samples == _samples(local, f"s3://shards/{ext}-local", tmp_path)


def test_a_slide_deleted_from_s3_after_it_was_listed_fails_at_once_for_what_it_is(stack, tmp_path):
    """Listed by the driver, deleted before a worker reads it: the store answers that it is not there, which no
    retry changes (it was tried three times, the store asked whether it was down, then failed with boto3's error)."""
    from ingest.config import pseudonym_key
    from ingest.plan import make_plan
    from ingest.staging import attempt
    from ingest.units import plan_unit

    paths, _ = make_slides(tmp_path / "slides", n=1, size=512, seed=12)
    url = f"s3://shards/gone-slides/{paths[0].name}"
    storage.put_file(paths[0], url)
    cfg = wsi_config("s3://shards/gone-slides/", "s3://shards/wsi-gone", split="train=1.0")
    plan = make_plan("wsi", cfg, pseudonym_key())
    storage.delete(url)
    tried = []
    result, action, reason = attempt(lambda: tried.append(1) or plan_unit(plan.units[0], cfg), cfg)
    assert (result, action, len(tried)) == (None, "failed", 1)
    assert reason == "Missing: not in the store: deleted (or its bucket) since it was listed"
