"""A series' slices and a batch's images on the object store are downloaded a few at a time ahead of their use,
each once, and none is left on disk."""

import glob
import os
import tempfile
import threading
import time
from pathlib import Path

import pytest

from ingest import read_ahead
from ingest.read_ahead import ReadAhead
from shards import local_files, scratch, storage


def _scratch() -> set[str]:
    """This process's downloaded copies in the temporary folder."""
    return set(glob.glob(os.path.join(tempfile.gettempdir(), scratch.prefix("src") + "*")))


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Local files that count as remote: downloads are real copies, counted, each taking 50 ms; the most in flight
    at once is recorded."""
    files = []
    for k in range(10):
        (tmp_path / f"s{k}.dcm").write_bytes(f"slice {k}".encode())
        files.append(str(tmp_path / f"s{k}.dcm"))
    seen = {"fetched": [], "flight": 0, "most": 0}
    lock = threading.Lock()
    real_get_file = storage.get_file

    def slow_get_file(url, local):
        with lock:
            seen["fetched"].append(url)
            seen["flight"] += 1
            seen["most"] = max(seen["most"], seen["flight"])
        time.sleep(0.05)
        try:
            return real_get_file(url, local)
        finally:
            with lock:
                seen["flight"] -= 1

    monkeypatch.setattr(storage, "get_file", slow_get_file)
    for module in (local_files, read_ahead):
        monkeypatch.setattr(module, "is_remote", lambda loc: loc.endswith(".dcm"))
    return files, seen


def test_files_come_in_their_order_of_use_a_few_at_a_time_each_downloaded_once(store):
    files, seen = store
    order = [files[0], files[1], files[1], files[2], *files[3:]]  # slice 1: two frames of one multi-frame file
    paths = []
    with ReadAhead(order, depth=4) as ahead:
        for loc in order:
            with ahead.local(loc) as path:
                assert Path(path).read_bytes() == Path(loc).read_bytes() and path != loc
                paths.append(path)
    assert sorted(seen["fetched"]) == sorted(files) and 1 < seen["most"] <= 4  # each once, up to four at a time
    assert paths[1] == paths[2]  # kept for its second frame
    assert not any(os.path.exists(p) for p in paths)  # each deleted after its last use
    seen["most"] = 0
    with ReadAhead(files, depth=0) as one_at_a_time:  # --read-ahead 0: each file downloaded as it is used
        for loc in files[:3]:
            with one_at_a_time.local(loc) as path:
                assert Path(path).read_bytes() == Path(loc).read_bytes()
    assert seen["most"] == 1 and len(seen["fetched"]) == len(files) + 3


def test_a_file_used_out_of_turn_or_again_is_downloaded_then_and_unused_ones_are_deleted(store, tmp_path):
    files, seen = store
    before = _scratch()
    local = tmp_path / "local.png"
    local.write_bytes(b"png")
    with ReadAhead([str(local), *files[:4]], depth=2) as ahead:
        with ahead.local(str(local)) as path:
            assert path == str(local)  # local files pass through
        with ahead.local(files[5]) as path:  # not among them: downloaded now
            assert Path(path).read_bytes() == b"slice 5"
        with ahead.local(files[0]):
            pass
        with ahead.local(files[0]) as path:  # used up: downloaded again
            assert Path(path).read_bytes() == b"slice 0"
    fetched = seen["fetched"]
    assert fetched.count(files[0]) == 2 and {files[1], files[5]} <= set(fetched) and files[3] not in fetched
    assert _scratch() == before  # the file fetched ahead and not used was deleted at the end


def test_a_download_that_failed_ahead_fails_where_the_file_is_used_and_a_retry_downloads_it_anew(store, monkeypatch):
    files, _ = store
    real = storage.get_file
    tries = []

    def flaky(url, local):
        tries.append(url)
        if url == files[1] and tries.count(url) == 1:
            raise storage.StorageError(f"{url}: connection reset")
        return real(url, local)

    monkeypatch.setattr(storage, "get_file", flaky)
    with ReadAhead(files[:3], depth=3) as ahead:
        with ahead.local(files[0]):
            pass
        with pytest.raises(storage.StorageError, match="connection reset"), ahead.local(files[1]):
            pass
        with ahead.local(files[1]) as path:  # the caller's retry
            assert Path(path).read_bytes() == b"slice 1"
    assert tries.count(files[1]) == 2 and tries.count(files[2]) == 1  # files[2]: fetched ahead, never used
