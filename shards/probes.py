"""Whether the object stores a run uses answer, asked once per bucket: tells a store's outage, which a wait may
outlast, from one object's own fault, which no wait mends (ingest's retries and training's data ask it)."""

from __future__ import annotations

import time

from shards import storage


def stores_down(urls: list[str]) -> str | None:
    """Why a store holding one of ``urls`` does not answer now, or None when all answer (asked once per bucket,
    named by the first of ``urls`` in it)."""
    buckets: dict[tuple[str, str], str] = {}
    for url in urls:
        loc = storage.parse(url)
        buckets.setdefault((loc.scheme, loc.bucket), url)
    for url in buckets.values():
        if why := storage.unreachable(url):
            return f"the store of {url} does not answer ({why})"
    return None


def answers_within(urls: list[str], seconds: float, poll_s: float = 5.0) -> bool:
    """Whether every store of ``urls`` answers again within ``seconds`` (asked every ``poll_s`` seconds)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(deadline - time.monotonic(), 0.0)))
        if stores_down(urls) is None:
            return True
    return False
