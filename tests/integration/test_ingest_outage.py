"""The stack's S3 server stopped under a running ingest: a short outage is waited out; a long one stops the run
without recording any input as failed, and the same run, repeated once S3 is back, completes from what it staged.
The outage is real: the stack's ``rclone serve s3`` is stopped and started again."""

import threading
import time
from collections import Counter

import pytest

from cluster.stack import LocalStack
from ingest.decisions import IngestStopped
from ingest.runner import run_ingest
from ingest.staging import STAGING
from ingest.synthetic import make_slides
from shards import storage
from tests.integration.commands import wsi_config
from tests.integration.test_ingest_resume import _keys


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("outage_slides")
    make_slides(root, n=4, size=2048, seed=11)
    return root


def _staged(out: str) -> int:
    return sum(u.endswith(".json") and not u.endswith("/config.json") for u in storage.list_urls(out + f"/{STAGING}"))


def _ingest_with_outage(stack, cfg, seconds: float | None) -> dict:
    """Run the ingest in a thread; once it has staged two pieces of work, stop S3 for ``seconds`` (None: until the
    run ends, at most 120 s: on a loaded machine its retries outlasted an outage of fixed length)."""
    local = LocalStack(stack)
    result: dict = {}

    def run():
        try:
            result["manifest"] = run_ingest("wsi", cfg)[0]
        except Exception as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and thread.is_alive() and _staged(cfg.out) < 2:
        time.sleep(0.05)
    assert thread.is_alive(), "the run finished before S3 could be stopped"
    try:
        local._stop("s3")
        thread.join(timeout=seconds if seconds is not None else 120)
    finally:
        local.up()
    thread.join(timeout=300)
    assert not thread.is_alive()
    return result


def test_a_short_s3_outage_is_waited_out(stack, slides, tmp_path):
    cfg = wsi_config(slides, "s3://shards/outage/short", region_tiles=2, workers=2, outage_wait_s=120)
    result = _ingest_with_outage(stack, cfg, seconds=6)
    assert "error" not in result, result.get("error")
    manifest = result["manifest"]
    assert all(r.status == "ingested" for r in manifest.inputs)
    clean, _ = run_ingest("wsi", wsi_config(slides, "s3://shards/outage/clean", region_tiles=2, workers=2))
    keys = _keys(cfg.out, manifest, tmp_path)
    assert Counter(keys).most_common(1)[0][1] == 1  # no duplicates
    assert sorted(keys) == sorted(_keys(clean.dataset, clean, tmp_path))
    assert {r.id: r.samples for r in manifest.inputs} == {r.id: r.samples for r in clean.inputs}


def test_a_long_s3_outage_stops_the_run_and_the_same_run_completes_after(stack, slides, tmp_path):
    cfg = wsi_config(slides, "s3://shards/outage/long", region_tiles=2, workers=2, outage_wait_s=1)
    result = _ingest_with_outage(stack, cfg, seconds=None)
    error = result.get("error")
    assert isinstance(error, IngestStopped), error
    message = str(error)
    assert f"the store of {cfg.out} does not answer" in message and "for 1 s" in message
    assert "no input was recorded as failed" in message and "the same command, run again" in message
    assert not storage.exists(storage.join(cfg.out, "manifest.json"))  # nothing committed
    staged = _staged(cfg.out)
    assert staged >= 2  # what the stopped run staged is kept for the next one

    resumed, _ = run_ingest("wsi", cfg)
    assert all(r.status == "ingested" for r in resumed.inputs)
    clean, _ = run_ingest("wsi", wsi_config(slides, "s3://shards/outage/clean", region_tiles=2, workers=2))
    keys = _keys(cfg.out, resumed, tmp_path)
    assert Counter(keys).most_common(1)[0][1] == 1
    assert sorted(keys) == sorted(_keys(clean.dataset, clean, tmp_path))
    assert not list(storage.list_urls(storage.join(cfg.out, STAGING)))
