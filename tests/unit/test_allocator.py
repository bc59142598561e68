"""CPU training and ingest workers keep freed memory: re-allocating a large block no longer page-faults it in
again (ingest: up to a size, above which blocks are still returned at once)."""

import os
import subprocess
import sys

import pytest

from shards.allocator import keep_freed_memory

PROBE = """
import resource, torch
from shards.allocator import keep_freed_memory
took = keep_freed_memory()
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        block = torch.ones(16 * 2**20)  # 64 MiB, every page written, as an activation is
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
faults(), faults()  # the heap grows to its working size
print(took, min(faults() for _ in range(3)))  # the steady state: a round may still place one block in new pages
"""


def _probe(setting: str) -> tuple[bool, int]:
    env = os.environ | {"TESSERA_KEEP_FREED_MEMORY": setting}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    took, faults = out.stdout.split()
    return took == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reallocating_a_large_block_costs_no_page_faults_once_memory_is_kept():
    took, kept = _probe("1")
    off, default = _probe("0")
    assert took and not off
    assert default > 5 * 16_000 * 0.9  # glibc unmaps the 64 MiB on free: 16k pages fault in each time
    assert kept < 1_000


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("TESSERA_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False


INGEST_PROBE = """
import resource, numpy as np
from shards.allocator import INGEST, keep_freed_memory
took = keep_freed_memory(**INGEST)
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        blocks = [np.ones(3 * 2**19, np.uint8) for _ in range(3)]  # a tile's buffers (read, resized, encoded)
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
faults(), faults()
before = rss()
block = np.ones(64 * 2**20, np.uint8)
del block
print(took, faults(), rss() - before)
"""


def _ingest_probe(setting: str) -> tuple[bool, int, int]:
    env = os.environ | {"TESSERA_KEEP_FREED_MEMORY": setting}
    out = subprocess.run([sys.executable, "-c", INGEST_PROBE], env=env, capture_output=True, text=True, check=True)
    took, faults, kept = out.stdout.split()
    return took == "True", int(faults), int(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_an_ingest_worker_reuses_tile_sized_blocks_and_returns_large_ones():
    took, faults, kept = _ingest_probe("1")
    off, default_faults, _ = _ingest_probe("0")
    assert took and not off
    # glibc gives the freed top of its heap back (beyond twice its adjusted mmap threshold): each tile faults in
    assert default_faults > 1_000
    assert faults < 100  # kept: the same heap blocks again
    assert kept < 4 * 2**20  # 64 MiB is above the limit: mapped, and given back on free
