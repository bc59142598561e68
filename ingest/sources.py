"""Expand SRC arguments (files, directories, globs, ``s3://`` prefixes) into input locations."""

from __future__ import annotations

import bisect
import configparser
import glob
import os
from collections.abc import Iterable

from shards import storage

SLIDE_EXTS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


def expand(sources: Iterable[str], exts: tuple[str, ...] | None = None) -> list[str]:
    """Every file named by ``sources``, de-duplicated and sorted; directories and prefixes recurse.

    ``exts`` filters files found by recursion (a file named directly is always kept). A source that
    matches nothing raises ``FileNotFoundError`` naming it.
    """
    found: set[str] = set()
    for src in sources:
        if src.startswith("s3://"):
            urls = list(storage.list_urls(src))
            found.update(u for u in urls if exts is None or u.lower().endswith(exts) or u == src)
            if not urls:
                raise FileNotFoundError(f"{src}: no objects under this prefix")
            continue
        matches = glob.glob(src, recursive=True) if glob.has_magic(src) else [src]
        if not matches or not any(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"{src}: no such file or directory")
        for m in matches:
            if os.path.isdir(m):
                for root, _, files in os.walk(m):
                    found.update(
                        os.path.abspath(os.path.join(root, f))
                        for f in files
                        if exts is None or f.lower().endswith(exts)
                    )
            elif os.path.isfile(m):
                found.add(os.path.abspath(m))
    return sorted(found)


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
