from ingest.decisions import decide
from ingest.dicom import DicomError
from ingest.slides import SlideError
from shards.storage import StorageError


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
