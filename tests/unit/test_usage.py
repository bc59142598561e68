"""What holds the cluster, job by job, as `tessera status` shows it (cluster.usage), on hand-made holders."""

from cluster.usage import Holder, Job, by_job, shown_command, usage_lines


def test_a_job_holds_or_waits_for_its_groups_bundles_and_what_it_runs_outside_them():
    groups = [Holder("01", {"CPU": 2.0, "GPU": 1.0, "memory": 1e9}, "pg1"), Holder("02", {"CPU": 0.0}, "pg2")]
    others = [
        Holder("01", {"CPU": 1.0}, "pg1"),  # a Ray Train worker in its group: counted with the group
        Holder("03", {"CPU": 1.0}),  # an ingest worker
        Holder("03", {"CPU": 0.5}),  # a task it runs
        Holder("04", {}),  # a controller of no CPU
    ]
    assert by_job(groups, others) == {"01": {"CPU": 2.0, "GPU": 1.0}, "03": {"CPU": 1.5}}


def test_the_lines_name_each_holding_job_the_largest_first():
    held = {"05": {"CPU": 1.0}, "07": {"CPU": 2.0}, "09": {"CPU": 0.5}}
    jobs = {
        "05": Job("/v/bin/python3.11 /v/bin/tessera ingest wsi s3://slides --out s3://shards/x", True, 1_000),
        "07": Job("python train.py", True, 1_000 - 600_000),
        "09": Job("python old.py", False, 0),
    }
    waiting = {"0b": {"CPU": 2.0}}
    jobs["0b"] = Job("/v/bin/python /v/bin/tessera train demo_tiles", True, 51_000)
    lines = usage_lines({"CPU": 4.0, "memory": 1e9}, {"CPU": 0.5}, held, waiting, jobs, now_ms=61_000)
    assert lines == [
        "cluster: 4 CPU; free now: 0.5 CPU",
        "  2 CPU        job 07 (running 11 min): python train.py",
        "  1 CPU        job 05 (running 60 s): tessera ingest wsi s3://slides --out s3://shards/x",
        "  0.5 CPU      job 09 (ended): python old.py",
        "waiting for room:",
        "  2 CPU        job 0b (running 10 s): tessera train demo_tiles",
    ]
    gpu = usage_lines({"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0}, {"0a": {"GPU": 1.0}}, {}, {}, now_ms=0)
    assert gpu == ["cluster: 8 CPU and 1 GPU; free now: 8 CPU and 0 GPU", "  1 GPU        job 0a"]


def test_a_long_command_is_cut():
    long = "python " + "x" * 300
    assert len(shown_command(long)) == 100 and shown_command(long).endswith("...")
    assert shown_command("/usr/bin/python /opt/run.py a") == "/usr/bin/python /opt/run.py a"  # not a console script
