"""Images that are copies of one another: the same bytes under two names, as collections assembled from several
sources hold them (one image in a Training and a Testing folder, or in two class folders). Found by their content's
MD5, so that a copy never lands in another split than its original, where it would be tested on what trained."""

from __future__ import annotations

import hashlib
import re

from ingest import progress
from shards import storage, transfers

_MD5 = re.compile(r"[0-9a-f]{32}")  # a single-part upload's ETag is its content's MD5; a multipart one's is not


def content_digest(location: str, stamp: str | None = None) -> str:
    """The MD5 of the file's bytes: an object's ETag where it is one (its listing's ``stamp``, ``size-etag``),
    else read. Not a safeguard against anyone: what tells two files of the same content."""
    etag = (stamp or "").partition("-")[2]
    if location.startswith("s3://") and _MD5.fullmatch(etag):
        return etag
    return hashlib.md5(storage.get_bytes(location), usedforsecurity=False).hexdigest()


BAR_FILES = 2000  # files read to digest before a bar is drawn (local disk: a few seconds)


def content_digests(stamps: dict[str, str], threads: int = 8) -> dict[str, str]:
    """:func:`content_digest` of each location of ``stamps`` (location -> its listing's stamp), read in threads
    (a hundred thousand local images: every byte read once here, before the run; ``--duplicates apart`` skips it),
    their wait counted once in the driver's transfers."""
    with progress.bar(len(stamps), "looking for copies", "file", least=BAR_FILES) as bar:
        read = transfers.concurrently(lambda item: content_digest(*item), stamps.items(), threads, "tessera-digest",
                                      each=lambda _: bar.update(1))  # fmt: skip
    return dict(zip(stamps, read, strict=True))


def copy_groups(digests: dict[str, str]) -> list[list[str]]:
    """The locations that share a digest, in groups of two or more: each group sorted (its first is the one
    ``--duplicates drop`` keeps), the groups by their first."""
    by_digest: dict[str, list[str]] = {}
    for location, digest in sorted(digests.items()):
        by_digest.setdefault(digest, []).append(location)
    return sorted((group for group in by_digest.values() if len(group) > 1), key=lambda group: group[0])
