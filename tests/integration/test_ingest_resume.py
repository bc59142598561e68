"""Crash and resume: a re-run completes with every expected sample exactly once; bad inputs are recorded."""

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from ingest.config import WsiIngestConfig
from ingest.lock import DatasetBusy, DatasetLock, holder
from ingest.plan import plan_wsi
from ingest.rendering import rendered_with
from ingest.runner import run_ingest
from ingest.staging import STAGING, part_url, process_work
from ingest.synthetic import make_slides
from ingest.units import plan_unit
from shards import manifest as mf
from shards import provenance, scratch, storage
from shards.verify import verify_dataset
from shards.writer import read_tar_samples
from tests.integration.commands import ingest_wsi_cmd, wsi_config


def _keys(prefix, manifest, tmp):
    keys = []
    for split in manifest.splits:
        for url in manifest.shard_urls(prefix, split):
            keys += [s["__key__"] for s in read_tar_samples(storage.get_file(url, Path(tmp) / "x.tar"))]
    return keys


def test_kill_and_resume_gives_exactly_the_expected_samples(stack, tmp_path):
    slides = tmp_path / "slides"
    make_slides(slides, n=4, size=1024, seed=3)
    (slides / "notes.svs").write_text("not a slide")  # wrong content for its extension
    # region_tiles=8 cuts each slide into several regions, so the crash lands between regions of a slide
    clean_url, crash_url = "s3://shards/resume/clean", "s3://shards/resume/crashed"
    clean, _ = run_ingest("wsi", wsi_config(slides, clean_url, region_tiles=8))

    # The "crashed" run: two units finished and staged, a third half-uploaded, then the process died.
    cfg = wsi_config(slides, crash_url, region_tiles=8)
    from ingest.config import pseudonym_key

    units = plan_wsi(cfg, pseudonym_key()).units
    works = [w for u in units[:3] for w in plan_unit(u, cfg)[0]]
    for work in works[:3]:
        assert process_work(work, cfg).status == "ingested"
    storage.put_bytes(part_url(crash_url, works[3].id), b"partial garbage")
    storage.put_bytes(storage.join(crash_url, "train", "shard-000000.tar"), b"stale shard from the crash")
    resumed, _ = run_ingest("wsi", cfg)

    assert not list(storage.list_urls(storage.join(crash_url, STAGING)))
    keys = _keys(crash_url, resumed, tmp_path)
    assert Counter(keys).most_common(1)[0][1] == 1  # no duplicates
    assert sorted(keys) == sorted(_keys(clean_url, clean, tmp_path))
    assert {r.id: r.samples for r in resumed.inputs} == {r.id: r.samples for r in clean.inputs}


def test_bad_inputs_are_recorded_with_a_reason_and_the_run_goes_on(stack, tmp_path, capsys):
    slides = tmp_path / "slides"
    paths, _ = make_slides(slides, n=3, size=1024, seed=4)
    whole = paths[2].read_bytes()
    paths[2].write_bytes(whole[: len(whole) * 2 // 3])  # a slide cut short, as by an interrupted copy
    (slides / "notes.svs").write_text("not a slide")  # a slide extension, other content
    (slides / "readme.txt").write_text("hello")  # not a slide file at all
    cfg = WsiIngestConfig(sources=[str(slides)], out="s3://shards/bad/x", tile_size=128, split="train=1.0")
    manifest, _ = run_ingest("wsi", cfg)
    by_status = {}
    for rec in manifest.inputs:
        by_status.setdefault(rec.status, []).append(rec.reason)
    assert len(manifest.inputs) == 5  # every file under SRC is accounted for
    assert len(by_status["ingested"]) == 2
    assert by_status["skipped"] == ["not a slide file (extension .txt)"]
    assert len(by_status["failed"]) == 2 and all("SlideError" in r for r in by_status["failed"])
    for reasons in by_status.values():
        assert not any(r and ("slides" in r or "notes" in r or "readme" in r) for r in reasons)
    assert mf.load("s3://shards/bad/x").splits["train"].num_samples > 0
    capsys.readouterr()
    assert run_ingest("wsi", cfg)[0] == manifest  # the same command again: nothing to do, and it says how to retry
    assert "nothing to do (2 of its inputs failed: --retry-failed ingests them again)" in capsys.readouterr().out

    # The cut-short slide copied again whole: --retry-failed ingests the failed inputs alone, adding their shards.
    # A first attempt crashed after staging one region and leaving a half-written shard: the retry resumes it.
    paths[2].write_bytes(whole)
    from ingest.config import pseudonym_key

    plan = plan_wsi(cfg, pseudonym_key())
    unit = next(u for u in plan.units if plan.private[u.id] == str(paths[2]))
    assert process_work(plan_unit(unit, cfg)[0][0], cfg).status == "ingested"
    storage.put_bytes(storage.join("s3://shards/bad/x", "train", "shard-000001.tar"), b"crashed mid-write")
    retried, _ = run_ingest("wsi", cfg.model_copy(update={"retry_failed": True}))
    assert retried.counts() == {"ingested": 3, "skipped": 1, "failed": 1} and retried.created == manifest.created
    before, after = manifest.splits["train"].shards, retried.splits["train"].shards
    assert after[: len(before)] == before and len(after) > len(before)  # the dataset's own shards stay as they were
    fixed = next(r for r in retried.inputs if r.status == "ingested" and r not in manifest.inputs)
    assert fixed.samples > 0 and set(fixed.shards) == {f"train/{s.name}" for s in after[len(before) :]}
    assert verify_dataset("s3://shards/bad/x") == []  # sizes, sha256, counts and classes of every shard
    keys = _keys("s3://shards/bad/x", retried, tmp_path)
    assert len(keys) == len(set(keys)) == retried.splits["train"].num_samples == sum(r.samples for r in retried.inputs)
    assert not list(storage.list_urls(storage.join("s3://shards/bad/x", STAGING)))
    again, _ = run_ingest("wsi", cfg.model_copy(update={"retry_failed": True}))  # the non-slide fails again
    assert again.splits == retried.splits and again.counts() == retried.counts()
    assert [a.retried for a in again.amended] == [2, 1]  # both failed inputs tried, then the one still failing


def test_kill_9_of_the_cli_then_the_same_command_completes(stack, tmp_path):
    slides = tmp_path / "slides"
    make_slides(slides, n=3, size=1024, seed=5)
    out = "s3://shards/kill9/run"
    proc = subprocess.Popen(
        ingest_wsi_cmd(slides, out, "--region-tiles", "4", "--workers", "1"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staging = storage.join(out, STAGING)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if sum(u.endswith(".json") for u in storage.list_urls(staging)) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    with pytest.raises(DatasetBusy, match=rf"another ingest is writing to this dataset: ingest wsi \(pid {proc.pid} "):
        DatasetLock(out, "ingest wsi").acquire()  # a second run while it works is refused, naming it
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    staged_before = {u for u in storage.list_urls(staging) if u.endswith(".json")}
    assert staged_before and not storage.exists(storage.join(out, "manifest.json"))

    rerun = subprocess.run(
        ingest_wsi_cmd(slides, out, "--region-tiles", "4", "--workers", "1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"took over the lock of a run that stopped: ingest wsi (pid {proc.pid} " in rerun.stdout
    assert holder(out) is None  # released once the run was done
    resumed = mf.load(out)
    clean, _ = run_ingest("wsi", wsi_config(slides, "s3://shards/kill9/clean", region_tiles=4))
    keys = _keys(out, resumed, tmp_path)
    assert len(keys) == len(set(keys)) == sum(s.num_samples for s in clean.splits.values())
    assert sorted(keys) == sorted(_keys("s3://shards/kill9/clean", clean, tmp_path))


def test_a_killed_ingest_worker_is_restarted_and_its_work_retried(stack, tmp_path):
    from ray.util.state import list_actors

    slides = tmp_path / "slides"
    make_slides(slides, n=4, size=2048, seed=6)
    cfg = wsi_config(slides, "s3://shards/killworker/x", region_tiles=2, workers=2)
    result = {}
    thread = threading.Thread(target=lambda: result.update(m=run_ingest("wsi", cfg)[0]))
    thread.start()
    victim = None
    deadline = time.monotonic() + 60
    while victim is None and time.monotonic() < deadline:
        alive = list_actors(filters=[("class_name", "=", "IngestWorker"), ("state", "=", "ALIVE")])
        victim = next((a.pid for a in alive if a.pid), None)
        time.sleep(0.3)
    assert victim, "no ingest worker came up"
    staging = storage.join(cfg.out, STAGING)
    while time.monotonic() < deadline and sum(u.endswith(".json") for u in storage.list_urls(staging)) < 2:
        time.sleep(0.1)  # kill it in the middle of its work, not before or after
    assert thread.is_alive(), "the run finished before the worker could be killed"
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=300)
    manifest = result["m"]
    assert all(r.status == "ingested" for r in manifest.inputs)
    keys = _keys("s3://shards/killworker/x", manifest, tmp_path)
    assert len(keys) == len(set(keys)) == sum(r.samples for r in manifest.inputs)
    actors = list_actors(filters=[("class_name", "=", "IngestWorker")], detail=True, limit=1000)
    assert any(int(a.num_restarts) >= 1 for a in actors)  # Ray restarted the killed actor and retried its call
    # The shard it was writing for S3 (its spool) was deleted by the worker that took over.
    assert not list(Path(tempfile.gettempdir()).glob(f"{scratch.PREFIX}{victim}-*"))


def test_resuming_with_other_options_is_refused(stack, tmp_path):
    slides = tmp_path / "slides"
    make_slides(slides, n=2, size=1024, seed=8)
    out = "s3://shards/resume/options"
    cfg = WsiIngestConfig(sources=[str(slides)], out=out, tile_size=128, split="train=1.0")
    from ingest.config import pseudonym_key
    from ingest.staging import done_records

    unit = plan_wsi(cfg, pseudonym_key()).units[0]
    done_records(cfg)  # an interrupted run started here...
    process_work(plan_unit(unit, cfg)[0][0], cfg)
    other = cfg.model_copy(update={"tile_size": 256})
    import pytest

    with pytest.raises(ValueError, match="other options"):
        run_ingest("wsi", other)
    manifest, _ = run_ingest("wsi", cfg)  # ...and the same options resume it
    assert all(r.status == "ingested" for r in manifest.inputs)
    # Complete now: the same command does nothing (on any number of workers); other options would replace the
    # dataset, so they are refused until asked for.
    again, _ = run_ingest("wsi", cfg.model_copy(update={"workers": 1}))
    assert again.created == manifest.created and again.inputs == manifest.inputs
    with pytest.raises(ValueError, match=r"already holds a complete dataset .* options tile_size 128 -> 256"):
        run_ingest("wsi", other)
    replaced, _ = run_ingest("wsi", other.model_copy(update={"overwrite": True}))
    assert replaced.config["tile_size"] == mf.load(out).config["tile_size"] == 256


def test_a_replacement_that_crashed_before_its_manifest_is_resumed(stack, tmp_path, monkeypatch, capsys):
    """--replace-changed killed after its new and rewritten shards were written but before its manifest: the
    dataset is still the old one, and the same command again completes from the staged parts, with every sample
    once, as a dataset made from today's files has them, and nothing unlisted left behind."""
    slides = tmp_path / "slides"
    paths, _ = make_slides(slides, n=3, size=1024, seed=12)
    out = "s3://shards/replace-crash/x"
    made, _ = run_ingest("wsi", wsi_config(slides, out, split="train=1.0", region_tiles=4))
    before = storage.get_bytes(storage.join(out, mf.MANIFEST_NAME))
    paths[0].write_bytes(paths[1].read_bytes())  # rescanned in place

    def crash(*_):
        raise RuntimeError("killed before the commit")

    cfg = wsi_config(slides, out, split="train=1.0", region_tiles=4, replace_changed=True)
    with monkeypatch.context() as m:
        m.setattr(mf, "save", crash)
        with pytest.raises(RuntimeError, match="killed before the commit"):
            run_ingest("wsi", cfg)
    assert storage.get_bytes(storage.join(out, mf.MANIFEST_NAME)) == before  # the old dataset, whole
    written = {u for u in storage.list_urls(storage.join(out, "train")) if u.endswith(".tar")}
    assert len(written) == 3  # its shard, the rescan's, and its shard rewritten without the old samples
    assert list(storage.list_urls(storage.join(out, STAGING)))

    assert made.made_by == provenance.made_by()  # the code that made it
    assert made.rendered_with == rendered_with(cfg)  # and what rendered its samples: its workers'
    monkeypatch.setattr(provenance, "commit", lambda: "newer")  # a later Tessera amends it
    capsys.readouterr()
    replaced, _ = run_ingest("wsi", cfg)
    assert replaced.amended[-1].replaced == 1 and verify_dataset(out) == []
    newer = f"tessera {provenance.version()} (newer)"
    assert replaced.made_by == made.made_by and replaced.amended[-1].made_by == newer
    # a later commit that renders alike says nothing of it; the staged parts of the run that crashed and those
    # made since record the same rendering
    said = capsys.readouterr().out
    assert "amended now by" not in said and "rendered otherwise" not in said
    assert replaced.amended[-1].rendered_with == made.rendered_with
    listed = set(replaced.shard_urls(out, "train"))
    assert {u for u in storage.list_urls(storage.join(out, "train")) if u.endswith(".tar")} == listed
    assert not list(storage.list_urls(storage.join(out, STAGING)))
    fresh, _ = run_ingest("wsi", wsi_config(slides, "s3://shards/replace-crash/fresh", split="train=1.0"))
    keys = _keys(out, replaced, tmp_path)
    assert len(keys) == len(set(keys)) and sorted(keys) == sorted(
        _keys("s3://shards/replace-crash/fresh", fresh, tmp_path)
    )
    assert made.created == replaced.created


def test_a_run_that_lost_its_lock_commits_nothing(stack, tmp_path, monkeypatch):
    """A run that stalled past its lock's time-out while another took the dataset over writes no manifest and
    leaves the other's lock; the same command, once the dataset is free, completes from what it staged."""
    import ingest.runner as runner

    slides = tmp_path / "slides"
    make_slides(slides, n=2, size=1024, seed=13)
    out = "s3://shards/lost-lock/x"
    cfg = wsi_config(slides, out, split="train=1.0")
    pack = runner.pack_parts
    other = {"token": "other", "what": "ingest wsi", "host": "node-9", "pid": 1, "started": 0.0, "beat": time.time()}

    def taken_over(*args, **kwargs):
        out_ = pack(*args, **kwargs)
        storage.put_bytes(storage.join(out, "_ingest.lock"), json.dumps(other).encode())
        return out_

    with monkeypatch.context() as m:
        m.setattr(runner, "pack_parts", taken_over)
        with pytest.raises(DatasetBusy, match=r"lost its lock: ingest wsi .*node-9.* holds it; nothing of this run"):
            run_ingest("wsi", cfg)
    assert not storage.exists(storage.join(out, mf.MANIFEST_NAME)) and holder(out).token == "other"
    storage.delete(storage.join(out, "_ingest.lock"))  # the other run finished
    manifest, _ = run_ingest("wsi", cfg)
    assert verify_dataset(out) == [] and holder(out) is None
    assert {u for u in storage.list_urls(storage.join(out, "train")) if u.endswith(".tar")} == set(
        manifest.shard_urls(out, "train")
    )
