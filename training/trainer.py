"""The Ray Train trainer of every worker group Tessera starts (a training run, a held-out evaluation, predict).

Ray Train's data-parallel trainer starts a ``DatasetManager`` actor for each worker group, to split Ray Data
datasets between its workers, whether or not the trainer was given any. Tessera's workers read their shards with
DALI and are given none: that actor was a Python process started, importing Ray's data modules, and stopped for
nothing at every start of every worker group (1.6-1.9 CPU-seconds each on the local stack).
"""

from __future__ import annotations

import functools
from typing import Any


def torch_trainer(loop, **options: Any):
    """A ``TorchTrainer`` of ``loop`` (``options`` as TorchTrainer takes them) that starts no dataset manager
    when it is given no datasets."""
    from ray.train.torch import TorchTrainer

    cls = TorchTrainer if options.get("datasets") else _without_datasets(TorchTrainer)
    return cls(loop, **options)


@functools.cache
def _without_datasets(trainer: type) -> type:
    """``trainer`` without its datasets callback (the dataset manager's); ``trainer`` itself where this Ray's
    Train has no such callback to leave out (another release: its own trainer, unchanged)."""
    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    except ImportError:
        return trainer
    if not hasattr(trainer, "_create_default_callbacks"):
        return trainer

    class WithoutDatasets(trainer):
        def _create_default_callbacks(self) -> list:
            return [c for c in super()._create_default_callbacks() if not isinstance(c, DatasetsCallback)]

    WithoutDatasets.__name__ = WithoutDatasets.__qualname__ = trainer.__name__
    return WithoutDatasets
