"""What the slide benchmarks share: their ``--size``/``--repeats``/``--workdir`` arguments and the synthetic
JPEG-tiled pyramidal TIFF they read, generated once into the work folder and reused by later runs."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np


def slide_args(doc: str, repeats: int) -> argparse.Namespace:
    """The parsed ``--size`` (default 8192), ``--repeats`` and ``--workdir`` of a benchmark described by ``doc``."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--workdir", default=None)
    return ap.parse_args()


def synthetic_slide(args: argparse.Namespace, name: str, icc: bytes | None = None) -> tuple[Path, Path]:
    """``(work folder, slide)``: ``<name><size>.tif`` there, a synthetic slide of ``args.size`` px (with ``icc``,
    an embedded colour profile), written unless an earlier run left it."""
    from ingest.synthetic import slide_array, write_pyramid_tiff

    root = Path(args.workdir or tempfile.mkdtemp(prefix=f"tessera-{name}-"))
    root.mkdir(parents=True, exist_ok=True)
    slide = root / f"{name}{args.size}.tif"
    if not slide.exists():
        write_pyramid_tiff(slide, slide_array(args.size, "CE", np.random.default_rng(0)), icc=icc)
    return root, slide
