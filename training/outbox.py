"""Rank 0's MLflow writes outlast an outage of the tracking server.

A run trains for hours, and its tracking server may restart meanwhile (a redeployed pod, a full disk). Each MLflow
call to a server that does not answer retries for minutes and then raises, which failed the run. So rank 0 asks the
server's ``/health`` (3 s) before it writes; while the server does not answer, the writes wait here, in order (the
metrics with their step and time, the files copied), and training goes on. Each checkpoint carries what still
waits (:data:`FOLDER`), so the worker that resumes from it sends them. After the last epoch rank 0 waits for the
server (``tracking.outage_wait_s``) before the held-out step, which reads the exported model back from it. A
server that answers but fails writes (its artifact store down: HTTP 5xx) is away as well.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shards import scratch
from training.tracking import without_retries

FOLDER = "mlflow_unsent"  # in a checkpoint: what rank 0 had not sent when it was saved
LIST = "writes.json"


class TrackingUnavailable(RuntimeError):
    """The tracking server did not answer within the wait after the last epoch; what waits is in the checkpoint."""


def adopt(checkpoint_dir: str | None, run_id: str | None) -> str | None:
    """A local copy of the writes that waited in ``checkpoint_dir`` when it was saved (None: none), where they are
    this run's: a sweep trial started from another run's checkpoint does not send that run's writes."""
    found = Path(checkpoint_dir or "") / FOLDER
    if not checkpoint_dir or not (found / LIST).is_file():
        return None
    if json.loads((found / LIST).read_text()).get("run_id") != run_id:
        return None
    copy = scratch.mkdtemp("unsent")
    shutil.copytree(found, copy, dirs_exist_ok=True)
    return copy


class Outbox:
    """:class:`training.tracking.RunLogger`'s writes, sent when the server answers and kept in order until then.

    ``reachable``: whether the server answers now (:func:`training.tracking.answers`); ``where``: its URL, for
    messages; ``restored``: a folder from :func:`adopt`, whose writes are sent first."""

    def __init__(self, logger, reachable: Callable[[], bool], where: str, restored: str | None = None) -> None:
        self.logger, self.reachable, self.where = logger, reachable, where
        self.folder = Path(restored or scratch.mkdtemp("unsent"))
        listed = self.folder / LIST
        self.writes: list[dict[str, Any]] = json.loads(listed.read_text())["writes"] if listed.is_file() else []
        self.numbered = max((w.get("files", 0) for w in self.writes), default=0)
        self.away_since: float | None = None  # when an outage began in this process
        self.trouble = ""  # why the last write was not sent
        if self.writes:
            print(f"rank 0: {len(self.writes)} MLflow writes waited in the checkpoint; sent first", flush=True)

    # RunLogger's interface
    def metrics(self, values: dict[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in values.items() if not math.isnan(float(v))}
        self._write({"kind": "metrics", "values": finite, "step": step, "ms": int(time.time() * 1000)})

    def tag(self, key: str, value: str) -> None:
        self._write({"kind": "tag", "key": key, "value": value})

    def untag(self, key: str) -> None:
        self._write({"kind": "untag", "key": key})

    def artifact(self, path: Path, folder: str | None = None) -> None:
        self._write({"kind": "artifact", "name": Path(path).name, "folder": folder}, Path(path))

    def artifacts(self, local_dir: Path, folder: str) -> None:
        self._write({"kind": "artifacts", "folder": folder}, Path(local_dir))

    def flush(self) -> bool:
        """Send what waits, in order, if the server answers; whether it answered and nothing waits now."""
        if not self.reachable():
            self.trouble = "it does not answer"
            return False
        sent = 0
        while self.writes:
            if not self._sent(self.writes[0], self._files(self.writes[0])):
                self._list()
                return False
            self._forget(self.writes.pop(0))
            sent += 1
        if sent:
            self._list()
        if self.away_since is not None:
            away = time.monotonic() - self.away_since
            said = f"rank 0: MLflow ({self.where}) takes writes again; sent the {sent} that waited ({away:.0f} s)"
            print(said, flush=True)
            self.away_since = None
        return True

    def drain(self, limit_s: float, poll_s: float = 5.0) -> None:
        """After the last epoch: wait up to ``limit_s`` for the server to take what waits, or raise."""
        deadline = time.monotonic() + limit_s
        if self.writes and not self.flush():
            print(f"rank 0: training is done; waiting up to {limit_s:.0f} s for MLflow ({self.where})", flush=True)
        while self.writes and not self.flush():
            if time.monotonic() >= deadline:
                raise TrackingUnavailable(
                    f"MLflow ({self.where}) took no writes in the {limit_s:.0f} s waited after the last epoch "
                    f"({self.trouble[:200]}); {len(self.writes)} writes wait with the run's last checkpoint and are "
                    "sent when it resumes (`tracking.outage_wait_s=N` with --resume waits longer)"
                )
            time.sleep(poll_s)

    def close(self) -> None:
        """Delete this process's folder of writes once none waits there (after :meth:`drain`): a run's workers
        exit when it ends, and each had left its folder behind until another process swept the scratch space."""
        if not self.writes:
            shutil.rmtree(self.folder, ignore_errors=True)

    def keep_with(self, checkpoint_dir: str) -> None:
        """Put what waits into a checkpoint being saved, with the run's id (nothing when nothing waits)."""
        if self.writes:
            shutil.copytree(self.folder, Path(checkpoint_dir) / FOLDER, dirs_exist_ok=True)

    @property
    def waiting(self) -> int:
        return len(self.writes)

    def _write(self, write: dict[str, Any], source: Path | None = None) -> None:
        if self.flush() and self._sent(write, source):
            return
        self._keep(write, source)

    def _sent(self, write: dict[str, Any], source: Path | None) -> bool:
        """Send one write, once (what fails is kept and sent again later: MLflow's own retries took minutes);
        False where the server failed it. A write the server refuses as such (HTTP 4xx: a bad name) is raised."""
        from mlflow.exceptions import MlflowException
        from requests import RequestException

        try:
            with without_retries(timeout_s=None):  # an export's files take longer than a metric
                self._send(write, source)
            return True
        except MlflowException as exc:
            if exc.get_http_status_code() < 500:
                raise
            self.trouble = str(exc)
        except (OSError, RequestException) as exc:
            self.trouble = f"{type(exc).__name__}: {exc}"
        return False

    def _send(self, write: dict[str, Any], source: Path | None) -> None:
        kind, log = write["kind"], self.logger
        if kind == "metrics":
            log.metrics(write["values"], write["step"], write["ms"])
        elif kind == "tag":
            log.tag(write["key"], write["value"])
        elif kind == "untag":
            log.untag(write["key"])
        elif kind == "artifact":
            log.artifact(source, write["folder"])
        else:
            log.artifacts(source, write["folder"])

    def _keep(self, write: dict[str, Any], source: Path | None) -> None:
        if self.away_since is None:
            self.away_since = time.monotonic()
            print(
                f"rank 0: MLflow ({self.where}) takes no writes now ({self.trouble[:300]}); training goes on, and "
                "its metrics and files wait (with each checkpoint) until it does",
                flush=True,
            )
        if write["kind"] in ("artifact", "artifacts"):  # a later upload to the same place replaces an earlier one
            for old in [w for w in self.writes if _same_place(w, write)]:
                self.writes.remove(old)
                self._forget(old)
            self.numbered += 1
            write["files"] = self.numbered
            kept = self.folder / str(self.numbered)
            if source.is_dir():
                shutil.copytree(source, kept)
            else:
                kept.mkdir()
                shutil.copy2(source, kept / source.name)
        self.writes.append(write)
        self._list()

    def _files(self, write: dict[str, Any]) -> Path | None:
        if "files" not in write:
            return None
        kept = self.folder / str(write["files"])
        return kept if write["kind"] == "artifacts" else kept / write["name"]

    def _forget(self, write: dict[str, Any]) -> None:
        if "files" in write:
            shutil.rmtree(self.folder / str(write["files"]), ignore_errors=True)

    def _list(self) -> None:
        listed = {"run_id": self.logger.run_id, "writes": self.writes}
        (self.folder / LIST).write_text(json.dumps(listed))


def _same_place(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["kind"] == b["kind"] and a.get("folder") == b.get("folder") and a.get("name") == b.get("name")
