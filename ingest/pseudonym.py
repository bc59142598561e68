"""Keyed pseudonyms: stable across runs with the same key, unlinkable without it."""

from __future__ import annotations

import hashlib
import hmac


def pseudonym(key: bytes, kind: str, value: str, length: int = 16) -> str:
    """HMAC-SHA256 of ``kind:value`` under ``key``, as ``length`` hex characters.

    ``kind`` (``patient``, ``slide``, ``series``...) keeps equal strings of different kinds apart.
    """
    if not key:
        raise ValueError("a pseudonym key is required (set TESSERA_PSEUDONYM_KEY or run `tessera up`)")
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:length]
