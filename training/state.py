"""Per-run training state beyond the weights: early stopping and the best monitored value (pure)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass
class EarlyStopping:
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` epochs."""

    mode: str = "min"
    patience: int = 3
    min_delta: float = 0.0
    best: float = math.nan
    best_epoch: int = -1
    bad_epochs: int = 0

    def improved(self, value: float) -> bool:
        """Whether ``value`` beats the best so far (NaN never does)."""
        if math.isnan(value):
            return False
        if math.isnan(self.best):
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` for ``epoch``; returns whether training should stop now."""
        if self.improved(value):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> EarlyStopping:
        return cls(**state)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one rank's epoch (torch, DALI): a resumed epoch draws exactly what the original did."""
    return (seed * 1_000_003 + epoch * 1009 + rank) % 2**31


def swa_start_epoch(start: float, epochs: int) -> int:
    """First epoch whose weights enter the average (``start`` is a fraction of ``epochs``)."""
    return min(epochs - 1, math.floor(start * epochs))
