"""Command lines (and the matching configurations) the integration tests run as a user would."""

import sys

from ingest.config import WsiIngestConfig


def ingest_wsi_cmd(slides, out, *extra: str) -> list[str]:
    """``tessera ingest wsi`` of ``slides`` into ``out`` with small tiles and a 50/50 split, plus ``extra``."""
    return [
        sys.executable,
        "-m",
        "cluster.cli",
        "ingest",
        "wsi",
        str(slides),
        "--out",
        str(out),
        "--tile-size",
        "128",
        "--store-size",
        "32",
        "--split",
        "train=0.5,val=0.5",
        *extra,
    ]


def wsi_config(slides, out: str, **extra) -> WsiIngestConfig:
    """The configuration :func:`ingest_wsi_cmd` asks for, built in-process, with ``extra`` fields overriding."""
    options = {"tile_size": 128, "store_size": 32, "split": "train=0.5,val=0.5", **extra}
    return WsiIngestConfig(sources=[str(slides)], out=out, **options)
