import os
import stat
import subprocess
import sys
import time

import pytest
import requests

from cluster import health
from cluster.cli import main
from cluster.stack import LocalStack


def test_services_healthy_and_up_is_idempotent(stack, capsys):
    rows = LocalStack(stack).status()
    assert {r.name: r.healthy for r in rows} == {"ray": True, "s3": True, "mlflow": True}
    sessions = {name: (stack.state / "pids" / f"{name}.sid").read_text() for name in ("s3", "mlflow", "ray")}
    LocalStack(stack).up()
    assert {name: (stack.state / "pids" / f"{name}.sid").read_text() for name in sessions} == sessions  # none again
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


def test_a_command_with_another_state_folder_hears_the_stack_refuse_it(stack, tmp_path):
    """Without the stack's keys (another state folder), the running stack is reported as refusing, not as down,
    with the folder the command used and what to set; a command that needs it fails saying so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_ACCESS", "AWS_SECRET", "RAY_AUTH_TOKEN"))}
    env["TESSERA_STATE_DIR"] = str(tmp_path / "other")

    def tessera(*argv):
        return subprocess.run([sys.executable, "-m", "cluster.cli", *argv], env=env, capture_output=True, text=True)

    status = tessera("status")
    assert status.returncode == 1
    rows = {line.split()[0]: line for line in status.stdout.splitlines()[:3]}
    assert "answers, but  refused: HTTP 401 for no token" in rows["ray"]
    assert "answers, but  refused:" in rows["s3"] and "for no keys" in rows["s3"]
    assert "healthy" in rows["mlflow"]  # MLflow has no keys
    hint = f"This command's state folder is {tmp_path / 'other'} (no `tessera up` has made it)"
    assert hint in status.stdout and "set TESSERA_STATE_DIR" in status.stdout
    job = tessera("jobs")
    assert job.returncode == 1
    assert f"ray endpoint {stack.ray_dashboard_url} refused: HTTP 401 for no token. {hint}" in job.stderr


def test_s3_rejects_wrong_keys(stack, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    ok, detail = health.s3_ok(stack)
    assert not ok and detail == "refused: InvalidAccessKeyId for the keys from AWS_ACCESS_KEY_ID"


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


def test_a_dataset_url_with_nothing_there_is_named_as_no_dataset(stack):
    """On the real S3 server: a prefix without a manifest, and a bucket that does not exist, are each said as
    such (boto3's own words were 'NoSuchKey ... Unknown') by every command that reads a dataset."""
    from shards import manifest as mf
    from shards import storage

    with pytest.raises(storage.Missing, match=r"^s3://shards/no-such-dataset: no dataset there: no manifest.json"):
        mf.load("s3://shards/no-such-dataset")
    with pytest.raises(storage.Missing, match=r"^s3://no-such-bucket/x: no dataset there: .* no bucket 'no-such-b"):
        mf.load("s3://no-such-bucket/x")
    run = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "dataset", "s3://shards/no-such-dataset"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 1 and "s3://shards/no-such-dataset: no dataset there" in run.stderr, run.stderr


def test_a_dry_run_says_whether_the_cluster_holds_the_workers(stack, monkeypatch, capsys):
    """`tessera train --dry-run` (and `tune --dry-run`) makes the check a run makes before it starts: the stack's
    one node of 2 CPUs holds two workers and refuses five, naming the field. (In this process, connected
    already: a new one spends seconds on its imports alone.)"""
    from shards.nodes import FIXED_ENV

    monkeypatch.setenv(FIXED_ENV, "1")  # as the CLI sets it for the local stack; restored for the other tests

    def dry_run(*argv: str):
        code = main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, err = dry_run("train", "demo_tiles", "data.dataset=s3://shards/none", "workers=2", "--dry-run")
    assert code == 0, err[-2000:]
    assert out.splitlines()[-1] == "cluster: 1 node(s) (2 CPU, 0 GPU) for 2 workers of 1 CPU each"
    refused = "tessera: error: workers: the run asks for 5 workers of 1 CPU each, and the cluster's 1 node(s) (2 CPU) "
    code, _, err = dry_run("train", "demo_tiles", "data.dataset=s3://shards/none", "workers=5", "--dry-run")
    assert code == 1 and refused in err, err[-2000:]
    # a sweep's dry run checks each trial's worker group the same way
    code, _, err = dry_run("tune", "demo_tiles", "-r", "2", "data.dataset=s3://shards/none", "--dry-run", "workers=5")
    assert code == 1 and refused in err, err[-2000:]
    # the stack's CPUs held now (by another run, an ingest): the cluster holds the workers, but the run would wait
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    held = placement_group([{"CPU": ray.cluster_resources()["CPU"]}])
    ray.get(held.ready(), timeout=60)
    try:
        code, out, err = dry_run("train", "demo_tiles", "data.dataset=s3://shards/none", "workers=2", "--dry-run")
    finally:
        remove_placement_group(held)
    assert code == 0, err[-2000:]
    busy = "workers: the cluster holds the run's 2 workers, but not now: it has 0 of the 2 CPUs they need free; "
    assert out.splitlines()[-2].startswith(busy), out[-2000:]
    assert out.splitlines()[-1] == "cluster: 1 node(s) (2 CPU, 0 GPU) for 2 workers of 1 CPU each"


def test_a_tree_of_thousands_of_objects_is_deleted_a_thousand_a_request(stack, monkeypatch):
    """A run's staging (three objects per piece of work) goes by DeleteObjects on the real S3 server: every
    object under the prefix, none beside it, in a request per 1,000."""
    from shards import storage

    client = storage.s3_client()
    for i in range(2100):
        client.put_object(Bucket="shards", Key=f"bulk/tree/{i:05d}.json", Body=b"{}")
    client.put_object(Bucket="shards", Key="bulk/treeless", Body=b"kept")  # shares the prefix's letters only
    requests = []
    delete_objects = client.delete_objects
    monkeypatch.setattr(client, "delete_objects", lambda **kw: requests.append(kw) or delete_objects(**kw))
    storage.delete_tree("s3://shards/bulk/tree")
    assert [len(r["Delete"]["Objects"]) for r in requests] == [1000, 1000, 100]
    assert list(storage.list_urls("s3://shards/bulk/")) == ["s3://shards/bulk/treeless"]
    storage.delete_many(["s3://shards/bulk/treeless", "s3://shards/bulk/not-there"])  # absent ones are fine
    assert list(storage.list_urls("s3://shards/bulk/")) == []
    with pytest.raises(storage.Missing):
        storage.delete_many(["s3://no-such-bucket/x"])


LEAKER = """
import os, time, ray
from cluster.settings import load_settings
s = load_settings(); s.apply()
ray.init(address=s.ray_gcs_address, logging_level="ERROR")
from ray.util.placement_group import placement_group

@ray.remote(num_cpus=0)
class Maker:
    def make(self):
        while True:
            placement_group([{"CPU": 1}])

maker = Maker.remote()
ray.get(maker.__ray_ready__.remote())
maker.make.remote()
time.sleep(0.5)
os._exit(0)  # the job ends as its actor creates a group: Ray marks it too late and keeps it
"""


def test_a_placement_group_ray_kept_after_its_job_ended_is_released_when_a_command_connects(stack, capsys):
    """The leak an interrupted `tessera tune` left (a trial's Ray Train run creating its worker group as the sweep
    ended), made on purpose: an actor creating groups as its driver exits leaves one Ray never removes. The next
    command that connects releases it, saying so, and its check sees the cluster's CPUs free."""
    import ray
    from ray.util.state import list_placement_groups

    from cluster.cli import main

    def kept():
        mine = ray.get_runtime_context().get_job_id()
        groups = list_placement_groups(filters=[("state", "!=", "REMOVED")], detail=True)
        return [g for g in groups if g.creator_job_id != mine]

    left: list = []
    for _ in range(10):  # Ray's clean-up of a job is quick: the race is lost most times, not every time
        subprocess.run([sys.executable, "-c", LEAKER], check=True, timeout=120)
        time.sleep(2)  # what Ray removes after a job, it has removed by now
        if left := kept():
            break
    if not left:  # a clean clone's run beside the unit tier: Ray won the race 5 times out of 5
        pytest.skip("Ray removed every group of 10 jobs that ended as their actor made one: no leak to release")
    assert all(not g.is_detached for g in left) and len({g.creator_job_id for g in left}) == 1, left
    code = main(["train", "demo_tiles", "data.dataset=s3://shards/none", "workers=2", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    n, job = len(left), left[0].creator_job_id
    released = f"ray: released {n} placement group{'s' if n > 1 else ''} ({n} CPU) that Ray kept after its job ({job})"
    assert released in out, out[-2000:]
    assert "not now" not in out  # the check ran after the release: every CPU free
    assert kept() == []
    assert ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]


def test_status_names_the_jobs_that_hold_the_cluster_and_those_waiting_for_room(stack, capsys):
    """Where a run that waits for room sends its user: `tessera status` lists what holds the stack's CPUs, job by
    job, a placement group's bundles and an actor outside one alike, and what waits for room (a group pending)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.cli import main

    @ray.remote(num_cpus=1)
    class Worker:
        pass

    held = placement_group([{"CPU": 1}])
    ray.get(held.ready(), timeout=60)
    worker = Worker.remote()
    ray.get(worker.__ray_ready__.remote(), timeout=60)
    waiting = placement_group([{"CPU": 1}])  # no room: pending
    try:
        code = main(["status"])
    finally:
        for group in (waiting, held):
            remove_placement_group(group)
        ray.kill(worker)
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    mine = ray.get_runtime_context().get_job_id()
    assert out[-4] == "cluster: 2 CPU; free now: 0 CPU", out
    assert out[-3].startswith(f"  2 CPU        job {mine} (running "), out
    assert "pytest" in out[-3]
    assert out[-2] == "waiting for room:"
    assert out[-1].startswith(f"  1 CPU        job {mine} (running "), out
