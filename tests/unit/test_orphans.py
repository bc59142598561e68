"""Which placement groups Ray should have removed after their job ended (cluster.orphans), on hand-made records."""

from cluster.orphans import Group, orphans, released_line


def _group(id_: str, job: str = "02000000", actor: str | None = "a1", **kw) -> Group:
    return Group(id=id_, job=job, actor=actor, detached=kw.get("detached", False), state=kw.get("state", "CREATED"),
                 resources=kw.get("resources", {"CPU": 1.0}))  # fmt: skip


def test_a_group_of_an_ended_job_whose_maker_is_gone_is_an_orphan_and_only_that():
    groups = [
        _group("leaked"),  # the Ray Train controller that made it died with the job
        _group("pending", state="PENDING"),  # would take CPUs as soon as they free
        _group("by-driver", actor=None),  # a driver's own group
        _group("removed", state="REMOVED"),
        _group("detached", detached=True),  # detached: made to outlive its job
        _group("running-job", job="03000000"),
        _group("kept-by-live-actor", actor="serve"),  # a detached actor of the ended job made it: its own to keep
    ]
    ended, alive = {"02000000"}, {"serve"}
    asked: list[str] = []

    def job_ended(job: str) -> bool:
        asked.append(job)
        return job in ended

    found = orphans(groups, job_ended, lambda actor: actor in alive)
    assert [g.id for g in found] == ["leaked", "pending", "by-driver"]
    assert "removed" not in asked and len(asked) == 5  # removed and detached groups cost no question


def test_an_unknown_job_is_not_taken_for_an_ended_one():
    assert orphans([_group("x", job="ff000000")], lambda job: False, lambda actor: False) == []


def test_the_line_says_what_was_released_and_from_which_jobs():
    one = released_line([_group("a", job="0b000000")])
    assert one == (
        "ray: released 1 placement group (1 CPU) that Ray kept after its job (0b000000) ended: it held the "
        "cluster's resources for no one"
    )
    many = released_line([
        _group("a", job="0d000000", resources={"CPU": 1.0, "GPU": 1.0, "memory": 1e9}),
        _group("b", job="0b000000", resources={"CPU": 2.0}),
    ])  # fmt: skip
    assert many.startswith("ray: released 2 placement groups (3 CPU and 1 GPU) that Ray kept after their jobs ")
    assert "(0b000000, 0d000000) ended: they held" in many
    assert "(no CPU or GPU)" in released_line([_group("c", resources={"memory": 1e6})])
