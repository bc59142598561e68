"""A Tune callback that tells an interrupted sweep from a finished one (Ray is imported here, not by the CLI)."""

from __future__ import annotations

from ray import tune


class OpenTrials(tune.Callback):
    """How many trials had not ended when Tune's loop last stepped.

    On Ctrl+C, Tune saves its state (pending and running trials as unfinished, which is what ``--resume`` reads)
    and then, cleaning up, marks those trials TERMINATED: afterwards a trial that never started looks like one
    that ended. The count taken inside the loop does not. A class attribute, because ``Tuner.restore`` builds
    its own instance from the saved run configuration.
    """

    count = 0

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        OpenTrials.count = sum(not t.is_finished() for t in trials)
