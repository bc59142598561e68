"""The order in which `tessera up` starts the stack, with stand-ins for the services that record what happens (the
real services start in the integration tests)."""

from cluster import health
from cluster.settings import load_settings
from cluster.stack import LocalStack

SERVICES = ("s3", "mlflow", "ray")


def _recording_stack(monkeypatch, tmp_path, running=()):
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path))
    stack, events, up = LocalStack(load_settings()), [], set(running)
    monkeypatch.setattr(health, "CHECKS", {n: (lambda s, n=n: (n in up, "")) for n in SERVICES})
    monkeypatch.setattr(stack, "_running", lambda name: name in up)
    monkeypatch.setattr(stack, "_check_ports_free", lambda name: None)
    monkeypatch.setattr(stack, "_make_buckets", lambda: events.append("buckets"))
    monkeypatch.setattr(stack, "_await", lambda name, timeout: events.append(f"await {name}"))
    monkeypatch.setattr(stack, "status", lambda: [])
    for name in SERVICES:
        monkeypatch.setattr(stack, f"_start_{name}", lambda n=name: (events.append(f"start {n}"), up.add(n)))
    return stack, events


def test_mlflow_and_ray_start_side_by_side_once_s3_has_its_buckets(monkeypatch, tmp_path):
    """MLflow stores artifacts on S3, so it starts after S3 is healthy; Ray needs neither, and `ray start`
    (about 6 s) runs while MLflow boots (about 5 s) instead of after it: `tessera up` 15 s -> 9.5 s."""
    stack, events = _recording_stack(monkeypatch, tmp_path)
    stack.up()
    assert events == ["start s3", "await s3", "buckets", "start mlflow", "start ray", "await mlflow", "await ray"]


def test_what_runs_healthy_is_left_alone(monkeypatch, tmp_path):
    stack, events = _recording_stack(monkeypatch, tmp_path, running=("s3", "ray"))
    stack.up()
    assert events == ["start mlflow", "await mlflow"]


def test_a_second_stack_on_the_machine_can_give_its_workers_other_ports(monkeypatch, tmp_path):
    """`TESSERA_RAY_WORKER_PORTS`: the head and any node joined take it as their workers' port range (Ray's own
    10002-19999 without it), so two stacks' raylets never hand out the same free port at once."""
    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path))
    assert LocalStack(load_settings())._worker_ports() == []
    monkeypatch.setenv("TESSERA_RAY_WORKER_PORTS", "21000-29999")
    assert LocalStack(load_settings())._worker_ports() == ["--min-worker-port", "21000", "--max-worker-port", "29999"]
