"""What a training run prints: one line per epoch, and not the libraries' routine chatter.

Left alone, Ray Train logs each report of each worker with its whole metric dict, MLflow draws download bars in
every worker and prints the run's link that Tessera prints already, and torch and DeepSpeed warn about
deprecations in calls Tessera cannot change (DeepSpeed's ZeRO; the TorchScript export quiets its own): what a
user wants to see of a run drowned in that. ``TESSERA_DEBUG=1`` keeps all of it.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEBUG_ENV = "TESSERA_DEBUG"
# Python warnings (message regexes matched at the start, and their category) that say nothing a user can act on.
LIBRARY_WARNINGS = (
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated", FutureWarning),  # DeepSpeed's ZeRO gathers
    # torch, on each rank of an NCCL group made without a device (as Ray Train makes them), at the barrier of
    # DeepSpeed's checkpoint save: it uses the device the rank was given, as it should (seen on an H200)
    (r"barrier\(\): using the device under current context", UserWarning),
)

# Lines that libraries print (no logger to quiet): DeepSpeed's CPU backend, once on every worker of every run.
ROUTINE_PRINTS = re.compile(r"DeepSpeed \S+ built successfully")
# DeepSpeed's warnings that say nothing a user can act on: ZeRO wraps any torch optimiser, and the papers' SGD and
# RMSprop (Tessera allows them: ``zero_allow_untested_optimizer``) drew this on every worker of every run.
ROUTINE_WARNINGS = re.compile(r"\**\s*You are using ZeRO with an untested optimizer")

# Lines of the cluster's processes that the driver would print, and that say nothing a user can act on: Ray
# Train's controller starts a preemption watcher with actor handles as arguments, and Ray's core logs an error
# about that (ray-project/ray#53727) for every run.
RAY_ROUTINE_LINES = re.compile(r".*Actor with class name: 'PreemptionWatcher' .*has constructor arguments")
# A warning of Ray Train's controller, with its traceback, that says nothing a user can act on: it asks Ray's
# autoscaling coordinator for the run's resources, waits 5 s, and asks again 20 s later; on a cold cluster the
# coordinator's actor takes longer to start (a "GetTimeoutError" and 17 lines of traceback at the start of every
# run on an H200 host). Its traceback with another error stays.
RAY_ROUTINE_TIMEOUT = (re.compile(r".*Failed to send resource request for "), "ray.exceptions.GetTimeoutError")
# Ray Train's controller, when the cluster has had no room for the run's workers for a minute (another run or an
# ingest holds its CPUs, or nodes are yet to join), logs an error with 30 lines of traceback, and again each minute
# as it goes on waiting: one line of Tessera's says so instead.
RAY_STARTUP_TIMEOUT = (
    re.compile(r"Error in control loop iteration: The worker group startup timed out after (\S+) seconds waiting "
               r"for (\d+) workers"),
    "ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError",
)  # fmt: skip


def elapsed(seconds: float) -> str:
    """A span of time as a person reads it: ``60 s``, ``11 min``, ``3 h``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.0f} h"


def startup_wait_line(seconds: str, workers: str, times: int = 1) -> str:
    """What the driver prints for Ray Train's :data:`RAY_STARTUP_TIMEOUT` error, the ``times``-th of a run."""
    every = float(seconds)
    return (
        f"the run's {workers} workers have waited {elapsed(every * times)} for room on the cluster (Ray Train asks "
        f"again every {every:g} s): other work holds what they need, or nodes are yet to join (`tessera status` "
        "shows what holds it)"
    )


# Ray's driver folds lines that differ only in words with digits and come from several processes within 5 s into
# one "[repeated Nx across cluster]": the epoch lines of a sweep's trials side by side, each but the last lost.
EPOCH_LINE = r" epoch \d+/\d+: "


def debugging() -> bool:
    return bool(os.environ.get(DEBUG_ENV))


def train_log_level() -> str:
    """Ray Train's own log level (its ``LoggingConfig``): its resource requests, worker group and checkpoint
    lines (Ray's default, INFO) only when debugging; its warnings and errors always."""
    return "INFO" if debugging() else "WARNING"


def quiet_libraries() -> None:
    """In the driver (the CLI) and in workers: leave out the libraries' routine lines (none when debugging). In
    the driver before Ray is imported, which reads which lines it never folds then."""
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", EPOCH_LINE)
    if not sys.stdout.isatty():  # Ray colours each forwarded line's "(pid=...)" prefix: escape codes in a log file
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if debugging():
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # Tessera prints the run's link
    logging.getLogger("mlflow.store.model_registry.abstract_store").setLevel(logging.WARNING)  # "Waiting up to"
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)  # a sweep trial's "Checkpoint ..."
    for message, category in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_worker() -> None:
    """:func:`quiet_libraries` in a Ray Train worker, and Ray Train's line per report; without CUDA, also torch's
    JIT-build helper (DeepSpeed's CPU ops), which warns on every worker that it found none."""
    import torch

    quiet_libraries()
    if debugging():
        return
    if not torch.cuda.is_available():
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(not_routine)  # once, however often a worker process calls this
    logging.getLogger(WORKER_ERRORS).addFilter(shorten_worker_error)
    with contextlib.suppress(ImportError, AttributeError):
        # "Reporting training result N: TrainingReport(...)" per report and worker, on a logger named after its
        # file, so Ray Train's log level does not reach it
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)


# Ray Train's worker logs each error of the training function with its whole traceback: about 45 lines per
# worker and attempt (270 for a run that failed on two workers after two retries), printed by the driver above
# the run's one-line reason. Each is shortened to a line that names the file of the whole traceback.
WORKER_ERRORS = "ray.train.v2._internal.util"
WORKER_ERROR_START = "Error in training function:"


def shorten_worker_error(record: logging.LogRecord) -> bool:
    """A logging filter: a worker's error with its traceback becomes one line, the exception and the innermost
    frame of Tessera's code; the traceback goes to a file in Ray's log folder of the node."""
    message = record.getMessage()
    if not message.startswith(WORKER_ERROR_START):
        return True
    where = _save_traceback(message)
    record.msg, record.args = f"{WORKER_ERROR_START} {error_summary(message)}; whole traceback: {where}", ()
    return True


def error_summary(traceback_text: str) -> str:
    """The exception a traceback ends with and the innermost frame in Tessera's packages (``file:line in
    function``)."""
    lines = [line for line in traceback_text.splitlines() if line.strip()]
    raised = next((line for line in reversed(lines) if not line[0].isspace()), lines[-1]).strip()
    root = str(Path(__file__).resolve().parents[1]) + os.sep
    frames = re.findall(r'^\s*File "([^"]+)", line (\d+), in (\S+)', traceback_text, flags=re.MULTILINE)
    ours = [(f[len(root) :], n, fn) for f, n, fn in frames if f.startswith(root) and "site-packages" not in f]
    return f"{raised} (at {ours[-1][0]}:{ours[-1][1]} in {ours[-1][2]})" if ours else raised


def _save_traceback(text: str) -> str:
    """Write ``text`` into Ray's log folder of this node (where Ray's dashboard and ``ray logs`` find it; the
    temporary folder where that is not known); returns ``<node ip>:<path>``."""
    import tempfile

    import ray

    folder = tempfile.gettempdir()
    with contextlib.suppress(Exception):
        folder = ray._private.worker.global_worker.node.get_logs_dir_path()
    path = Path(folder) / f"tessera-error-{os.getpid()}-{int(time.time())}.txt"
    try:
        path.write_text(text)
    except OSError as exc:
        return f"not saved ({exc}); TESSERA_DEBUG=1 prints it"
    ip = "?"
    with contextlib.suppress(Exception):
        ip = ray.util.get_node_ip_address()
    return f"{ip}:{path}"


def drop_ray_routine_lines() -> None:
    """After ``ray.init`` in the driver: the cluster's lines it prints leave out :data:`RAY_ROUTINE_LINES` (none
    when debugging). Ray's dispatcher of those lines takes no filter, so its printing handler is wrapped."""
    if debugging():
        return
    with contextlib.suppress(ImportError, AttributeError):
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            dispatcher.handlers = [
                (name, _without_routine_lines(handler) if name == "ray_print_logs" else handler)
                for name, handler in dispatcher.handlers
            ]


def _without_routine_lines(handler):
    if getattr(handler, "drops_routine_lines", False):
        return handler

    waits: dict[Any, list[int]] = collections.defaultdict(lambda: [0])  # a run's controller process: its waits

    def handle(data: dict[str, Any]) -> None:
        lines = without_routine_lines(data.get("lines", []), waits[data.get("pid")])
        if lines:
            handler({**data, "lines": lines})

    handle.drops_routine_lines = True  # type: ignore[attr-defined]
    return handle


def without_routine_lines(lines: list[str], waits: list[int] | None = None) -> list[str]:
    """``lines`` (one batch of a process's lines, as Ray's driver gets them) without :data:`RAY_ROUTINE_LINES`
    and :data:`RAY_ROUTINE_TIMEOUT`'s warning with its traceback; :data:`RAY_STARTUP_TIMEOUT`'s error with its
    traceback as one line (:func:`startup_wait_line`), counted in ``waits[0]`` (the process's count so far, kept
    by the caller across batches). A block whose end is another error, or not in the batch, stays whole."""
    waits = [0] if waits is None else waits
    blocks = ((*RAY_ROUTINE_TIMEOUT, None), (*RAY_STARTUP_TIMEOUT, startup_wait_line))
    kept: list[str] = []
    held: list[str] = []  # a block and its traceback so far
    block = None  # the held block's (start, error, line) and the start's match
    for line in lines:
        if RAY_ROUTINE_LINES.match(line):
            continue
        starts = [(b, m) for b in blocks if (m := b[0].match(line))]
        if starts:
            kept += held
            held, block = [line], starts[0]
        elif held and (line.startswith((" ", "Traceback ")) or not line.strip()):
            held.append(line)
        elif held and block is not None:
            (_, error, says), found = block
            if not line.startswith(error):
                kept += [*held, line]
            elif says is not None:
                waits[0] += 1
                kept.append(says(*found.groups(), waits[0]))
            held, block = [], None
        else:
            kept.append(line)
    return kept + held


def not_routine(record: logging.LogRecord) -> bool:
    """A logging filter: False for :data:`ROUTINE_WARNINGS`."""
    return not ROUTINE_WARNINGS.match(record.getMessage())


@contextlib.contextmanager
def routine_prints_dropped() -> Iterator[None]:
    """Hold back what the block prints to stdout, then pass on every line but :data:`ROUTINE_PRINTS` (all of it
    when debugging, or when the block fails)."""
    if debugging():
        yield
        return
    held = io.StringIO()
    failed = True
    try:
        with contextlib.redirect_stdout(held):
            yield
        failed = False
    finally:
        lines = held.getvalue().splitlines(keepends=True)
        sys.stdout.write("".join(line for line in lines if failed or not ROUTINE_PRINTS.fullmatch(line.strip())))


def epoch_line(run: str, metrics: dict[str, Any], epochs: int, monitor: str, levels: list[str]) -> str:
    """One epoch of ``run`` in a line: losses, the monitored metric, accuracy (or AUC) per level, throughput."""
    keys = ["train_loss", "val_loss", monitor, "val_accuracy", "val_auc", *(f"val_{lv}_accuracy" for lv in levels)]
    keys += ["val_map50", "val_precision", "val_recall", "val_image_accuracy"] if "val_map50" in metrics else []
    values = {k: metrics.get(k) for k in [*keys, "val_swa_loss"]}
    shown = [f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, int | float) and not math.isnan(v)]
    line = f"{run} epoch {int(metrics['epoch']) + 1}/{epochs}: " + "  ".join(shown)
    if "train_seconds" in metrics:
        line += f"  ({metrics['train_seconds']:.1f} s training, {metrics['train_samples_per_s']:.1f} samples/s)"
    return line


def epoch_lines(epochs: int, monitor: str, levels: list[str]):
    """A Ray Train callback (it runs in the run's controller) that prints rank 0's :func:`epoch_line` for each
    report."""
    from ray.train.v2.api.callback import UserCallback

    class EpochLines(UserCallback):
        def after_report(self, run_context, metrics, checkpoint) -> None:
            if metrics and "epoch" in metrics[0]:
                name = run_context.get_run_config().name
                print(epoch_line(name, metrics[0], epochs, monitor, levels), flush=True)

    return EpochLines()
