"""Sample metadata by column: the samples read back as they went in (what evaluation keeps of them), in a small
fraction of the bytes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from training.metas import KEPT, Metas, values


def _tiles(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "label": 1,
            "level": 0,
            "mpp": 0.5,
            "patient": f"p{i % 7:015d}",
            "size0": 600,
            "slide": f"{i % 13:016x}",
            "tissue": float(rng.random()),
            "width_um": 300.0,
            "x": int(rng.integers(0, 100_000)),
            "y": int(rng.integers(0, 100_000)),
        }
        for i in range(n)
    ]


def _kept(d: dict) -> dict:
    return {k: v for k, v in d.items() if k in KEPT and v is not None}


def test_samples_read_back_as_they_went_in_less_what_evaluation_does_not_read():
    samples = [*_tiles(5), {"series": "s", "slices": [3, 4], "patient": "q", "mpp": 1}, {"image": "i", "x": None}]
    metas = Metas.of(samples)
    assert len(metas) == 7
    assert list(metas) == [_kept(d) for d in samples] == [metas[i] for i in range(7)]
    assert metas[-1] == {"image": "i"} and metas[1:3] == [_kept(d) for d in samples[1:3]]
    assert values(metas, "slices") == [None] * 5 + [[3, 4], None]
    assert values(metas, "level") == [None] * 7  # not kept
    assert values(samples, "patient") == values(metas, "patient")  # a list of dicts reads alike
    with pytest.raises(IndexError):
        metas[7]


def test_parts_join_in_order_whatever_their_columns():
    a, b = _tiles(4), [{"series": "s", "slices": [1]}, {"patient": "p000000000000001", "x": 3.5}]
    joined = Metas.concat([Metas.of(a), Metas.of([]), Metas.of(b)])
    assert list(joined) == [_kept(d) for d in a + b]
    assert values(joined, "x")[-1] == 3.5 and isinstance(values(joined, "x")[0], int)  # each value's own type
    assert len(Metas.concat([])) == 0 and list(Metas.concat([])) == []


def test_a_cohorts_metadata_takes_a_fraction_of_the_memory():
    """As the samples' JSON decodes (a dict per sample) against by column, in bytes held; and the columns cross a
    gather (pickle) intact, in fewer bytes too."""
    import json
    import tracemalloc

    encoded = [json.dumps(d) for d in _tiles(20_000)]
    tracemalloc.start()
    try:
        samples = [json.loads(e) for e in encoded]
        as_dicts = tracemalloc.get_traced_memory()[0]
        metas = Metas.of(samples)
        del samples
        as_columns = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert as_columns * 10 < as_dicts  # about 1 KB a sample against about 50 B
    wire = pickle.dumps(metas)
    assert len(wire) * 3 < 2 * len(pickle.dumps([json.loads(e) for e in encoded]))  # measured: about half
    assert list(pickle.loads(wire)) == [_kept(json.loads(e)) for e in encoded]
