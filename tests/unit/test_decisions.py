"""What a failure of a piece of work leads to: the input fails, the work is retried, or (no input to blame) the run
stops; and telling a store's outage from one object's fault."""

import errno
import http.server
import socket
import threading

import pytest

from ingest.config import WsiIngestConfig
from ingest.decisions import IngestStopped, decide
from ingest.dicom import DicomError
from ingest.slides import SlideError
from ingest.staging import attempt, retried
from shards import storage
from shards.storage import StorageError
from training.local_group import free_port


def test_broken_inputs_fail_at_once():
    assert decide(SlideError("read failed at (0, 0)"), 1).action == "failed"
    assert decide(DicomError("pixel data could not be decoded"), 1).action == "failed"
    d = decide(ValueError("bad"), 1)
    assert d.action == "failed" and d.reason == "ValueError: bad"


def test_transient_errors_are_retried_then_fail():
    err = StorageError("s3://b/k: ConnectionError")
    assert decide(err, 1, max_attempts=3).action == "retry"
    assert decide(err, 2, max_attempts=3).action == "retry"
    last = decide(err, 3, max_attempts=3)
    assert last.action == "failed" and "after 3 attempts" in last.reason
    assert last.store  # the store is to be asked whether it is down before the input is failed for it
    assert not decide(SlideError("x"), 1).store


def test_a_full_disk_stops_the_run_whatever_wraps_it():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:
        raise StorageError("/data/out/_staging/x.tar: OSError: [Errno 28] No space left on device") from full
    except StorageError as wrapped:
        assert decide(wrapped, 1).action == "stop"
    assert decide(OSError(errno.EROFS, "Read-only file system"), 1).action == "stop"
    assert decide(OSError(errno.ENOENT, "No such file"), 1).action == "failed"  # one input's missing file


def _serve(status: int, failures: int = 0):
    """A local HTTP server answering every request with ``status``: a store that is up (404, 403) or failing (503);
    with ``failures``, 503 to that many first requests (S3 restarting). Returns it and the list of requests."""
    asked = []

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            asked.append(1)
            self.send_response(503 if len(asked) <= failures else status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, asked


def test_a_store_is_down_when_it_does_not_answer_or_answers_with_a_server_error(monkeypatch, tmp_path):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    assert storage.unreachable(str(tmp_path / "out")) is None  # local disk
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert "EndpointConnectionError" in storage.unreachable("s3://shards/x")
    for status, down in ((404, False), (403, False), (503, True)):
        server, _ = _serve(status)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
        assert (storage.unreachable("s3://shards/x") is not None) is down, status
        server.shutdown()


def _cfg(wait: float = 1.0) -> WsiIngestConfig:
    return WsiIngestConfig(sources=["s3://slides/in"], out="s3://shards/out", max_attempts=2, outage_wait_s=wait)


def _failing(times: int, exc: Exception):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= times:
            raise exc
        return "done"

    return fn, calls


def test_work_waits_for_a_store_that_comes_back(monkeypatch):
    answers = iter(["the store of s3://shards/out does not answer (x)", None])  # down when asked, then back
    monkeypatch.setattr("shards.probes.stores_down", lambda urls: next(answers))
    monkeypatch.setattr("shards.probes.time.sleep", lambda s: None)
    monkeypatch.setattr("ingest.staging.time.sleep", lambda s: None)
    fn, calls = _failing(2, StorageError("s3://shards/out/a: EndpointConnectionError"))
    assert retried(fn, _cfg(wait=30)) == "done"
    assert len(calls) == 3  # two attempts, the wait, then tried anew


def test_a_store_down_past_the_wait_stops_the_run_and_fails_no_input(monkeypatch):
    monkeypatch.setattr("ingest.staging.outage", lambda cfg: "the store of s3://shards/out does not answer (x)")
    fn, _ = _failing(99, StorageError("s3://shards/out/a: EndpointConnectionError"))
    with pytest.raises(IngestStopped, match=r"does not answer \(x\) for 0 s"):
        attempt(fn, _cfg(wait=0.0))


def test_an_object_fault_in_a_store_that_answers_fails_only_its_input(monkeypatch):
    monkeypatch.setattr("ingest.staging.outage", lambda cfg: None)
    monkeypatch.setattr("ingest.staging.time.sleep", lambda s: None)
    fn, calls = _failing(99, StorageError("s3://slides/in/a.svs: NoSuchKey"))
    result, action, reason = attempt(fn, _cfg())
    assert (result, action) == (None, "failed") and "NoSuchKey" in reason and "after 2 attempts" in reason
    assert len(calls) == 2


def test_an_object_its_store_says_is_gone_fails_its_input_at_once(monkeypatch):
    """A source deleted from S3 between listing and reading was tried three times, then the store asked whether it
    was down, and failed as boto3's "NoSuchKey ... Unknown"."""
    from shards.storage import Missing

    monkeypatch.setattr("ingest.staging.outage", lambda cfg: pytest.fail("the store was asked"))
    fn, calls = _failing(99, Missing("s3://slides/DOE_JOHN/a.svs: ClientError: ... (NoSuchKey) ...: Unknown"))
    result, action, reason = attempt(fn, _cfg())
    assert (result, action, len(calls)) == (None, "failed", 1)
    assert reason == "Missing: not in the store: deleted (or its bucket) since it was listed"


def test_a_full_disk_stops_the_run_at_once():
    fn, calls = _failing(99, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(IngestStopped, match="no space left to write"):
        attempt(fn, _cfg())
    assert len(calls) == 1


def test_the_stores_are_asked_once_per_bucket_and_named_by_the_runs_own_location(monkeypatch):
    from ingest.staging import outage

    asked = []
    monkeypatch.setattr(storage, "unreachable", lambda url: asked.append(url) or ("x" if "slides" in url else None))
    cfg = WsiIngestConfig(sources=["s3://slides/a.svs", "s3://slides/b.svs", "/data/c.svs"], out="s3://shards/out")
    assert outage(cfg) == "the store of s3://slides/a.svs does not answer (x)"
    assert asked == ["s3://shards/out", "s3://slides/a.svs"]


def test_a_listed_file_a_worker_cannot_find_is_named_for_what_it_is(tmp_path):
    """A slide the driver listed and a worker's node does not have (deleted since, or on a disk only the driver's
    node mounts) failed as "OpenSlide does not recognise the file (damaged, or not a slide)"; an image or DICOM
    file, with its path (which may name the patient) in the manifest."""
    from ingest.slides import OpenSlideReader

    with pytest.raises(FileNotFoundError) as missing:
        OpenSlideReader(str(tmp_path / "DOE_JOHN" / "a.svs"))
    d = decide(missing.value, 1)
    assert d.action == "failed" and "DOE" not in d.reason
    assert d.reason == (
        f"FileNotFoundError: the file is not there on node {socket.gethostname()}: moved or deleted since it was "
        "listed, or on a disk that node does not mount (give s3:// sources, or a folder every node of the cluster "
        "mounts)"
    )


def test_a_training_worker_waits_for_its_datasets_store(monkeypatch, capsys):
    """A worker restarted from its checkpoint while S3 restarts failed again at once, and Ray Train's retries were
    spent in seconds: the run failed. It now waits for the store, up to ``data.outage_wait_s``."""
    from training.data import wait_for_store

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setattr("shards.probes.time.sleep", lambda s: None)
    server, asked = _serve(404, failures=3)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_port}")
    wait_for_store("s3://shards/demo/wsi", 600, "rank 1")
    said = capsys.readouterr().out.splitlines()
    assert len(asked) == 4 and len(said) == 2
    assert said[0].startswith("rank 1: the store of s3://shards/demo/wsi does not answer (")
    assert said[0].endswith("; waiting up to 600 s for it (data.outage_wait_s)")
    assert said[1] == "rank 1: the store of s3://shards/demo/wsi answers again; going on"
    wait_for_store("s3://shards/demo/wsi", 600, "trial 2a4e_00001")  # up: no word
    assert capsys.readouterr().out == "" and len(asked) == 5
    server.shutdown()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match=r"the store of s3://shards/demo/wsi does not answer \(.*\) for 0 s"):
        wait_for_store("s3://shards/demo/wsi", 0, "rank 0")
    wait_for_store("/data/local/ds", 0, "rank 0")  # a local dataset: nothing to ask
