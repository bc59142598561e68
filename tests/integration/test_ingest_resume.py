"""Crash and resume: a re-run completes with every expected sample exactly once; bad inputs are recorded."""

from collections import Counter
from pathlib import Path

from ingest.config import WsiIngestConfig
from ingest.plan import plan_wsi
from ingest.runner import STAGING, process_unit, run_ingest
from ingest.synthetic import make_slides
from shards import manifest as mf
from shards import storage
from shards.writer import read_tar_samples


def _keys(prefix, manifest, tmp):
    keys = []
    for split in manifest.splits:
        for url in manifest.shard_urls(prefix, split):
            keys += [s["__key__"] for s in read_tar_samples(storage.get_file(url, Path(tmp) / "x.tar"))]
    return keys


def test_kill_and_resume_gives_exactly_the_expected_samples(stack, tmp_path):
    slides = tmp_path / "slides"
    make_slides(slides, n=4, size=1024, seed=3)
    (slides / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 100)  # truncated TIFF
    (slides / "notes.svs").write_text("not a slide")  # wrong content for its extension
    common = dict(sources=[str(slides)], labels=None, tile_size=128, store_size=32, split="train=0.5,val=0.5")
    clean_url, crash_url = "s3://shards/resume/clean", "s3://shards/resume/crashed"
    clean, _ = run_ingest("wsi", WsiIngestConfig(out=clean_url, **common))

    # The "crashed" run: two units finished and staged, a third half-uploaded, then the process died.
    cfg = WsiIngestConfig(out=crash_url, **common)
    from ingest.config import pseudonym_key

    units = plan_wsi(cfg, pseudonym_key()).units
    for unit in units[:2]:
        assert process_unit(unit, cfg).status == "ingested"
    storage.put_bytes(storage.join(crash_url, STAGING, f"{units[2].id}.tar"), b"partial garbage")
    storage.put_bytes(storage.join(crash_url, "train", "shard-000000.tar"), b"stale shard from the crash")
    resumed, _ = run_ingest("wsi", cfg)

    assert not list(storage.list_urls(storage.join(crash_url, STAGING)))
    keys = _keys(crash_url, resumed, tmp_path)
    assert Counter(keys).most_common(1)[0][1] == 1  # no duplicates
    assert sorted(keys) == sorted(_keys(clean_url, clean, tmp_path))
    assert {r.id: r.samples for r in resumed.inputs} == {r.id: r.samples for r in clean.inputs}


def test_bad_slides_are_failed_with_a_reason_and_the_run_goes_on(stack, tmp_path):
    slides = tmp_path / "slides"
    make_slides(slides, n=2, size=1024, seed=4)
    (slides / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 100)
    (slides / "notes.svs").write_text("not a slide")
    manifest, _ = run_ingest(
        "wsi", WsiIngestConfig(sources=[str(slides)], out="s3://shards/bad/x", tile_size=128, split="train=1.0")
    )
    status = Counter(r.status for r in manifest.inputs)
    assert status == {"ingested": 2, "failed": 2}
    for rec in manifest.inputs:
        if rec.status == "failed":
            assert "SlideError" in rec.reason and "broken" not in rec.reason and "notes" not in rec.reason
    assert mf.load("s3://shards/bad/x").splits["train"].num_samples > 0
