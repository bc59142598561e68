"""Which code made a dataset or a run: a checkout's commit (marked when tracked files changed), the commit a
submitted job was sent with, recorded in manifests, their amendments and `tessera dataset`."""

import subprocess
from pathlib import Path

import pytest

from shards import manifest as mf
from shards import provenance


def _git(repo: Path, *args: str) -> str:
    cmd = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "src"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    _git(repo, "add", "code.py")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


def test_a_checkouts_commit_is_marked_when_its_tracked_files_changed(repo, tmp_path):
    head = _git(repo, "rev-parse", "HEAD")
    (repo / "notes.txt").write_text("untracked: not code that runs")
    assert provenance.source_commit(repo) == head
    (repo / "code.py").write_text("x = 2\n")  # the code run is not the commit's
    assert provenance.source_commit(repo) == head + provenance.DIRTY
    outside = tmp_path / "plain"
    outside.mkdir()
    assert provenance.source_commit(outside) is None
    _git(outside, "init", "-q")  # a checkout with no commit yet
    assert provenance.source_commit(outside) is None
    # installed into a virtual environment inside another project's checkout: not that project's code
    site = repo / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    assert provenance.source_commit(site) is None


def test_a_submitted_job_names_the_commit_it_was_sent_and_wins_over_its_copy(repo, tmp_path, monkeypatch):
    from cluster.settings import load_settings
    from cluster.submit import runtime_env

    monkeypatch.setenv("TESSERA_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "stale")  # this shell's, itself from a job: not the code sent
    env = runtime_env(load_settings(), working_dir=str(repo))["env_vars"]
    assert env[provenance.COMMIT_VARIABLE] == _git(repo, "rev-parse", "HEAD")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert provenance.COMMIT_VARIABLE not in runtime_env(load_settings(), working_dir=str(plain))["env_vars"]

    provenance.commit.cache_clear()
    monkeypatch.setenv(provenance.COMMIT_VARIABLE, "abc123")  # in the job: its copy has no .git
    try:
        assert provenance.commit() == "abc123"
        assert provenance.made_by() == f"tessera {provenance.version()} (abc123)"
    finally:
        provenance.commit.cache_clear()
    monkeypatch.delenv(provenance.COMMIT_VARIABLE)
    here = provenance.commit()  # this checkout's (the tests run from one), marked or not
    assert here.removesuffix(provenance.DIRTY) == _git(Path(__file__).parent, "rev-parse", "HEAD")


def test_a_dataset_says_which_code_made_it_and_each_run_that_amended_it():
    from cluster.cli_dataset import dataset_lines

    old = mf.Manifest(dataset="s3://b/d", kind="images")  # from before it was recorded
    assert "made by: not recorded (before Tessera recorded it)" in dataset_lines(old, b"")
    m = mf.Manifest(dataset="s3://b/d", kind="images", made_by="tessera 0.1.0 (aaa)")
    m.amended = [
        mf.Amendment(time="t1", added=2, previous_sha256="1" * 64, made_by="tessera 0.1.0 (aaa)"),
        mf.Amendment(time="t2", added=1, previous_sha256="2" * 64, made_by="tessera 0.2.0 (bbb)"),
    ]
    lines = dataset_lines(m, b"")
    assert "made by: tessera 0.1.0 (aaa)" in lines
    assert lines[-2:] == [
        "  amended t1: 2 added, 0 retried, 0 replaced (from version 111111111111)",  # the same code: not repeated
        "  amended t2: 1 added, 0 retried, 0 replaced (from version 222222222222, by tessera 0.2.0 (bbb))",
    ]
    back = mf.Manifest.model_validate_json(mf.dumps(m))
    assert back.made_by == m.made_by and [a.made_by for a in back.amended] == [a.made_by for a in m.amended]
    assert mf.Manifest.model_validate_json(mf.dumps(old)).made_by is None
