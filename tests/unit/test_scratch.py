"""Scratch left by a killed process is deleted by the next one; nobody else's files are touched."""

import os
import subprocess
import sys
from pathlib import Path

from shards import scratch

ROOT = Path(__file__).parents[2]

KILLED_INGEST_WORKER = """
import os, sys
from ingest.source_cache import SourceCache
from shards.local_files import download
from shards import storage
spool = storage.spool_dir("s3://bucket/train")  # a shard being written for S3
(spool / "shard-000000.tar.tmp").write_bytes(b"half a shard")
cached = SourceCache(remote=lambda location: True).path(sys.argv[1])  # a slide copied from the store
print(spool, os.path.dirname(cached), download(sys.argv[1]), flush=True)
os._exit(0)  # killed: no cleanup runs
"""

NEXT_PROCESS = "from shards import scratch; print(scratch.mkdtemp('next'))"


def _python(code: str, tmpdir: Path, *args: str) -> list[str]:
    env = dict(os.environ, TMPDIR=str(tmpdir))
    run = subprocess.run([sys.executable, "-c", code, *args], env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_what_a_killed_worker_left_is_deleted_by_the_next_process_and_nothing_else(tmp_path):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    slide = tmp_path / "slide.svs"
    slide.write_bytes(b"slide bytes")
    left = [Path(p) for p in _python(KILLED_INGEST_WORKER, tmpdir, str(slide))]
    assert all(p.exists() and p.parent == tmpdir for p in left)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        try:
            theirs = tmpdir / f"{scratch.PREFIX}{alive.pid}-spool-abc"  # a running process's scratch
            theirs.mkdir()
            other = tmpdir / "someone-elses.txt"
            other.write_text("keep")
            (new,) = _python(NEXT_PROCESS, tmpdir)
            assert not any(p.exists() for p in left)
            assert theirs.exists() and other.exists() and Path(new).exists()
        finally:
            alive.kill()


def test_sweep_keeps_this_process_and_running_ones(tmp_path):
    mine = tmp_path / f"{scratch.PREFIX}{os.getpid()}-idx-x"
    mine.mkdir()
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(finished.stdout)
    (tmp_path / f"{scratch.PREFIX}{dead}-src-y.svs").write_bytes(b"x")
    (tmp_path / f"{scratch.PREFIX}{dead}-checkpoint-z").mkdir()
    (tmp_path / f"{scratch.PREFIX}{dead}").mkdir()  # no kind: not a scratch name
    assert sorted(scratch.sweep(str(tmp_path))) == [
        f"{scratch.PREFIX}{dead}-checkpoint-z",
        f"{scratch.PREFIX}{dead}-src-y.svs",
    ]
    assert mine.exists() and (tmp_path / f"{scratch.PREFIX}{dead}").exists()
    assert scratch.running(os.getpid()) and not scratch.running(dead)
