"""Command lines the integration tests run as a user would."""

import sys


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
