"""The embedded local stack: a Ray head (token auth), an S3 server (rclone) and an MLflow server.

All bound to ``settings.host`` (127.0.0.1 by default), health-checked before ``up`` returns. ``up`` is
idempotent and recovers stale pid files; ``down`` leaves no process behind.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster import health, procs
from cluster.errors import TesseraError
from cluster.settings import Settings

# Ray Train runs the training function in a thread, and glibc gives each thread its own malloc arena: a resnet50
# CPU step measured 2.65 s there against 2.20 s on the main thread, and the same in both with a single arena (so
# every process that Ray starts on a CPU-only machine gets one; GPU steps allocate little on the host).
CPU_WORKER_ENV = {"MALLOC_ARENA_MAX": "1"}
# Ray Train's preemption watcher, an actor per run that polls the GCS for draining nodes (for a training function
# that asks ``ray.train.get_preemption_info``, which Tessera's does not), has nothing to watch on one machine: one
# Python process fewer per run. A cluster (infra/) keeps Ray's default.
LOCAL_RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    url: str
    running: bool
    healthy: bool
    detail: str


def executable(name: str) -> str:
    """An executable installed beside this Python (the venv's ``bin``), else from PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise TesseraError(f"{name} is not installed (expected beside {sys.executable})")
    return found


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


class LocalStack:
    """Start, inspect and stop the three services under ``settings.state_dir``."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.logs = settings.state / "logs"
        self.pids = settings.state / "pids"

    # --- environment of the services -------------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.s.client_env())
        env["PATH"] = procs.path_with_this_python(env.get("PATH", ""))
        env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        for key, value in LOCAL_RAY_ENV.items():
            env.setdefault(key, value)
        try:
            import torch

            if not torch.cuda.is_available():
                env.setdefault("DS_ACCELERATOR", "cpu")
                for key, value in CPU_WORKER_ENV.items():
                    env.setdefault(key, value)
        except ImportError:
            pass
        return env

    # --- individual services ----------------------------------------------------------------------------
    def _start_s3(self) -> None:
        access, secret = self.s.s3_keys()
        data = self.s.state / "s3"
        data.mkdir(parents=True, exist_ok=True)
        env = self._env()
        # Via the environment, not argv where `ps` shows it; rclone reads list flags from env as CSV, hence quotes.
        env["RCLONE_AUTH_KEY"] = f'"{access},{secret}"'
        cmd = [executable("rclone"), "serve", "s3", "--addr", f"{self.s.host}:{self.s.s3_port}", str(data)]
        procs.start([*cmd, "--config", "/dev/null"], self._pidfile("s3"), self.logs / "s3.log", env)

    def _start_mlflow(self) -> None:
        db = self.s.state / "mlflow.db"
        env = self._env()
        env["MLFLOW_S3_ENDPOINT_URL"] = self.s.s3_url
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no GenAI job runners: 7 idle processes
        cmd = [
            executable("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            f"s3://{self.s.mlflow_bucket}",
            "--host",
            self.s.host,
            "--port",
            str(self.s.mlflow_port),
            "--workers",
            "1",
        ]
        procs.start(cmd, self._pidfile("mlflow"), self.logs / "mlflow.log", env)

    def _start_ray(self) -> None:
        cmd = [
            executable("ray"),
            "start",
            "--head",
            "--node-ip-address",
            self.s.host,
            "--port",
            str(self.s.ray_port),
            "--dashboard-host",
            self.s.host,
            "--dashboard-port",
            str(self.s.ray_dashboard_port),
            "--ray-client-server-port",
            str(self.s.ray_client_port),
            "--dashboard-agent-listen-port",
            str(self.s.ray_agent_port),
            "--temp-dir",
            self.s.ray_temp_dir,
            "--disable-usage-stats",
        ]
        if self.s.ray_num_cpus:
            cmd += ["--num-cpus", str(self.s.ray_num_cpus)]
        log = self.logs / "ray.log"
        cmd += self._worker_ports()
        # `ray start` exits once its daemons run; they stay in its session, which `down` terminates.
        rc = procs.start(cmd, self._pidfile("ray"), log, self._env(), wait=True)
        if rc != 0:
            raise TesseraError(f"`ray start` failed (exit {rc}); see {log}:\n{_log_tail(log)}")

    def add_node(self, name: str, num_cpus: int, resources: dict[str, float] | None = None, num_gpus: int = 0) -> None:
        """Join one more Ray node (its own raylet, CPUs, GPUs as Ray counts them, and custom resources) to the
        local head, as a worker machine would join a cluster; ``down`` or :meth:`remove_node` stops it."""
        import json

        if not self._running("ray"):
            raise TesseraError("start the stack first (tessera up): a node joins a running head")
        cmd = [
            executable("ray"), "start", "--address", self.s.ray_gcs_address, "--node-ip-address", self.s.host,
            "--num-cpus", str(num_cpus), "--disable-usage-stats",
        ]  # fmt: skip
        cmd += self._worker_ports()
        if resources:
            cmd += ["--resources", json.dumps(resources)]
        if num_gpus:
            cmd += ["--num-gpus", str(num_gpus)]
        log = self.logs / f"node-{name}.log"
        rc = procs.start(cmd, self._pidfile(f"node-{name}"), log, self._env(), wait=True)
        if rc != 0:
            raise TesseraError(f"`ray start --address` failed (exit {rc}); see {log}:\n{_log_tail(log)}")

    def _worker_ports(self) -> list[str]:
        if not self.s.ray_worker_ports:
            return []
        low, high = self.s.ray_worker_ports.split("-")
        return ["--min-worker-port", low, "--max-worker-port", high]

    def remove_node(self, name: str) -> bool:
        return procs.stop(self._pidfile(f"node-{name}"))

    # --- the stack --------------------------------------------------------------------------------------
    def _pidfile(self, name: str):
        return self.pids / f"{name}.sid"

    def _running(self, name: str) -> bool:
        return procs.session_of(self._pidfile(name)) is not None

    def _ports(self, name: str) -> dict[str, int]:
        if name == "ray":
            return {"TESSERA_RAY_PORT": self.s.ray_port, "TESSERA_RAY_DASHBOARD_PORT": self.s.ray_dashboard_port}
        return {f"TESSERA_{name.upper()}_PORT": getattr(self.s, f"{name}_port")}

    def _check_ports_free(self, name: str) -> None:
        for var, port in self._ports(name).items():
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((self.s.host, port)) == 0:
                    raise TesseraError(
                        f"cannot start {name}: port {port} on {self.s.host} is taken by another process "
                        f"(another stack, or set {var})"
                    )

    def up(self, timeout: float = 120.0) -> list[ServiceStatus]:
        """Start whatever is not running and wait until it is healthy: S3 first (MLflow stores artifacts there),
        then MLflow and Ray side by side (neither needs the other; `ray start` takes about 6 s, MLflow 5)."""
        self.s.ensure_secrets()
        if self._start("s3"):
            self._await("s3", timeout)
            self._make_buckets()
        for name in [n for n in ("mlflow", "ray") if self._start(n)]:
            self._await(name, timeout)
        return self.status()

    def _start(self, name: str) -> bool:
        """Start ``name`` unless it runs and is healthy (given 10 s to become so, else restarted); whether it
        was started."""
        check = health.CHECKS[name]
        if self._running(name) and check(self.s)[0]:
            return False
        if self._running(name):  # alive but unhealthy: give it a moment, else restart it
            if procs.wait_until(lambda: check(self.s)[0], 10):
                return False
            self._stop(name)
        self._check_ports_free(name)
        {"s3": self._start_s3, "mlflow": self._start_mlflow, "ray": self._start_ray}[name]()
        return True

    def _await(self, name: str, timeout: float) -> None:
        if not procs.wait_until(lambda: health.CHECKS[name](self.s)[0], timeout):
            log = self.logs / f"{name}.log"
            raise TesseraError(f"{name} did not become healthy within {timeout:.0f}s; see {log}:\n{_log_tail(log)}")

    def _make_buckets(self) -> None:
        from shards import storage

        os.environ.update(self.s.client_env())
        for bucket in (self.s.shards_bucket, self.s.mlflow_bucket, self.s.checkpoints_bucket):
            storage.ensure_bucket(f"s3://{bucket}/")

    def _stop(self, name: str) -> bool:
        # Ray's GCS last: its daemons end in a second or two while it answers, and one of them (SIGTERMed with
        # it) outlived the 15 s wait for a SIGKILL; `tessera down` took 18 s, 4 s in this order.
        last = (lambda p: p.name() == "gcs_server") if name == "ray" else None
        stopped = procs.stop(self._pidfile(name), last=last)
        if name == "ray":
            shutil.rmtree(self.s.ray_temp_dir, ignore_errors=True)
        return stopped

    def down(self) -> list[str]:
        """Stop Ray first (its workers may write to S3 and MLflow), then MLflow, then S3; returns the services
        that were running."""
        for pidfile in sorted(self.pids.glob("node-*.sid")):  # extra nodes before their head
            procs.stop(pidfile)
        return [name for name in ("ray", "mlflow", "s3") if self._stop(name)]

    def status(self) -> list[ServiceStatus]:
        """Each service, its URL, whether its process runs and whether it answers."""
        urls = {"ray": self.s.ray_dashboard_url, "s3": self.s.s3_url, "mlflow": self.s.mlflow_url}
        out = []
        for name in ("ray", "s3", "mlflow"):
            ok, detail = health.CHECKS[name](self.s)
            out.append(ServiceStatus(name, urls[name], self._running(name), ok, detail))
        return out
