import subprocess
import sys

from cluster import procs


def test_stale_pid_file_is_recovered(tmp_path):
    done = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    done.wait()
    pidfile = tmp_path / "svc.sid"
    pidfile.write_text(str(done.pid))
    assert procs.session_of(pidfile) is None
    assert not pidfile.exists()  # a crash leaves a stale file; the next `up` starts afresh


def test_stop_ends_the_whole_session(tmp_path):
    pidfile = tmp_path / "svc.sid"
    log = tmp_path / "svc.log"
    # a parent that forks a child in the same session, as MLflow and Ray do
    child = "import time; time.sleep(60)"
    code = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
    procs.start([sys.executable, "-c", code], pidfile, log, env={})
    sid = procs.session_of(pidfile)
    assert sid is not None
    assert procs.wait_until(lambda: len(procs.members(sid)) == 2, timeout=10)
    assert procs.stop(pidfile, timeout=5)
    assert procs.members(sid) == [] and not pidfile.exists()
    assert procs.stop(pidfile) is False
