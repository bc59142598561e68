"""The real local stack (Ray head with token auth, rclone S3, MLflow) for the whole integration session.

Ray reads its auth settings when first imported, and test modules import it at collection, so the
environment is set here, when this conftest is imported. Ports differ from the defaults so that a
developer's own `tessera up` can keep running beside the tests.
"""

import atexit
import os
import shutil
import tempfile

import psutil
import pytest

STATE = tempfile.mkdtemp(prefix="tessera-it-")
# Its secrets (S3 keys, Ray token, pseudonym key) go with it even when no test used the stack (`-k` of a test
# without it), whose teardown removes it otherwise.
atexit.register(shutil.rmtree, STATE, ignore_errors=True)
# `make integration` runs the tier in two halves side by side, each with its own stack: the second's ports are
# shifted by this much (its own state folder, and so its own Ray session folder, it has anyway).
SHIFT = int(os.environ.get("TESSERA_IT_PORT_SHIFT", "0"))
os.environ.update(
    {
        "TESSERA_STATE_DIR": STATE,
        "TESSERA_RAY_PORT": str(6411 + SHIFT),
        "TESSERA_RAY_DASHBOARD_PORT": str(8411 + SHIFT),
        "TESSERA_RAY_CLIENT_PORT": str(20411 + SHIFT),
        "TESSERA_RAY_AGENT_PORT": str(52411 + SHIFT),
        "TESSERA_S3_PORT": str(9411 + SHIFT),
        "TESSERA_MLFLOW_PORT": str(5411 + SHIFT),
        "TESSERA_RAY_NUM_CPUS": "2",
        "TESSERA_RAY_WORKER_PORTS": "21000-29999" if SHIFT else "10002-19999",
        # Ray Train's controller takes a run's reports, its end and a sweep trial's go-ahead after each epoch
        # (training.loop.await_go_ahead) at its polls of the workers, 2 s apart by default: a wait of up to 2 s
        # per run and per sweep epoch, which the suite's tiny epochs of a second make most of their time. A poll
        # a worker misses is tolerated (a worker is dead after RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, 10 min).
        # In the stack's environment too, for the runs Tune's trial actors start.
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    }
)
for _var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RAY_AUTH_TOKEN", "TESSERA_PSEUDONYM_KEY", "RAY_ADDRESS"):
    os.environ.pop(_var, None)

from cluster.settings import load_settings  # noqa: E402

_settings = load_settings()
_settings.ensure_secrets()
_settings.apply()


def _leftovers(settings) -> list:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if settings.ray_temp_dir in cmd or STATE in cmd:
            out.append(cmd[:200])
    return out


@pytest.fixture(scope="session")
def stack():
    from cluster.stack import LocalStack

    local = LocalStack(_settings)
    try:
        local.up()
        import ray

        ray.init(address=_settings.ray_gcs_address, logging_level="WARNING")
        yield _settings
    finally:
        import ray

        ray.shutdown()
        local.down()
    left = _leftovers(_settings)
    shutil.rmtree(STATE, ignore_errors=True)
    assert left == [], f"processes left after down: {left}"


def _held(ray) -> tuple[float, dict]:
    """What of the cluster is still held: CPUs short of its total, and the placement groups not removed."""
    short = ray.cluster_resources().get("CPU", 0) - ray.available_resources().get("CPU", 0)
    groups = {k: v for k, v in ray.util.placement_group_table().items() if v.get("state") != "REMOVED"}
    return short, groups


@pytest.fixture(autouse=True)
def _cluster_released(request):
    """A test that used the stack leaves its CPUs free: one held (a placement group a training run or sweep did not
    remove, an actor left alive) would be held for good on a user's cluster, and here it made a later ingest wait
    without end (a worker with no CPU to start on). Ray removes a run's resources a moment after it ends.

    A placement group Ray kept after its job ended (:mod:`cluster.orphans`; a CLI the test ran, which exited) is
    Ray's leak, not the test's: seen after `tessera tune` was interrupted as its trial's Ray Train run created its
    worker group. It is released, as the next command would release it, and warned of, named; any other group
    fails the test, as CPUs still held do."""
    yield
    if "stack" not in request.fixturenames:
        return
    import time
    import warnings

    import ray
    from ray.util.placement_group import PlacementGroup
    from ray.util.state import list_actors

    from cluster.orphans import release_orphans

    if not ray.is_initialized():
        return
    deadline = time.monotonic() + 30
    short, groups = _held(ray)
    while (short or groups) and time.monotonic() < deadline:
        time.sleep(0.5)
        short, groups = _held(ray)
    if not (short or groups):
        return
    if orphans := release_orphans():
        warnings.warn(f"{request.node.nodeid}: Ray kept placement groups of jobs that ended: {orphans}", stacklevel=2)
    while any(_held(ray)) and time.monotonic() < deadline + 10:
        time.sleep(0.5)
    short, groups = _held(ray)
    if short or groups:
        held = {k: (v.get("bundles"), v.get("state")) for k, v in groups.items()}
        for pg_id in groups:  # so that the tests after this one run on the whole cluster
            ray.util.remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
        alive = list_actors(ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], detail=True)
        actors = [(a.class_name, a.required_resources) for a in alive]
        pytest.fail(f"the test left {short:g} CPU(s) held; placement groups not removed: {held}; live actors: {actors}")
