import os
import stat
import time

import requests

from cluster import health
from cluster.cli import main
from cluster.stack import LocalStack


def test_services_healthy_and_up_is_idempotent(stack, capsys):
    rows = LocalStack(stack).status()
    assert {r.name: r.healthy for r in rows} == {"ray": True, "s3": True, "mlflow": True}
    before = (stack.state / "pids" / "mlflow.sid").read_text()
    t = time.monotonic()
    LocalStack(stack).up()
    assert time.monotonic() - t < 10  # nothing restarted
    assert (stack.state / "pids" / "mlflow.sid").read_text() == before
    assert main(["status"]) == 0
    assert "healthy" in capsys.readouterr().out


def test_services_bind_loopback_and_ray_requires_the_token(stack):
    assert stack.host == "127.0.0.1"
    r = requests.get(f"{stack.ray_dashboard_url}/api/version", timeout=5)
    assert r.status_code == 401
    assert health.ray_ok(stack)[0]


def test_secrets_are_owner_only(stack):
    for name in ("s3.json", "ray_token", "pseudonym.key"):
        mode = stat.S_IMODE(os.stat(stack.secret_path(name)).st_mode)
        assert mode == 0o600, name


def test_s3_rejects_wrong_keys(stack, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    ok, _ = health.s3_ok(stack)
    assert not ok


def test_cpu_workers_get_the_worker_environment(stack):
    import ray
    import torch

    from cluster.stack import CPU_WORKER_ENV

    @ray.remote(num_cpus=0)
    def worker_env(keys):
        return {k: os.environ.get(k) for k in keys}

    got = ray.get(worker_env.remote([*CPU_WORKER_ENV, "DS_ACCELERATOR"]))
    if torch.cuda.is_available():  # left as the user's environment has them
        assert got == {k: os.environ.get(k) for k in got}
    else:  # one malloc arena, DeepSpeed on the CPU accelerator
        assert got == {**CPU_WORKER_ENV, "DS_ACCELERATOR": "cpu"}
