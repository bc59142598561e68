"""How a Ray Train run ends when it does not finish: interrupted (Ctrl+C, SIGTERM) or failed. Each is said in
one line (why, and what the run has done) with the command that continues it from its checkpoints."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

REASON_CHARS = 400  # a failure's reason, at most: the line must stay one line on a terminal's scroll-back


class RunFailed(RuntimeError):
    """A Ray Train run that failed, said in one line (the CLI prints it without a type or traceback)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl+C (or SIGTERM) stopped a Ray Train run; its checkpoints stay (``tessera train --resume``)."""


@contextlib.contextmanager
def interrupted_as(message: Callable[[], str]) -> Iterator[None]:
    """Around ``TorchTrainer.fit()``. In the main thread its SIGINT handler aborts the run's workers, then exits
    the process with a ``SystemExit`` that says nothing (status 1), and stays installed after the run; an
    interrupt raised otherwise (SIGTERM: see ``cluster.cli``) leaves the run's workers to Ray. Either becomes
    :class:`RunInterrupted` saying ``message()`` (status 130 in the CLI; the MLflow run KILLED)."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    except SystemExit as exc:
        raise RunInterrupted(f"interrupted: {message()}") from exc
    except KeyboardInterrupt as exc:
        raise RunInterrupted(f"{exc or 'interrupted'}: {message()}") from exc
    finally:
        if before is not None:
            signal.signal(signal.SIGINT, before)


# Ray Train's record of a run's checkpoints in the run's folder (Ray 2.60), the one it restores from
SNAPSHOT = "checkpoint_manager_snapshot.json"


def last_checkpoint(run_folder: str) -> dict | None:
    """The metrics reported with the checkpoint a resumed run continues from (``epoch``, 0-based, and ``done``);
    ``{}`` when the run has no checkpoint; None when that cannot be read (its storage is down, Ray's record
    changed)."""
    import json

    from shards import storage

    record = storage.join(run_folder, SNAPSHOT)
    try:
        if not storage.exists(record):
            return {}
        latest = json.loads(storage.get_bytes(record)).get("latest_checkpoint_result")
        return {"epoch": int(latest["metrics"]["epoch"]), "done": bool(latest["metrics"].get("done"))} if latest else {}
    except Exception:
        return None


def resume_hint(tracking_uri: str, run_id: str, epochs: int, run_folder: str | None = None) -> str:
    """What a stopped run has done, and the command that continues it: from the checkpoint Ray Train restores
    (``run_folder``: the run's folder in the storage), else as far as MLflow's epochs say. The checkpoint can be
    an epoch or two behind the epochs logged (rank 0 logs an epoch before its checkpoint is registered)."""
    from mlflow import MlflowClient

    command = f"`tessera train --resume {run_id}`"
    logged = None
    with contextlib.suppress(Exception):  # said without the count when MLflow does not answer
        logged = len(MlflowClient(tracking_uri).get_metric_history(run_id, "train_loss"))
    saved = last_checkpoint(run_folder) if run_folder else None
    if saved is not None:
        also = f" ({logged} logged)" if logged is not None and logged != saved.get("epoch", -1) + 1 else ""
        if not saved:
            return f"run {run_id} stopped before its first checkpoint{also}; {command} starts it from epoch 1"
        done = saved["epoch"] + 1
        if saved["done"] or done >= epochs:
            return f"run {run_id} has trained its epochs{also}; {command} finishes it, training no more"
        return (
            f"run {run_id} has {done} of {epochs} epochs in its last checkpoint{also}; {command} continues it "
            f"from epoch {done + 1}"
        )
    if logged == 0:
        return f"run {run_id} stopped before its first epoch ended; {command} starts it"
    if logged is not None:
        return (
            f"run {run_id} has {logged} of {epochs} epochs logged; its checkpoints are kept, and "
            f"{command} continues it from the last one"
        )
    return f"run {run_id} stopped; {command} continues it from its last checkpoint"


def failure_reason(exc: BaseException) -> str:
    """One line for a failed Ray Train run (``TrainingFailedError``): each distinct cause with the ranks it
    stopped. Ray Train's own message embeds rank 0's whole traceback, cut in the middle: the cause's name and
    text at the end of it are what a user acts on (a storage server down, a file gone, out of memory)."""
    failures = getattr(exc, "worker_failures", None)
    if not failures:
        return _said(getattr(exc, "controller_failure", None) or exc)
    ranks: dict[str, list[int]] = {}
    for rank, err in sorted(failures.items()):
        ranks.setdefault(_said(err), []).append(rank)
    return "; ".join(f"{'rank' if len(r) == 1 else 'ranks'} {', '.join(map(str, r))}: {c}" for c, r in ranks.items())


def _said(err: BaseException) -> str:
    """``Type: text`` of an error, on one line: its lines that are not indented details (Ray's actor errors list
    class, id, pid ... as tab-indented fields) or a traceback's frames."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln[:1].isspace()]
    text = " ".join(ln for ln in lines if not ln.startswith("Traceback ("))
    said = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return said if len(said) <= REASON_CHARS else said[: REASON_CHARS - 1] + "…"
