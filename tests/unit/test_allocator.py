"""CPU training keeps freed memory mapped: re-allocating a large block no longer page-faults it in again."""

import os
import subprocess
import sys

import pytest

from training.allocator import keep_freed_memory

PROBE = """
import resource, torch
from training.allocator import keep_freed_memory
took = keep_freed_memory()
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        block = torch.ones(16 * 2**20)  # 64 MiB, every page written, as an activation is
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
faults(), faults()  # the heap grows to its working size
print(took, faults())
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
