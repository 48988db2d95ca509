"""wp failing inside wpd: a fault loop that dies, a fork wpd cannot follow,
a detach that fails at SIGTERM. The memory is released (no writer left
blocked, no page left protected), the target is listed as failed with the
error, and wpd serves the others."""
import json
import os
import select
import signal

import pytest

from fixtures_core import eventually, memtarget  # noqa: F401 (memtarget is a fixture)
from fixtures_daemon import assert_untouched, slurp, wp, wpd  # noqa: F401 (fixtures)


def cmd(t, line, timeout=10):
    """memtarget command with a deadline: a writer left blocked fails the
    test instead of hanging it."""
    t.proc.stdin.write(line + "\n")
    t.proc.stdin.flush()
    r, _, _ = select.select([t.proc.stdout], [], [], timeout)
    assert r, "target %d did not answer %r within %d s: a writer left blocked" % (t.pid, line, timeout)
    return t.proc.stdout.readline().split()


def rng(t):
    return "%x-%x" % (t.addr, t.addr + t.length)


def status_of(wpd, pid):
    st = json.loads(wp(wpd, "status", "--json").stdout)
    return next((e for e in st["targets"] if e["pid"] == pid), None)


def test_fault_loop_death_releases_the_target(wpd, memtarget):
    """A protector raising SystemExit ends its fault loop (a BaseException
    is not a callback's error). The writer goes on with its data, the pages
    are no longer protected, wp status and wp stats say the target failed
    and why; the other target is still protected and served."""
    dying = memtarget("anon", 8)
    other = memtarget("anon", 8)
    wp(wpd, "attach", dying.pid, "--protector", "user_protector:ExitOnWrite", "--region", rng(dying))
    wp(wpd, "attach", other.pid, "-o", "exact=true", "--region", rng(other))
    assert all(dying.wp_bits())
    assert cmd(dying, "w 3 7")[0] == "done"
    assert dying.read(3) == (7, 7 * 4096)
    assert eventually(lambda: any(dying.wp_bits()), False) is False, "its memory is released"
    assert cmd(dying, "w 5 9")[0] == "done" and dying.read(5)[0] == 9
    entry = status_of(wpd, dying.pid)
    assert "SystemExit: exit-on-write ends the fault loop" in entry["failed"], entry
    r = wp(wpd, "status")
    assert "FAILED, not protected" in r.stdout
    st = json.loads(wp(wpd, "stats", dying.pid, "--json").stdout)
    assert "fault loop of pid %d died" % dying.pid in st["failed"]
    assert "FAILED" in wp(wpd, "stats", dying.pid).stdout
    # The other target: protected, its fault handled.
    assert status_of(wpd, other.pid)["failed"] is None
    other.write(2, 4)
    assert json.loads(wp(wpd, "stats", other.pid, "--json").stdout)["faults"] == 1
    wp(wpd, "detach", dying.pid)
    wp(wpd, "detach", other.pid)
    assert_untouched(dying)
    assert_untouched(other)
    assert "fault loop of pid %d died" % dying.pid in slurp(wpd.logfile)


PIDS_CGROUP = "/sys/fs/cgroup/pids"


@pytest.fixture
def pids_limit(wpd):
    """Puts wpd in a pids cgroup of its own; yields set(limit) ("max" lifts
    it); wpd goes back to the root cgroup at teardown."""
    if not os.path.isdir(PIDS_CGROUP):
        pytest.skip("no cgroup v1 pids controller at %s" % PIDS_CGROUP)
    d = os.path.join(PIDS_CGROUP, "wp-test-%d" % os.getpid())
    os.mkdir(d)

    def put(name, value):
        with open(os.path.join(d, name), "w") as f:
            f.write(str(value))

    def read(name):
        with open(os.path.join(d, name)) as f:
            return f.read().strip()
    put("cgroup.procs", wpd.pid)
    limit = type("Limit", (), {"set": staticmethod(lambda v: put("pids.max", v)),
                               "current": staticmethod(lambda: int(read("pids.current")))})
    try:
        yield limit
    finally:
        put("pids.max", "max")
        if wpd.poll() is None:
            with open(os.path.join(PIDS_CGROUP, "cgroup.procs"), "w") as f:
                f.write(str(wpd.pid))
        eventually(lambda: read("cgroup.procs"), "")
        os.rmdir(d)


def test_fork_wpd_cannot_follow_releases_the_child(wpd, memtarget, pids_limit):
    """wpd cannot start the forked child's fault loop (its pids cgroup is
    full: a real limit, root is not exempt): it closes the child's uffd, so
    the child's writes go through, and marks the target failed; no writer
    anywhere is left blocked; wpd serves again once it has threads."""
    t = memtarget("anon", 8)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", rng(t))
    t.write(1, 5)
    # wpd's threads now: main, the target's watcher and fault loop (client
    # threads of the wp commands above end with their connections).
    threads = len(os.listdir("/proc/%d/task" % wpd.pid))
    assert eventually(lambda: len(os.listdir("/proc/%d/task" % wpd.pid)), 3) == 3, threads
    pids_limit.set(pids_limit.current())
    out = cmd(t, "F 2 33")
    assert out[0] == "done" and out[2] == "0", "the child wrote and read back its page: %s" % out
    pids_limit.set("max")
    entry = status_of(wpd, t.pid)
    assert "cannot protect the child" in entry["failed"] and "can't start new thread" in entry["failed"]
    assert not any(t.wp_bits()), "the parent's memory is released too"
    assert cmd(t, "w 3 8")[0] == "done" and t.read(3)[0] == 8 and t.read(1)[0] == 5
    wp(wpd, "detach", t.pid)
    assert_untouched(t)
    # wpd attaches again as before.
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", rng(t))
    t.write(4, 1)
    assert json.loads(wp(wpd, "stats", t.pid, "--json").stdout)["faults"] == 1
    wp(wpd, "detach", t.pid)


def test_sigterm_detaches_every_target_past_a_failing_one(wpd, memtarget):
    """At SIGTERM one target's detach fails with an OSError (its protector's
    detach): wpd logs it, detaches the others all the same, removes its
    socket and exits 0."""
    bad = memtarget("anon", 4)
    good = memtarget("shared-anon", 4)
    wp(wpd, "attach", bad.pid, "--protector", "user_protector:FailingDetach", "--region", rng(bad))
    wp(wpd, "attach", good.pid, "-o", "exact=true", "--region", rng(good))
    bad.write(0, 1)
    good.write(0, 2)
    wpd.send_signal(signal.SIGTERM)
    assert wpd.wait(20) == 0, slurp(wpd.logfile)
    log = slurp(wpd.logfile)
    assert "detaching pid %d" % bad.pid in log and "failing-detach: its store is gone" in log
    assert "detached pid %d after 1 faults" % good.pid in log
    assert not os.path.exists(wpd.sock)
    for t, v in ((bad, 1), (good, 2)):
        assert_untouched(t)
        t.write(1, v)
        assert t.read(0)[0] == v and t.read(1)[0] == v
