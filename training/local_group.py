"""A torch.distributed group on this machine without Ray: what a Ray Train worker's step (DeepSpeed's engine, the
gathers of evaluation) needs to run in one process, or in ranks a test spawns, for the tests and benchmarks."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch.distributed as dist


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_group(backend: str, rank: int, world: int, port: int, timeout_s: float | None = None) -> None:
    """Join rank ``rank`` of ``world`` to the group at ``127.0.0.1:port``, with the environment a Ray Train
    worker has (DeepSpeed reads RANK, WORLD_SIZE and LOCAL_RANK from it)."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank)}
    os.environ.update(env | {"WORLD_SIZE": str(world)})
    timeout = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend, rank=rank, world_size=world, **timeout)


@contextmanager
def one_rank_group(backend: str = "gloo") -> Iterator[None]:
    """This process as a group of one rank (``nccl`` on GPU 0: set it as the current device first)."""
    join_group(backend, 0, 1, free_port())
    try:
        yield
    finally:
        dist.destroy_process_group()
