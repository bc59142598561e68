"""The learning curves a run gets: one PNG per group of metrics the run has, none for groups it lacks."""

from __future__ import annotations

from pathlib import Path

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
