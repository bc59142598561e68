"""Images that are copies of one another: the same bytes under two names, as collections assembled from several
sources hold them (one image in a Training and a Testing folder, or in two class folders), or (``--near-copies``)
the same picture saved again. Found by their content's MD5, and by a perceptual hash of their pictures, so that a
copy never lands in another split than its original, where it would be tested on what trained."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from ingest import progress
from ingest.splits import linked_patients
from shards import storage, transfers

if TYPE_CHECKING:
    from ingest.config import ImagesIngestConfig
    from ingest.units import Unit

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


# Near copies: one image saved again (resized, re-encoded, turned from PNG into JPEG) is no byte-for-byte copy, and
# is as much a leak across splits. Told by a perceptual hash: the image in grey at 32 x 32 px, its 8 x 8 lowest
# frequencies (DCT) but the mean, one bit each for whether it is above their median. Saving again moves a few of the
# 64 bits (0-10 here); different pictures differ in about half.
HASH_PX, HASH_FREQ = 32, 8


def picture_hash(data: bytes) -> int | None:
    """The 64-bit perceptual hash of an encoded image (its first bit always 0: the mean's place), or None where it
    cannot be decoded (its worker says why)."""
    import cv2
    import numpy as np

    # ANYDEPTH: a 16-bit image as it is; cut to 8 bits (its value / 256), an MR export whose values stay under 256
    # was black, and every such image one near copy of every other
    grey = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE | cv2.IMREAD_ANYDEPTH)
    if grey is None or grey.size == 0:
        return None
    small = cv2.resize(grey.astype(np.float32), (HASH_PX, HASH_PX), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:HASH_FREQ, :HASH_FREQ].ravel()[1:]
    bits = np.concatenate([[False], low > np.median(low)])
    return int(np.packbits(bits).view(">u8")[0])


def picture_hashes(locations: list[str], threads: int = 8) -> dict[str, int | None]:
    """:func:`picture_hash` of each location's file, read in threads (every image read and decoded, before the
    run: ``--near-copies 0`` skips it)."""
    with progress.bar(len(locations), "looking for near copies", "file", least=BAR_FILES) as bar:
        hashed = transfers.concurrently(lambda loc: picture_hash(storage.get_bytes(loc)), locations, threads,
                                        "tessera-phash", each=lambda _: bar.update(1))  # fmt: skip
    return dict(zip(locations, hashed, strict=True))


def near_pairs(hashes: dict[str, int | None], within: int) -> list[tuple[str, str]]:
    """Pairs of locations whose hashes differ in at most ``within`` bits, each pair sorted. Two such hashes agree
    on one of ``within + 1`` bands of their bits at least, so only images that share a band are compared: a
    hundred thousand images are not 5e9 pairs."""
    known = sorted((loc, h) for loc, h in hashes.items() if h is not None)
    bands = within + 1
    edges = [round(64 * b / bands) for b in range(bands + 1)]
    pairs: set[tuple[str, str]] = set()
    for lo, hi in itertools.pairwise(edges):
        mask = ((1 << (hi - lo)) - 1) << lo
        buckets: dict[int, list[tuple[str, int]]] = {}
        for loc, h in known:
            buckets.setdefault(h & mask, []).append((loc, h))
        for bucket in buckets.values():
            for i, (a, ha) in enumerate(bucket):
                pairs.update((a, b) for b, hb in bucket[i + 1 :] if (ha ^ hb).bit_count() <= within)
    return sorted(pairs)


def near_copy_groups(locations: list[str], within: int) -> list[list[str]]:
    """The groups of ``locations`` whose pictures are near copies (hashes at most ``within`` bits apart), each
    sorted, the groups by their first."""
    return groups_of(near_pairs(picture_hashes(locations), within))


def groups_of(pairs: list[tuple[str, str]]) -> list[list[str]]:
    """The connected groups of ``pairs`` (a near copy of a near copy joins the group), each sorted, the groups by
    their first."""
    groups: dict[str, list[str]] = {}
    for x, first in sorted(linked_patients(pairs).items()):  # any names: each -> the first of its group
        groups.setdefault(first, []).append(x)
    return sorted(groups.values(), key=lambda g: g[0])


def place_copies(
    units: list[Unit],
    cfg: ImagesIngestConfig,
    stamps: dict[str, str],
    classes: list[str],
    skip: Callable[[str, str], None],
) -> dict[str, str]:
    """Images of the same bytes, and (``--near-copies``) of near the same picture: their patients linked, so that
    they share a split (each copy names the others, ``meta["copies"]``, for ``--append`` to place one added later),
    or (``drop``, byte copies) all but the first taken out of ``units`` and ``skip``-ped with the reason; each says
    so, and where their labels differ, which labels. Returns the links (``ingest.plan._assign``'s ``linked``)."""
    by_location = {u.sources[0]: u for u in units}
    links: list[tuple[str, str]] = []

    def labelled(members: list[Unit]) -> str:
        labels = sorted({classes[u.label] for u in members if u.label is not None})
        return f", labelled {' and '.join(labels)}" if len(labels) > 1 else ""

    def together(members: list[Unit], what: str) -> None:
        links.extend((members[0].patient, u.patient) for u in members[1:])
        for u in members:
            u.meta["copies"] = sorted({*u.meta.get("copies", []), *(m.id for m in members if m is not u)})
            u.meta.setdefault("warnings", []).append(f"one of {len(members)} {what}: in one split{labelled(members)}")

    for group in copy_groups(content_digests({loc: stamps[loc] for loc in by_location})):
        members = [by_location[loc] for loc in group]
        if cfg.duplicates != "drop":
            together(members, "byte-for-byte copies")
            continue
        for u in members[1:]:
            units.remove(u)
            del by_location[u.sources[0]]
            skip(u.id, f"a byte-for-byte copy of an image ingested (--duplicates drop){labelled(members)}")
        members[0].meta.setdefault("warnings", []).append(
            f"one of {len(group)} byte-for-byte copies: kept, the others skipped{labelled(members)}"
        )
    for group in near_copy_groups(list(by_location), cfg.near_copies) if cfg.near_copies else []:
        together([by_location[loc] for loc in group], f"near copies (pictures within {cfg.near_copies} bits of 64)")
    return linked_patients(links)
