"""Held-out confidence intervals: Tessera's patient bootstrap against scikit-learn's metrics on resampled copies.

One run, the same resamples of the same patients for both: a binary classifier's tiles (``--tiles`` of
``--patients``, at sample level) and a multi-label one's slices (RSNA's six labels, ``--slices``). The baseline
copies each resample's samples (every sample of a drawn patient, as often as drawn) and calls
:func:`training.metrics.classification_metrics` / ``multilabel_metrics`` on the copy; Tessera weighs each sample by
its patient's draws (:mod:`training.intervals`). Prints seconds per resample of each and the ratio.
Usage: ``python benchmarks/intervals.py [--tiles 50000] [--slices 20000] [--patients 200] [--resamples 100]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from training.intervals import bootstrap, class_statistic, clusters_of, label_statistic, resamples
from training.levels import with_interval
from training.metrics import classification_metrics, multilabel_metrics

RSNA = ["any", "epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural"]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _compare(what: str, stat, reference, clusters: np.ndarray, count: int) -> None:
    """Both sides over the same ``count`` resamples; checks they agree on the first."""
    n = len(clusters)
    copies = [np.repeat(np.arange(n), w.astype(np.int64)) for w in resamples(clusters, count, seed=0)]
    first = next(resamples(clusters, 1, seed=0))
    ours, theirs = stat(first), reference(copies[0])
    assert all(abs(ours[k] - theirs[k]) < 1e-9 or np.isnan(ours[k]) for k in ours), "the two sides differ"
    base = _timed(lambda: [reference(idx) for idx in copies])
    tessera = _timed(lambda: bootstrap(stat, clusters, with_interval, count))
    print(
        f"{what}: scikit-learn on copies {base / count * 1e3:.1f} ms a resample, Tessera {tessera / count * 1e3:.1f} "
        f"ms: {base / tessera:.1f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=50000)
    parser.add_argument("--slices", type=int, default=20000)
    parser.add_argument("--patients", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    patients = rng.integers(0, args.patients, args.tiles)
    y = patients % 2
    p1 = np.clip(0.3 * y + 0.7 * rng.random(args.tiles), 0, 1)
    p = np.stack([1 - p1, p1], 1)
    calls = p.argmax(1)
    names = ["CE", "LAA"]

    def tiles_reference(idx):
        return {k: v for k, v in classification_metrics(y[idx], p[idx], classes=names).items() if with_interval(k)}

    what = f"{args.tiles} tiles of {args.patients} patients, binary"
    _compare(what, class_statistic(y, p, names, calls), tiles_reference, clusters_of(patients.tolist()), args.resamples)

    patients = rng.integers(0, args.patients, args.slices)
    labels = (rng.random((args.slices, 6)) < 0.15).astype(np.int64)
    scores = np.clip(0.5 * labels + 0.5 * rng.random((args.slices, 6)), 0, 1)

    def slices_reference(idx):
        found = multilabel_metrics(labels[idx], scores[idx], RSNA, threshold=0.5)
        return {k: v for k, v in found.items() if with_interval(k)}

    what = f"{args.slices} slices of {args.patients} patients, RSNA's 6 labels"
    stat = label_statistic(labels, scores, RSNA, 0.5)
    _compare(what, stat, slices_reference, clusters_of(patients.tolist()), args.resamples)


if __name__ == "__main__":
    main()
