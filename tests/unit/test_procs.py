import subprocess
import sys
import time
from pathlib import Path

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


def test_a_slow_stop_leaves_the_pid_file_of_a_service_started_meanwhile(tmp_path):
    """`rclone serve s3` took seconds to end on SIGTERM while clients retried; the stack was started again meanwhile
    (a restart after an outage) and the old stop, ending, deleted the new service's pid file: `down` then left the
    new server running."""
    import threading
    import time

    pidfile, log = tmp_path / "svc.sid", tmp_path / "svc.log"
    ready = tmp_path / "ready"
    slow = "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (time.sleep(2), sys.exit(0)))"
    slow += f"; pathlib.Path({str(ready)!r}).touch(); time.sleep(60)"
    procs.start([sys.executable, "-c", slow], pidfile, log, env={})
    old = procs.session_of(pidfile)
    assert procs.wait_until(ready.exists, timeout=30)  # its handler installed (a loaded machine starts it late)
    stopping = threading.Thread(target=procs.stop, args=(pidfile, 10))
    stopping.start()
    time.sleep(0.5)
    procs.start([sys.executable, "-c", "import time; time.sleep(60)"], pidfile, log, env={})
    new = procs.session_of(pidfile)
    stopping.join()
    assert procs.members(old) == [] and new != old
    assert procs.session_of(pidfile) == new  # still findable: the next stop ends it
    assert procs.stop(pidfile, timeout=5) and procs.members(new) == []


def test_a_hub_its_clients_need_while_they_end_is_stopped_after_them(tmp_path):
    """Ray's daemons, SIGTERMed together with its GCS, left one waiting for the GCS until the 15 s SIGKILL; with
    the hub ended last, each client ends on its own (here: it writes ``clean``, which a SIGKILL would not)."""
    pidfile, log, clean = tmp_path / "svc.sid", tmp_path / "svc.log", tmp_path / "clean"
    client = (
        "import pathlib, signal, sys, time, psutil\n"
        "def end(*a):\n"
        "    time.sleep(0.5)\n"
        "    hub = [p for p in psutil.Process().parent().children() if 'hub' in p.cmdline()]\n"
        "    if not hub or hub[0].status() == psutil.STATUS_ZOMBIE:\n"
        "        time.sleep(60)  # its hub went first: it waits for an answer that will not come\n"
        "    pathlib.Path(sys.argv[1]).write_text('clean')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, end)\n"
        "pathlib.Path(sys.argv[1] + '.ready').touch()\n"
        "time.sleep(60)\n"
    )
    parent = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', 'hub'])\n"
        f"subprocess.Popen([sys.executable, '-c', {client!r}, {str(clean)!r}])\n"
        "time.sleep(60)\n"
    )
    procs.start([sys.executable, "-c", parent], pidfile, log, env={})
    sid = procs.session_of(pidfile)
    assert procs.wait_until(lambda: len(procs.members(sid)) == 3, timeout=10)
    assert procs.wait_until(Path(f"{clean}.ready").exists, timeout=30)  # the client's handler installed
    # A SIGKILL after 30 s, not 5: on a loaded machine (CI, the suite's tiers side by side) the client once took
    # longer than 5 s to end, and was killed before writing. Ended in the wrong order, it would wait 60 s.
    assert procs.stop(pidfile, timeout=30, last=lambda p: "hub" in p.cmdline())
    assert procs.members(sid) == [] and clean.read_text() == "clean"


def test_a_pid_file_is_read_and_removed_under_a_lock_other_processes_wait_for(tmp_path):
    """A stop's reading of its session and removal of the file, and a start's writing of it, happen under one lock
    across processes: here another process holds it (as a stop between its read and its removal would), and
    looking up the service waits for it before it finds the file stale and removes it."""
    pidfile = tmp_path / "svc.sid"
    pidfile.write_text("999999999")  # no such session
    lock = tmp_path / "svc.sid.lock"
    hold = f"import fcntl, time; f = open({str(lock)!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True)"
    holder = subprocess.Popen([sys.executable, "-c", hold + "; time.sleep(3)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "1"
    t = time.monotonic()
    assert procs.session_of(pidfile) is None and not pidfile.exists()
    assert time.monotonic() - t >= 1.5  # it waited for the holder
    holder.wait()
