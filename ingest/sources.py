"""Expand SRC arguments (files, directories, globs, ``s3://`` prefixes) into input locations."""

from __future__ import annotations

import bisect
import configparser
import glob
import json
import os
from collections.abc import Iterable

from ingest import progress
from ingest.pseudonym import pseudonym
from shards import storage

LIST_BAR_OBJECTS = 20_000  # a listing this long (20 requests) draws a bar: a million objects take minutes
SLIDE_EXTS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


def expand(sources: Iterable[str], exts: tuple[str, ...] | None = None) -> list[str]:
    """Every file named by ``sources``, de-duplicated and sorted; directories and prefixes recurse.

    ``exts`` filters files found by recursion (a file named directly is always kept). A source that
    matches nothing raises ``FileNotFoundError`` naming it.
    """
    return sorted(listing(sources, exts))


def listing(sources: Iterable[str], exts: tuple[str, ...] | None = None) -> dict[str, str]:
    """:func:`expand`'s files, each with its stamp (size and modification time or ETag,
    :func:`shards.storage.stat_stamp`): what tells a file replaced in place from the one a dataset was made of.
    Object prefixes give them in their listing; local files are stat'ed."""
    found: dict[str, str] = {}
    for src in sources:
        if src.startswith("s3://"):
            objects = list(progress.counted(storage.list_stamps(src), "listing", " objects", LIST_BAR_OBJECTS))
            found.update((u, v) for u, v in objects if exts is None or u.lower().endswith(exts) or u == src)
            if not objects:
                raise FileNotFoundError(f"{src}: no objects under this prefix")
            continue
        matches = glob.glob(src, recursive=True) if glob.has_magic(src) else [src]
        if not matches or not any(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"{src}: no such file or directory")
        files: list[str] = []
        for m in matches:
            if os.path.isdir(m):
                for root, _, names in os.walk(m):
                    files += [os.path.join(root, f) for f in names if exts is None or f.lower().endswith(exts)]
            elif os.path.isfile(m):
                files.append(m)
        for f in map(os.path.abspath, files):  # a link to nowhere is listed, and fails when it is read
            found[f] = storage.stat_stamp(f) or "absent"
    return dict(sorted(found.items()))


def fingerprint(key: bytes, files: list[str], stamps: dict[str, str], about: object = None) -> str:
    """A keyed digest of ``files``' stamps (from ``stamps``, the listing; a file it lacks is stat'ed) and of
    ``about`` (what planning read about them): a slide rescanned in place, a series that gained a file or an image
    whose boxes were redrawn gets another; no file name can be guessed from it."""
    stamped = [f"{f} {stamps.get(f) or storage.stat_stamp(f) or 'absent'}" for f in sorted(files)]
    return pseudonym(key, "fingerprint", json.dumps([stamped, about], sort_keys=True, default=str))


def stem(location: str) -> str:
    """File name without directories and extension (``a/b/006388_0.tif`` -> ``006388_0``)."""
    name = location.rstrip("/").rsplit("/", 1)[-1]
    return name.split(".", 1)[0]


def mirax_companions(slide: str, sorted_locations: list[str]) -> list[str]:
    """The files of MIRAX slide ``x.mrxs``'s data folder ``x/`` (its metadata and tiles, which OpenSlide reads
    beside it): those among ``sorted_locations``, or, the ``.mrxs`` named alone, the folder's listing."""
    folder = os.path.splitext(slide)[0] + "/"
    start = bisect.bisect_left(sorted_locations, folder)
    end = start
    while end < len(sorted_locations) and sorted_locations[end].startswith(folder):
        end += 1
    return sorted_locations[start:end] or sorted(storage.list_urls(folder))


VMS_GROUPS = ("Virtual Microscope Specimen", "Uncompressed Virtual Microscope Specimen")
VMS_FILE_KEYS = ("ImageFile", "MapFile", "OptimisationFile", "MacroImage")


def vms_companions(slide: str, text: str) -> list[str]:
    """The files a Hamamatsu VMS/VMU key file (``text``, read from ``slide``) names beside it: its images (JPEG or
    NGR; ``ImageFile``, ``ImageFile(x,y)``), map, optimisation file and macro; empty when it is not one."""
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.optionxform = str  # keys are case-sensitive (ImageFile(0,1))
    try:
        parser.read_string(text)
    except configparser.Error:
        return []
    group = next((g for g in VMS_GROUPS if parser.has_section(g)), None)
    if group is None:
        return []
    folder = slide.rsplit("/", 1)[0]
    names = {v.strip() for k, v in parser.items(group) if k.startswith(VMS_FILE_KEYS) and v.strip()}
    return sorted(f"{folder}/{n}" for n in names if "/" not in n and "\\" not in n and n not in ("", ".", ".."))


def companions_of(slide: str, locations: list[str]) -> list[str]:
    """The files a multi-file slide needs beside it (none for other files): a MIRAX slide's data folder, or the
    images a Hamamatsu VMS/VMU key file names. An unreadable key file has none: opening the slide then fails with
    OpenSlide's reason."""
    ext = os.path.splitext(slide)[1].lower()
    if ext == ".mrxs":
        return mirax_companions(slide, locations)
    if ext in (".vms", ".vmu"):
        try:
            text = storage.get_bytes(slide, 1 << 20).decode("utf-8", "replace")
        except storage.StorageError:  # recorded when the slide fails to open
            return []
        return vms_companions(slide, text)
    return []
