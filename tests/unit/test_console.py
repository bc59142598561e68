"""What a training run prints: its epoch line, and which library lines it leaves out."""

import math
import os
import re
import time
import warnings
from pathlib import Path

import pytest

from training.console import epoch_line, quiet_libraries, routine_prints_dropped, train_log_level

METRICS = {
    "epoch": 1, "train_loss": 1.42944, "train_accuracy": 0.88, "val_loss": 0.43711, "val_accuracy": 0.93388,
    "val_auc": 0.95066, "val_weighted_log_loss": 0.46373, "val_slide_accuracy": 1.0, "val_patient_accuracy": 0.5,
    "lr": 0.003, "done": False, "train_seconds": 1.25, "train_samples_per_s": 256.0,
}  # fmt: skip


def test_an_epoch_line_gives_losses_the_monitored_metric_each_levels_accuracy_and_throughput():
    line = epoch_line("strip-1a2b", METRICS, 3, "val_weighted_log_loss", ["slide", "patient"])
    assert line == (
        "strip-1a2b epoch 2/3: train_loss 1.4294  val_loss 0.4371  val_weighted_log_loss 0.4637  "
        "val_accuracy 0.9339  val_auc 0.9507  val_slide_accuracy 1.0000  val_patient_accuracy 0.5000  "
        "(1.2 s training, 256.0 samples/s)"
    )


def test_an_epoch_line_leaves_out_what_is_absent_or_undefined_and_shows_the_monitor_once():
    multilabel = {"epoch": 0, "train_loss": 0.7, "val_loss": 0.6, "val_rsna_log_loss": 0.65, "val_auc": math.nan}
    line = epoch_line("rsna", multilabel, 1, "val_loss", ["series"])
    assert line == "rsna epoch 1/1: train_loss 0.7000  val_loss 0.6000"


def _warned(message: str, category: type[Warning] = FutureWarning) -> list:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn(message, category, stacklevel=1)
    return seen


def test_quiet_libraries_drops_the_named_deprecations_only_and_debugging_keeps_everything(monkeypatch):
    for var in ("TESSERA_DEBUG", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("RAY_DEDUP_LOGS_ALLOW_REGEX", raising=False)
    assert _warned("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...") == []
    assert len(_warned("`torch.load` default changed")) == 1  # another deprecation is still shown
    barrier = "barrier(): using the device under current context. You can specify `device_id` in ..."
    assert _warned(barrier, UserWarning) == [] and len(_warned("barrier(): another", UserWarning)) == 1
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"  # no download bars in every worker
    assert train_log_level() == "WARNING"
    # Ray's driver never folds epoch lines of trials side by side into one "[repeated 2x across cluster]"
    line = epoch_line("demo-1a2b3c", METRICS, 3, "val_loss", [])
    assert re.search(os.environ["RAY_DEDUP_LOGS_ALLOW_REGEX"], line)

    monkeypatch.setenv("TESSERA_DEBUG", "1")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    assert len(_warned("`torch.distributed.all_gather_into_tensor` is deprecated.")) == 1
    assert len(_warned(barrier, UserWarning)) == 1
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    assert train_log_level() == "INFO"


@pytest.mark.parametrize("terminal", [True, False])
def test_the_lines_ray_forwards_carry_no_colour_codes_into_a_file(terminal, monkeypatch):
    """Ray colours the "(TrainController pid=...)" prefix of each line it forwards to the driver: kept on a
    terminal, left out where the output goes to a file or a job's log."""
    import io

    from ray._private.worker import print_worker_logs

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    out = io.StringIO()
    monkeypatch.setattr(out, "isatty", lambda: terminal)
    monkeypatch.setattr("sys.stdout", out)
    quiet_libraries()
    data = {"pid": "4242", "ip": "10.0.0.1", "localhost": "10.0.0.1", "actor_name": "TrainController"}
    print_worker_logs(data | {"lines": ["demo-1a2b3c epoch 1/3: train_loss 0.5"]}, out)
    assert ("\x1b[" in out.getvalue()) is terminal
    assert "(TrainController pid=4242) demo-1a2b3c epoch 1/3: train_loss 0.5" in out.getvalue().replace("\x1b[0m", "")


@pytest.mark.parametrize("terminal", [True, False])
def test_an_ingests_progress_bar_is_drawn_twice_not_per_input_into_a_file(terminal, monkeypatch):
    """Into a file or a job's log every redraw stays: the bar is drawn at its start and end (and every 30 s),
    not at tqdm's 0.1 s pace, which a terminal keeps."""
    import io

    from tqdm import tqdm

    from ingest.progress import bar_interval

    err = io.StringIO()
    monkeypatch.setattr(err, "isatty", lambda: terminal)
    monkeypatch.setattr("sys.stderr", err)
    assert bar_interval() == (0.1 if terminal else 30.0)
    if not terminal:
        bar = tqdm(total=500, desc="ingest wsi", unit="input", file=err, mininterval=bar_interval())
        for _ in range(500):  # over about 0.3 s: tqdm's 0.1 s pace would draw it some 4 times
            bar.update(1)
            time.sleep(0.0005)
        bar.close()
        assert err.getvalue().count("ingest wsi:") == 2 and "500/500" in err.getvalue()


def test_a_long_listing_is_counted_on_a_bar_and_a_short_one_is_not(tmp_path, monkeypatch, capsys):
    """Listing an object-store prefix of a million objects takes a thousand requests before planning starts: the
    driver counts them once a listing is long; every object comes through, in order, either way."""
    from ingest import progress, sources

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert list(progress.counted(range(50), "listing", " objects", least=51)) == list(range(50))
    assert capsys.readouterr().err == ""
    assert list(progress.counted(range(50), "listing", " objects", least=20)) == list(range(50))
    err = capsys.readouterr().err
    assert "listing: 19 objects" in err and "listing: 50 objects" in err  # drawn from the 20th on

    objects = [(f"s3://b/ct/{i}.dcm", f"{i}:etag") for i in range(5)]
    monkeypatch.setattr(sources.storage, "list_stamps", lambda prefix: iter(objects))  # a prefix's pages
    monkeypatch.setattr(sources, "LIST_BAR_OBJECTS", 3)
    assert sources.listing(["s3://b/ct"]) == dict(objects)
    assert "listing: 5 objects" in capsys.readouterr().err


@pytest.fixture(autouse=True)
def _restore_env():
    """quiet_libraries sets MLflow's variables with setdefault; monkeypatch restores what it deleted, not these."""
    before = dict(os.environ)
    yield
    for key in set(os.environ) - set(before):
        del os.environ[key]


@pytest.mark.parametrize("debug", ["", "1"])
def test_deepspeeds_build_line_is_dropped_and_every_other_print_kept(debug, monkeypatch, capsys):
    monkeypatch.setenv("TESSERA_DEBUG", debug)
    built = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"
    with routine_prints_dropped():
        print("before")
        print(built)
        print("after", end="")
    assert capsys.readouterr().out == ("before\nafter" if not debug else f"before\n{built}\nafter")


def test_a_failing_block_keeps_all_it_printed(capsys):
    with pytest.raises(RuntimeError), routine_prints_dropped():
        print("DeepSpeed x built successfully")
        raise RuntimeError("boom")
    assert capsys.readouterr().out == "DeepSpeed x built successfully\n"


@pytest.mark.parametrize("debug", ["", "1"])
def test_the_driver_prints_the_clusters_lines_but_ray_cores_preemption_watcher_error(debug, monkeypatch):
    """Ray's core logged an error line per run about Ray Train's own preemption watcher (ray-project/ray#53727);
    the driver's printing handler (Ray's, here a recorder under its name) gets every other line."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from training.console import drop_ray_routine_lines

    monkeypatch.setenv("TESSERA_DEBUG", debug)
    watcher = (
        "[2026-12-02 18:25:26,880 E 2707 2736] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and "
        "ID: 'b53f48f3c752601649f3f45801000000' has constructor arguments in the object store and max_restarts > 0."
    )
    epoch = "demo_tiles-cf51 epoch 1/3: train_loss 2.8061"
    printed: list[list[str]] = []
    monkeypatch.setattr(dispatcher, "handlers", [("ray_print_logs", lambda data: printed.append(data["lines"]))])
    drop_ray_routine_lines()
    drop_ray_routine_lines()  # a second connection wraps it once
    dispatcher.emit({"lines": [watcher, epoch], "pid": 1, "is_err": False})
    dispatcher.emit({"lines": [watcher], "pid": 1, "is_err": True})
    assert printed == ([[epoch]] if not debug else [[watcher, epoch], [watcher]])


def _failing_read() -> None:
    try:
        raise ConnectionRefusedError(111, "Connection refused")
    except OSError as exc:
        raise RuntimeError("s3://shards/ds/train/shard-000000.tar: could not connect") from exc


def test_a_workers_error_is_one_line_naming_the_exception_the_frame_and_the_file_of_its_traceback(tmp_path):
    """As Ray Train's worker logs it (``construct_user_exception_with_traceback``): with the whole traceback,
    about 45 lines per worker and attempt above the run's one-line reason."""
    import logging
    import traceback

    from training.console import WORKER_ERRORS, shorten_worker_error

    try:
        _failing_read()
    except RuntimeError:
        text = traceback.format_exc()
    logged = "Error in training function:\n%s"
    record = logging.LogRecord(WORKER_ERRORS, logging.ERROR, "util.py", 252, logged, (text,), None)
    assert shorten_worker_error(record)
    line = record.getMessage()
    assert "\n" not in line
    summary, saved = line.split("; whole traceback: ")
    assert summary == (
        "Error in training function: RuntimeError: s3://shards/ds/train/shard-000000.tar: could not connect "
        f"(at tests/unit/test_console.py:{_failing_read.__code__.co_firstlineno + 4} in _failing_read)"
    )
    node, path = saved.split(":", 1)
    assert node and Path(path).read_text() == "Error in training function:\n" + text
    Path(path).unlink()

    other = logging.LogRecord(WORKER_ERRORS, logging.ERROR, "util.py", 1, "Something else:\nline two", (), None)
    assert shorten_worker_error(other) and other.getMessage() == "Something else:\nline two"


def test_the_driver_leaves_out_ray_trains_resource_request_timeout_but_keeps_other_errors():
    """Ray Train's controller logged this at the start of every run on an H200 host (its coordinator's actor took
    over 5 s to start); the same warning with another error, and the lines around it, stay."""
    from training.console import without_routine_lines

    warning = (
        "Failed to send resource request for train-741b2fcab4df457bb5be2360150f4927. If this only happens "
        "transiently during network partition or CPU being overloaded, it's safe to ignore this error."
    )
    frames = [
        "Traceback (most recent call last):",
        '  File "/tmp/site/ray/train/v2/_internal/execution/scaling_policy/autoscaling_coordinator_client.py", '
        "line 58, in send_resource_request",
        "    ray.get(",
        '  File "python/ray/includes/common.pxi", line 107, in ray._raylet.check_status',
    ]
    timeout = "ray.exceptions.GetTimeoutError: Get timed out: some object(s) not ready."
    other = "ray.exceptions.RayActorError: The actor died unexpectedly before finishing this task."
    epoch = "demo_tiles-9af0 epoch 1/2: train_loss 0.9712"
    assert without_routine_lines([warning, *frames, timeout, epoch]) == [epoch]
    assert without_routine_lines([epoch, warning, *frames, timeout]) == [epoch]
    assert without_routine_lines([warning, *frames, other, epoch]) == [warning, *frames, other, epoch]
    assert without_routine_lines([warning, *frames]) == [warning, *frames]  # its end not (yet) seen: kept
    assert without_routine_lines([warning, epoch]) == [warning, epoch]


def test_ray_trains_worker_group_startup_timeout_is_said_in_one_line():
    """The cluster had no room for a run's workers for a minute (its CPUs held by an ingest): Ray Train's
    controller logged an error with 30 lines of traceback, and again each minute while the run waited (as seen
    on the local stack, lines as the driver gets them)."""
    from training.console import without_routine_lines

    cause = (
        "The worker group startup timed out after 60.0 seconds waiting for 2 workers. Potential causes include: (1) "
        "temporary insufficient cluster resources while waiting for autoscaling (ignore this warning in this case)"
    )
    frames = [
        "Traceback (most recent call last):",
        '  File "/venv/ray/train/v2/_internal/execution/controller/controller.py", line 914, in '
        "_run_control_loop_iteration",
        "    result = await self._step()",
        "             ^^^^^^^^^^^^^^^^^^",
        '  File "/venv/ray/train/v2/_internal/execution/worker_group/worker_group.py", line 303, in _start_impl',
        "    raise WorkerGroupStartupTimeoutError(",
    ]
    error = f"ray.train.v2._internal.exceptions.WorkerGroupStartupTimeoutError: {cause}"
    block = [f"Error in control loop iteration: {cause}", *frames, error]
    said = (
        "the run's 2 workers have waited 60 s for room on the cluster (Ray Train asks again every 60 s): other "
        "work holds what they need, or nodes are yet to join (`tessera status` shows what holds it)"
    )
    epoch = "demo_tiles-9af0 epoch 1/2: train_loss 0.9712"
    assert without_routine_lines([*block, epoch]) == [said, epoch]
    waits = [0]  # a process's count, across the batches Ray forwards
    assert without_routine_lines([*block, *block], waits) == [said, said.replace("waited 60 s", "waited 2 min")]
    assert without_routine_lines(block, waits) == [said.replace("waited 60 s", "waited 3 min")]
    other = "ray.exceptions.RayActorError: The actor died unexpectedly before finishing this task."
    assert without_routine_lines([*block[:-1], other]) == [*block[:-1], other]  # another error: whole
    assert without_routine_lines(block[:-1]) == block[:-1]  # its end not (yet) seen: kept
