"""One ingest at a time per dataset: the lock object, its exclusive creation, its take-over when the holder is
gone, its heartbeat, and a holder that lost it."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from ingest import lock as lk
from ingest.lock import DatasetBusy, DatasetLock, holder
from shards import storage
from shards.scratch import running


def _write_holder(out, **fields) -> None:
    now = time.time()
    base = {"token": "other", "what": "ingest dicom", "host": "node-7", "pid": 4242, "started": now, "beat": now}
    storage.put_bytes(storage.join(str(out), lk.LOCK_NAME), json.dumps(base | fields).encode())


def test_create_bytes_writes_only_where_nothing_is(tmp_path):
    url = str(tmp_path / "d" / "x")
    assert storage.create_bytes(url, b"first")
    assert not storage.create_bytes(url, b"second")
    assert storage.get_bytes(url) == b"first"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["x"]  # no temporary file left


def test_a_held_dataset_refuses_a_second_run_until_released(tmp_path):
    out = str(tmp_path)
    with DatasetLock(out, "ingest wsi") as first:
        held = holder(out)
        assert held is not None and held.token == first.me.token and held.pid > 0
        with pytest.raises(DatasetBusy) as busy:
            DatasetLock(out, "ingest images").acquire()
        message = str(busy.value)
        assert out in message and "ingest wsi" in message and f"on {socket.gethostname()}" in message
        assert "run this again once it has finished" in message
        first.check()  # the refused run did not disturb it
    assert holder(out) is None and not list(tmp_path.iterdir())  # released: nothing left in the dataset
    with DatasetLock(out, "ingest images") as second:
        assert second.took_over is None


def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path):
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(exited.stdout)
    _write_holder(tmp_path, host=socket.gethostname(), pid=dead_pid)  # killed here: taken over at once
    with DatasetLock(str(tmp_path), "ingest wsi") as lock:
        assert lock.took_over.pid == dead_pid and holder(str(tmp_path)).token == lock.me.token

    _write_holder(tmp_path, beat=time.time() - 10)  # another host, silent for 10 s
    with pytest.raises(DatasetBusy, match=r"ingest dicom \(pid 4242 on node-7, .*last seen 10s ago\)"):
        DatasetLock(str(tmp_path), "ingest wsi", ttl=60).acquire()
    with DatasetLock(str(tmp_path), "ingest wsi", ttl=5) as lock:  # silent for longer than the time-out
        assert lock.took_over.host == "node-7"
    assert holder(str(tmp_path)) is None


def test_a_killed_process_not_yet_reaped_counts_as_gone():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert running(proc.pid)
        proc.kill()
        deadline = time.monotonic() + 10
        while running(proc.pid) and time.monotonic() < deadline:  # a zombie until waited on
            time.sleep(0.05)
        assert not running(proc.pid)
    finally:
        proc.wait()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    with DatasetLock(str(tmp_path), "ingest wsi", ttl=0.4) as lock:
        first = holder(str(tmp_path)).beat
        deadline = time.monotonic() + 10
        while holder(str(tmp_path)).beat == first and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder(str(tmp_path)).beat > first and holder(str(tmp_path)).token == lock.me.token


def test_a_run_that_lost_its_lock_is_refused_and_leaves_the_new_holders_lock(tmp_path):
    lock = DatasetLock(str(tmp_path), "ingest wsi")
    with lock:
        _write_holder(tmp_path, token="taker", what="ingest wsi --append")  # took it over while this one stalled
        with pytest.raises(DatasetBusy, match=r"lost its lock: ingest wsi --append .* holds it; nothing of this run"):
            lock.check()
    assert holder(str(tmp_path)).token == "taker"  # releasing did not remove the other run's lock


def test_the_lock_line_says_who_writes_or_that_a_stopped_run_left_its_lock(tmp_path):
    out = str(tmp_path)
    assert lk.lock_line(out) is None
    with DatasetLock(out, "ingest images"):
        assert lk.lock_line(out).startswith(f"another ingest is writing to it now: ingest images (pid {os.getpid()} ")
    _write_holder(tmp_path, beat=time.time() - 2 * lk.TTL)
    line = lk.lock_line(out)
    assert line.startswith("a run that stopped left its lock: ingest dicom (pid 4242 on node-7, ")
    assert line.endswith("; the next ingest takes it over")


def test_a_lock_this_process_could_not_remove_is_taken_over_by_its_next_run(tmp_path, monkeypatch):
    """A run that ended while its store was down leaves its lock; the same process (a notebook, a test, a demo)
    knows that run is over, so its next run takes the lock over rather than wait for itself."""
    out = str(tmp_path)
    with monkeypatch.context() as m:
        m.setattr(storage, "delete", lambda url: (_ for _ in ()).throw(storage.StorageError(f"{url}: down")))
        with DatasetLock(out, "ingest wsi") as first:
            pass
    assert holder(out).token == first.me.token  # left behind
    with DatasetLock(out, "ingest wsi") as second:
        assert second.took_over is not None and second.took_over.token == first.me.token
    assert holder(out) is None
    _write_holder(out, host=socket.gethostname(), pid=os.getpid())  # another run of this process, still going
    with pytest.raises(DatasetBusy):
        DatasetLock(out, "ingest wsi").acquire()
