"""What every vendor-format test checks: tiles equal OpenSlide's pixels at their recorded place and carry nothing
identifying, and a downloaded copy of a multi-file slide keeps the layout OpenSlide needs; and the slides they check."""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ingest.config import WsiIngestConfig
from ingest.slides import OpenSlideReader
from ingest.source_cache import SourceCache
from ingest.synthetic import SyntheticPatient, slide_array
from ingest.units import plan_slide, wsi_samples
from shards.schema import decode_image

PATIENT = SyntheticPatient("ROE^RICHARD", "MRN777", "19550505")
REAL_SLIDE = Path(__file__).parent / "data" / "CMU-1-Small-Region.svs"  # a real Aperio file (tests/data/README.md)


def write_slide(
    root: Path, name: str, size: int, stain: str, seed: int, write: Callable[..., object], **options
) -> tuple[Path, np.ndarray]:
    """``write(root / name, level0, PATIENT, **options)`` for ``level0 = slide_array(size, stain, seed)``: the
    slide's path and its level-0 array."""
    level0 = slide_array(size, stain, np.random.default_rng(seed))
    write(root / name, level0, PATIENT, **options)
    return root / name, level0


def check_tiles(unit, reader: OpenSlideReader, out, stem: str) -> list[dict]:
    """Cut ``unit`` into 128 px PNG tiles: each equals OpenSlide's pixels at its recorded place, and no sample
    holds the patient's identity or the file's name. Returns the samples' metadata."""
    cfg = WsiIngestConfig(sources=unit.sources[:1], out=str(out), tile_size=128, format="png")
    works, _ = plan_slide(unit, cfg)
    samples = [s for w in works for s in wsi_samples(w, cfg)]
    assert len(samples) > 5
    private = [PATIENT.name, PATIENT.patient_id, PATIENT.birth_date, stem]
    for sample in samples:
        meta = json.loads(sample["json"])
        assert np.array_equal(decode_image(sample["png"]), reader.read_region(meta["x"], meta["y"], 0, 128, 128))
        blob = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in sample.values())
        assert not any(p.encode() in blob for p in private)
    reader.close()
    return [json.loads(sample["json"]) for sample in samples]


def check_download(unit, laid_out) -> None:
    """What a worker does with a multi-file slide on s3:// (here any location counts as remote): the copy is laid
    out as ``laid_out(copy path)`` expects and OpenSlide reads the same pixels from it."""
    cache = SourceCache(slots=1, remote=lambda loc: True)
    copy = cache.path(unit.sources)
    assert copy != unit.sources[0] and laid_out(copy)
    original, local = OpenSlideReader(unit.sources[0]), OpenSlideReader(copy)
    assert np.array_equal(original.read_region(300, 300, 0, 200, 200), local.read_region(300, 300, 0, 200, 200))
    original.close(), local.close()
    cache.clear()
