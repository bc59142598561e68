"""The learning curves a run gets: one PNG per group of metrics the run has, none for groups it lacks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.plots import log_curves


class _Collect:
    """A RunLogger's ``artifact``, keeping what each PNG showed."""

    def __init__(self) -> None:
        self.sizes: dict[str, tuple[int, int]] = {}

    def artifact(self, path: Path) -> None:
        with Image.open(path) as im:
            self.sizes[path.name] = im.size


def test_curves_only_for_the_metrics_a_run_logged():
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "lr": 0.1 * e} for e in (1, 2, 3)]
    got = _Collect()
    log_curves(got, history)
    assert set(got.sizes) == {"curve_loss.png", "curve_lr.png"}  # no accuracy or log-loss metrics were logged
    assert all(w > 100 and h > 100 for w, h in got.sizes.values())


def test_no_history_no_curves():
    got = _Collect()
    log_curves(got, [])
    assert got.sizes == {}


@pytest.mark.parametrize("task,classes", [("multiclass", 2), ("multiclass", 3), ("multilabel", 2)])
def test_a_reliability_diagram_for_each_task(tmp_path, task, classes):
    """Drawn for each task, a class absent from the labels (no curve of one outcome) passed over."""
    from training.plots import calibration_png

    rng = np.random.default_rng(0)
    p = rng.random((60, classes))
    if task == "multilabel":
        y = (rng.random((60, classes)) < p).astype(int)  # calibrated by construction
    else:
        p = p / p.sum(1, keepdims=True)
        y = np.array([rng.choice(classes, p=row) for row in p])
        y[y == classes - 1] = 0  # the last class absent
    path = calibration_png(y, p, [f"c{k}" for k in range(classes)], task, tmp_path / "cal.png", "test, sample level")
    with Image.open(path) as image:
        assert image.size == (504, 480)
