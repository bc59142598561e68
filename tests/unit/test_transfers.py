"""Object-store transfer counts: bytes and time per transfer, and the time the work waited on them."""

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from shards import transfers
from shards.transfers import Transfers


def test_transfers_are_counted_and_only_the_works_own_waits_are_waited():
    transfers.take()
    assert transfers.counted(False, len, lambda: b"abcd") == b"abcd"
    transfers.counted(True, 10, lambda: time.sleep(0.05))
    with pytest.raises(OSError):  # a failed transfer: its time, not a transfer
        transfers.counted(False, len, lambda: (_ for _ in ()).throw(OSError("down")))
    with ThreadPoolExecutor(1, initializer=transfers.background) as pool:  # a read-ahead's
        fetch = pool.submit(transfers.counted, False, 7, time.sleep, 1.0)
        with transfers.waiting():  # the work blocks on it for part of its time
            time.sleep(0.05)
        fetch.result()
    moved = transfers.take()
    assert (moved.downloads, moved.downloaded, moved.uploads, moved.uploaded) == (2, 11, 1, 10)
    assert moved.seconds >= 1.05 and 0.1 <= moved.waited < 0.95  # the upload and the wait, not the background 1 s
    assert transfers.take() == Transfers()  # taken: counting starts again


def test_listing_requests_are_counted_with_their_time_as_they_are_drawn():
    transfers.take()

    def pages():  # a paginator's: each page a request when it is drawn
        for page in ([1, 2], [3]):
            time.sleep(0.05)
            yield page

    assert [x for page in transfers.listing(pages()) for x in page] == [1, 2, 3]
    moved = transfers.take()
    assert (moved.listings, moved.downloads) == (2, 0) and 0.1 <= moved.waited == moved.seconds < 1.0
    assert re.match(r"object store: the workers listed 2 page\(s\) of objects, in 0\.\d\d s", moved.describe(1.0))
    with ThreadPoolExecutor(1, initializer=transfers.background) as pool:  # a listing ahead: not waited on
        assert pool.submit(lambda: [len(p) for p in transfers.listing(pages())]).result() == [2, 1]
    assert transfers.take().waited == 0.0


def test_concurrent_requests_keep_their_order_and_count_the_wait_once():
    transfers.take()
    in_flight, most, lock = [0], [0], threading.Lock()

    def get(i: int) -> int:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        transfers.counted(False, 1, time.sleep, 0.1 if i % 2 else 0.02)  # later items may finish first
        with lock:
            in_flight[0] -= 1
        return i * i

    start = time.perf_counter()
    seen: list[int] = []
    assert transfers.concurrently(get, range(16), 4, "test", each=seen.append) == [i * i for i in range(16)]
    assert seen == [i * i for i in range(16)]  # each result as it came, in order
    wall = time.perf_counter() - start
    moved = transfers.take()
    assert most[0] == 4 and moved.downloads == 16 and moved.seconds >= 16 * 0.06 * 0.9
    assert moved.waited <= wall + 0.01  # the caller's wait, once: not the four threads' transfers added up


def test_counts_from_several_threads_add_up():
    transfers.take()

    def upload_many() -> None:
        for _ in range(1000):
            transfers.counted(True, 1, int)

    threads = [threading.Thread(target=upload_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert transfers.take().uploads == 4000


def test_the_workers_counts_add_and_read_as_one_line():
    a = Transfers(downloads=2, downloaded=3_000_000_000, uploads=1, uploaded=500_000, seconds=12.0, waited=3.0)
    b = Transfers(downloads=1, downloaded=250_000_000, seconds=2.0, waited=1.0)
    assert (a + b).describe(40.0) == (
        "object store: the workers downloaded 3 file(s), 3.25 GB and uploaded 1 file(s), 500.00 kB, in 14.0 s of "
        "transfers; they waited 4.00 s on them, 10% of their time"
    )
    assert b.describe(0) == (
        "object store: the workers downloaded 1 file(s), 250.00 MB, in 2.00 s of transfers; they waited 1.00 s on them"
    )
    assert b.describe(4.0, transfers.DRIVER) == (
        "object store: the driver (planning, staged records, the manifest) downloaded 1 file(s), 250.00 MB, in "
        "2.00 s of transfers; it waited 1.00 s on them, 25% of its time"
    )
