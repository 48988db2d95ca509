"""wpd and wp against real targets: attach, protect, detach, and bad input."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import needs_bcc
from fixtures_core import (MemTarget, eventually, memtarget, proc_status, wait_state,  # noqa: F401
                           wait_until)
from fixtures_daemon import ROOT, WP, assert_untouched, slurp, wp, wpd  # noqa: F401 (fixtures)


def test_attach_trace_detach(wpd, memtarget):
    t = memtarget("anon", 16)
    r = wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "%x-%x" % (t.addr, t.addr + t.length), "--json")
    reply = json.loads(r.stdout)
    assert [(int(x["start"], 16), int(x["end"], 16)) for x in reply["regions"]] == [(t.addr, t.addr + t.length)]
    assert all(t.wp_bits()), "every page of the range is write-protected"
    assert proc_status(t.pid)["TracerPid"].strip() == "0", "not left traced after attach"
    for i in range(10):
        t.write(i, i + 1)
    t.write(0, 50)  # second write to a page: no new fault
    st = json.loads(wp(wpd, "stats", t.pid, "--json").stdout)
    assert st["faults"] == 10
    assert st["regions"][0]["faults"] == 10
    assert st["protector_stats"]["first_writes"] == 10
    bits = t.wp_bits()
    assert bits[:10] == [False] * 10 and all(bits[10:])
    wp(wpd, "detach", t.pid)
    assert_untouched(t)
    assert t.read(0) == (50, 50 * 4096)
    assert t.read(9) == (10, 10 * 4096)
    t.send("q")     # it exits without a word
    assert t.proc.wait(5) == 0


def test_default_attach_counts_writes_without_a_round_trip(wpd, memtarget):
    """The default `wp attach` (trace, counts mode) needs only a notice of
    writes: async WP everywhere, so no write waits for wpd (no sync fault);
    the pages written are counted by PAGEMAP_SCAN, at the latest at detach,
    and re-armed; `-o exact=true` gives a sync fault per first write."""
    t = memtarget("memfd", 16)
    reply = json.loads(wp(wpd, "attach", t.pid, "--json").stdout)
    assert {r["mode"] for r in reply["regions"]} == {"async"}
    assert all(t.wp_bits()), "every page of the memfd is write-protected (async)"
    for i in range(6):
        t.write(i, i + 1)
    st = json.loads(wp(wpd, "stats", t.pid, "--json").stdout)
    assert st["faults"] == 0 and st["protector_stats"]["mode"] == "counts"
    final = json.loads(wp(wpd, "detach", t.pid, "--json").stdout)["stats"]
    memfd = [r for r in final["regions"] if r["kind"] == "memfd"]
    assert sum(r["written_pages"] for r in memfd) == 6, "the last scan at detach saw all six"
    assert final["protector_stats"]["async_pages_written"] >= 6
    assert_untouched(t)
    assert [t.read(i)[0] for i in range(6)] == [1, 2, 3, 4, 5, 6]


def test_attach_all_regions_and_status(wpd, memtarget):
    t = memtarget("memfd", 8)
    wp(wpd, "attach", t.pid, "-o", "exact=true")
    status = json.loads(wp(wpd, "status", "--json").stdout)
    [entry] = status["targets"]
    assert entry["pid"] == t.pid and entry["comm"] == "memtarget"
    st = json.loads(wp(wpd, "stats", t.pid, "--json").stdout)
    kinds = {r["kind"] for r in st["regions"]}
    assert {"anon", "memfd"} <= kinds
    before = st["faults"]
    for i in range(8):
        t.write(i, 7)
    st = json.loads(wp(wpd, "stats", t.pid, "--json").stdout)
    memfd = [r for r in st["regions"] if r["kind"] == "memfd"]
    assert sum(r["faults"] for r in memfd) == 8
    assert st["faults"] >= before + 8
    wp(wpd, "detach", t.pid)
    assert_untouched(t)
    assert [t.read(i)[0] for i in range(8)] == [7] * 8


@pytest.mark.parametrize("pid, message", [
    (999999, "no such process"),
    (1, "init"),
    (2, "kernel thread"),
])
def test_bad_pids(wpd, pid, message):
    r = wp(wpd, "attach", pid, check=False)
    assert r.returncode == 4
    assert message in r.stderr


def test_refuse_self_second_attach_and_bad_ranges(wpd, memtarget):
    r = wp(wpd, "attach", wpd.pid, check=False)
    assert r.returncode == 4 and "wpd itself" in r.stderr
    t = memtarget("anon", 4)
    maps_before = slurp("/proc/%d/maps" % t.pid)
    end = t.addr + t.length
    for spec, msg in [("%x-%x" % (t.addr + 1, end), "not aligned"),
                      ("%x-%x" % (0x1000, 0x3000), "not mapped"),
                      ("nonsense", "unknown region")]:
        r = wp(wpd, "attach", t.pid, "--region", spec, check=False)
        assert r.returncode == 4, r.stderr
        assert msg in r.stderr
    assert slurp("/proc/%d/maps" % t.pid) == maps_before
    assert_untouched(t)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "anon")
    r = wp(wpd, "attach", t.pid, check=False)
    assert r.returncode == 4 and "already attached" in r.stderr
    t.write(1, 3)
    wp(wpd, "detach", t.pid)
    r = wp(wpd, "detach", t.pid, check=False)
    assert r.returncode == 4 and "not attached" in r.stderr
    assert t.read(1) == (3, 3 * 4096)


def test_snapshot_and_track_of_a_wpd_target_name_the_fix(wpd, memtarget, tmp_path):
    """A page takes one userfaultfd at a time: wp snapshot and wp track of
    a process wpd protects are refused (exit 4) with the fix named (wp
    detach), and change nothing: wpd still sees the next write."""
    t = memtarget("anon", 8)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "anon")
    maps_before = slurp("/proc/%d/maps" % t.pid)
    for cmd in (["snapshot", t.pid, "-o", tmp_path / "core"],
                ["track", t.pid, "--interval", "0.2", "--count", "1"]):
        r = wp(wpd, *cmd, check=False)
        assert r.returncode == 4, (cmd, r.stderr)
        assert "wp detach %d" % t.pid in r.stderr, r.stderr
        assert "Tracking" not in r.stderr     # said only once it tracks
    assert slurp("/proc/%d/maps" % t.pid) == maps_before
    assert not (tmp_path / "core").exists()
    def faults_on_page_2():
        st = json.loads(wp(wpd, "stats", t.pid, "--json").stdout)
        return sum(r["faults"] for r in st["regions"]
                   if int(r["start"], 16) <= t.addr + 2 * 4096 < int(r["end"], 16))
    assert t.wp_bits()[2], "wpd's protection of page 2 is still there"
    before = faults_on_page_2()
    t.write(2, 7)
    assert faults_on_page_2() == before + 1
    wp(wpd, "detach", t.pid)
    assert t.read(2) == (7, 7 * 4096)


@pytest.mark.parametrize("pid, message", [
    (999999, "no such process"),
    (1, "init"),
    (2, "kernel thread"),
])
def test_snapshot_and_track_bad_pids(wpd, pid, message, tmp_path):
    """wp snapshot and wp track refuse the pids wp attach refuses, with the
    same words and exit 4, before touching anything."""
    r = wp(wpd, "snapshot", pid, "-o", tmp_path / "core", check=False)
    assert r.returncode == 4 and message in r.stderr, r.stderr
    assert not (tmp_path / "core").exists()
    r = wp(wpd, "track", pid, "--interval", "0.2", "--count", "1", check=False)
    assert r.returncode == 4 and message in r.stderr, r.stderr


def test_main_thread_exited_is_refused(wpd, target_bin, spawn, tmp_path):
    """A process whose main thread called pthread_exit() (a zombie leader,
    other threads alive): attach, snapshot and track refuse it with what is
    wrong (not "no memory left", nor a failure half way), exit 4, and its
    threads run on."""
    p = spawn([target_bin("rt_zombie_leader")])
    assert p.stdout.readline().startswith("ready")
    wait_state(p.pid, "Z")      # the leader, a zombie; its threads run on
    for cmd in (["attach", p.pid], ["snapshot", p.pid, "-o", tmp_path / "core"],
                ["track", p.pid, "--interval", "0.2", "--count", "1"]):
        r = wp(wpd, *cmd, check=False)
        assert r.returncode == 4 and "main thread has exited" in r.stderr, (cmd, r.stderr)
    assert not (tmp_path / "core").exists()
    p.stdin.write("q\n")
    p.stdin.flush()
    assert p.stdout.readline().startswith("ok")


def test_non_root_client(wpd, readable_wp):
    # The socket is 0600: a non-root client cannot even connect. Open it up to
    # check that wpd's own credential check (SO_PEERCRED) refuses it too.
    base = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", readable_wp.python, "-m", "wp.cli"]
    r = subprocess.run(base + ["--socket", wpd.sock, "status"], capture_output=True, text=True,
                       env=readable_wp.env, cwd="/")
    assert r.returncode == 3 and "root" in r.stderr, r.stderr
    os.chmod(os.path.dirname(wpd.sock), 0o755)
    os.chmod(wpd.sock, 0o666)
    r = subprocess.run(base + ["--socket", wpd.sock, "status"], capture_output=True, text=True,
                       env=readable_wp.env, cwd="/")
    assert r.returncode == 4 and "serves root only" in r.stderr, r.stderr


def test_non_root_snapshot_track_trace(tmp_path, readable_wp):
    """The commands that act without wpd refuse a non-root user (exit 4,
    naming root) even on the user's own process, and leave it as it was."""
    base = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    target = subprocess.Popen(base + ["sleep", "60"])
    try:
        for args in (["snapshot", target.pid, "-o", tmp_path / "core"],
                     ["track", target.pid, "--count", "1"],
                     ["trace", target.pid, "--duration", "1"]):
            r = subprocess.run(base + [readable_wp.python, "-m", "wp.cli"] + [str(a) for a in args],
                               capture_output=True, text=True, env=readable_wp.env, cwd="/", timeout=60)
            assert r.returncode == 4 and "needs root" in r.stderr, (args, r.stderr)
        assert not (tmp_path / "core").exists()
        assert proc_status(target.pid)["TracerPid"].strip() == "0"
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()


def test_exec_drops_the_session(wpd, tmp_path):
    """exec gives the target a new address space that nothing protects and
    sends no uffd event: wpd notices at its next rescan, says so and drops
    the session; the new program runs untouched."""
    code = ("import os, sys; b = bytearray(1 << 22); sys.stdout.write('ready\\n'); sys.stdout.flush(); "
            "sys.stdin.readline(); os.execvp('sleep', ['sleep', '30'])")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        wp(wpd, "attach", p.pid, "-o", "exact=true", "--region", "anon")
        p.stdin.write("go\n")
        p.stdin.flush()
        wait_until(lambda: json.loads(wp(wpd, "status", "--json").stdout)["targets"] == [],
                   "wpd dropping the target", 10)
        assert "pid %d executed a new program (sleep)" % p.pid in slurp(wpd.logfile)
        assert p.poll() is None and proc_status(p.pid)["TracerPid"].strip() == "0"
        r = wp(wpd, "stats", p.pid, check=False)
        assert r.returncode == 4 and "not attached" in r.stderr
    finally:
        p.kill()
        p.wait()
        p.stdin.close()
        p.stdout.close()


def test_kill9_daemon_leaves_target_running(wpd, memtarget):
    t = memtarget("anon", 8)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "anon")
    for i in range(4):
        t.write(i, 9)
    assert any(t.wp_bits())
    wpd.kill()
    wpd.wait(10)
    # The kernel dropped the uffd with wpd: no protection, writes go through.
    for i in range(8):
        t.write(i, 11)
    assert_untouched(t)
    assert [t.read(i)[0] for i in range(8)] == [11] * 8


def test_sigterm_detaches(wpd, memtarget):
    t = memtarget("shared-anon", 8)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "shmem")
    t.write(0, 5)
    wpd.send_signal(signal.SIGTERM)
    assert wpd.wait(20) == 0
    assert "detaching 1 targets" in slurp(wpd.logfile)
    assert_untouched(t)
    t.write(1, 6)
    assert t.read(0)[0] == 5 and t.read(1)[0] == 6


def test_target_exit_while_protected(wpd, memtarget):
    t = memtarget("anon", 4)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "anon")
    t.write(0, 1)
    t.send("q")
    assert t.proc.wait(5) == 0
    wait_until(lambda: json.loads(wp(wpd, "status", "--json").stdout)["targets"] == [],
               "wpd dropping the target", 5)
    # its last stats stay with wpd (wp stats after a `wp run` program ended)
    st = json.loads(wp(wpd, "stats", t.pid, "--json").stdout)
    assert st["ended"] == "exited" and st["faults"] >= 1


def test_fork_child_protected(wpd, memtarget):
    t = memtarget("shared-anon", 8)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "shmem")
    child = int(t.cmd("f 2 33")[1])
    st = json.loads(wp(wpd, "stats", t.pid, "--json").stdout)
    assert st["events"].get("fork") == 1
    assert st["children"] == [child]
    assert st["faults"] == 1, "the child's write was caught by the child's uffd"
    assert t.read(2)[0] == 33
    wp(wpd, "detach", t.pid)
    assert_untouched(t)


def test_run_passes_exit_status(wpd, target_bin):
    r = wp(wpd, "run", "--region", "anon", "--", "sh", "-c", "exit 7", check=False)
    assert r.returncode == 7, r.stderr
    assert "protected from exec" in r.stderr
    r = wp(wpd, "run", "-o", "exact=true", "--", sys.executable, "-c",
           "b = bytearray(8 << 20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint(sum(b))")
    assert r.stdout.strip() == str(2048)
    r = wp(wpd, "run", "--", "/nonexistent/cmd", check=False)
    assert r.returncode == 127


def test_many_targets_at_once(wpd, memtarget):
    targets = [memtarget(kind, 8) for kind in ("anon", "memfd", "shared-anon")]
    for t in targets:
        wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "%x-%x" % (t.addr, t.addr + t.length))
    for n, t in enumerate(targets):
        for i in range(n + 2):
            t.write(i, 40 + n)
    status = json.loads(wp(wpd, "status", "--json").stdout)
    assert sorted(e["pid"] for e in status["targets"]) == sorted(t.pid for t in targets)
    for n, t in enumerate(targets):
        assert json.loads(wp(wpd, "stats", t.pid, "--json").stdout)["faults"] == n + 2
    for t in targets:
        wp(wpd, "detach", t.pid)
        assert_untouched(t)
        assert t.read(0)[0] == 40 + targets.index(t)


def test_run_protects_from_the_first_instruction(wpd):
    # The program writes its stack and data from its first instructions on;
    # wpd must have seen those writes before it had time to map anything.
    r = subprocess.Popen(WP + ["--socket", wpd.sock, "run", "-o", "exact=true", "--json", "--", "sh", "-c", "sleep 1; exit 3"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    reply = json.loads(r.stderr.readline())
    pid = reply["pid"]
    assert reply["phase"] == "running" and reply["regions"]
    st = json.loads(wp(wpd, "stats", pid, "--json").stdout)
    assert st["faults"] > 0, "writes made right after exec were caught"
    assert proc_status(pid)["TracerPid"].strip() == "0"
    assert r.wait(20) == 3
    r.stdout.close()
    r.stderr.close()


def test_user_protector(wpd, memtarget):
    t = memtarget("anon", 4)
    wp(wpd, "attach", t.pid, "--protector", "user_protector:EveryOther",
       "--region", "%x-%x" % (t.addr, t.addr + t.length))
    for i in range(3):
        t.write(i, 9)
    st = json.loads(wp(wpd, "stats", t.pid, "--json").stdout)
    assert st["protector"] == "every-other"
    assert st["protector_stats"] == {"pages": 3, "attempts": 6}
    assert st["faults"] == 6
    wp(wpd, "detach", t.pid)
    assert [t.read(i)[0] for i in range(3)] == [9, 9, 9]
    r = wp(wpd, "attach", t.pid, "--protector", "no_such_module:X", check=False)
    assert r.returncode == 4 and "cannot load protector" in r.stderr
    r = wp(wpd, "attach", t.pid, "-o", "no_such_knob=1", check=False)
    assert r.returncode == 4 and "does not take these options" in r.stderr
    assert_untouched(t)


@pytest.mark.parametrize("protector, name", [("snapshot", "snapshot"), ("dedupe", "dedupe"),
                                             ("user_protector:EveryOther", "every-other")])
def test_c_handler_refused_unless_declared(wpd, memtarget, tmp_path, protector, name):
    """--handler c unprotects every write without calling the protector:
    refused (exit 4, the reason and the fix named) for any protector that
    does not declare that this is all it needs, through wp attach, wp run
    and the protocol, before anything changes in the target."""
    from wp import protocol
    t = memtarget("anon", 4)
    maps_before = slurp("/proc/%d/maps" % t.pid)
    reason = "protector %s cannot run with --handler c" % name
    r = wp(wpd, "attach", t.pid, "--handler", "c", "--protector", protector, check=False)
    assert r.returncode == 4, r.stderr
    assert reason in r.stderr and "use --handler python" in r.stderr
    marker = tmp_path / "ran"
    r = wp(wpd, "run", "--handler", "c", "--protector", protector, "--", "touch", marker, check=False)
    assert r.returncode == 4 and reason in r.stderr, r.stderr
    assert not marker.exists(), "the command ran"
    conn = protocol.Connection.connect(wpd.sock)
    try:
        reply = conn.request({"op": "attach", "pid": t.pid, "protector": protector, "handler": "c"})
    finally:
        conn.close()
    assert not reply["ok"] and reply["type"] == "BadRequest" and reason in reply["error"]
    assert json.loads(wp(wpd, "status", "--json").stdout)["targets"] == []
    assert slurp("/proc/%d/maps" % t.pid) == maps_before
    assert_untouched(t)
    t.write(1, 4)
    assert t.read(1) == (4, 4 * 4096)


@pytest.mark.parametrize("protector, sync", [("trace", "exact=true"), ("track", "sync=true")])
def test_c_handler_for_declared_protectors(wpd, memtarget, protector, sync):
    """trace and track declare that unprotecting is all they need: the C
    handler takes their (sync) write faults and still counts them per
    region."""
    t = memtarget("memfd", 8)
    wp(wpd, "attach", t.pid, "--handler", "c", "--protector", protector, "-o", sync)
    for i in range(5):
        t.write(i, 3)
    # Counted when the message is read, before the writer is woken.
    st = json.loads(wp(wpd, "stats", t.pid, "--json").stdout)
    memfd = [r for r in st["regions"] if r["kind"] == "memfd"]
    assert st["handler"] == "c" and sum(r["faults"] for r in memfd) == 5
    wp(wpd, "detach", t.pid)
    assert_untouched(t)
    assert [t.read(i)[0] for i in range(5)] == [3] * 5


@pytest.fixture
def strict_userfaultfd():
    """vm.unprivileged_userfaultfd = 0 (the default), restored at teardown."""
    path = "/proc/sys/vm/unprivileged_userfaultfd"
    old = slurp(path).strip()
    with open(path, "w") as f:
        f.write("0")
    yield path
    with open(path, "w") as f:
        f.write(old)


def test_attach_non_root_target(wpd, readable_wp, spawn, strict_userfaultfd):
    # The kernel checks the creating (target's) credentials: wp allows
    # unprivileged userfaultfd for the one injected call and puts it back.
    p = spawn([readable_wp.binary("memtarget"), "anon", "4"], cwd="/", user=65534, group=65534,
              extra_groups=[])
    t = MemTarget(p, 4)
    from wp.remote import SYS, RemoteProcess
    with RemoteProcess(t.pid) as rp:   # what the kernel says without wp's help
        assert rp.syscall_raw(SYS["userfaultfd"], os.O_CLOEXEC) == -errno.EPERM
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "%x-%x" % (t.addr, t.addr + t.length))
    assert slurp(strict_userfaultfd).strip() == "0"
    t.write(1, 5)
    assert json.loads(wp(wpd, "stats", t.pid, "--json").stdout)["faults"] == 1
    wp(wpd, "detach", t.pid)
    assert_untouched(t)
    assert t.read(1)[0] == 5


@needs_bcc
@pytest.mark.parametrize("callbacks", [False, True])
def test_wp_trace_through_wpd(wpd, memtarget, tmp_path, callbacks):
    """`wp trace PID -o FILE`: wpd maps the tracer's notes map (pidfd_getfd)
    and its fault loop writes a note per fault: every phase and the
    decision, without daemon-side probes; with --callbacks the Python
    callback's own phase too, else the daemon's turn after the read is one
    phase (to_resolve)."""
    t = memtarget("anon", 8)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "%x-%x" % (t.addr, t.addr + t.length))
    out = tmp_path / "t.jsonl"
    proc = _trace(wpd, t, out, "--duration", "60", *(["--callbacks"] if callbacks else []))
    try:
        for i in range(8):
            t.write(i, i + 1)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    wp_recs = [r for r in recs if r["kind"] == "wp"]
    assert sorted(int(r["addr"], 16) & ~4095 for r in wp_recs) == [t.page(i) for i in range(8)]
    for r in wp_recs:
        assert r["decision"] == "unprotect" and r["handler"] == "python"
        assert {"to_read", "to_resolve", "wake", "to_run"} <= set(r["phases"])
        assert ({"to_callback", "callback"} <= set(r["phases"])) == callbacks
        assert ("cb_enter" in r["times"]) == callbacks
        assert sum(r["phases"].values()) == r["latency_ns"]
        assert r["handler_tid"] != t.pid and r["waker_tid"] == r["handler_tid"]
    end = recs[-1]
    assert end["kind"] == "meta" and end["lost"] == 0 and end["counters"]["notes"] == 8
    # the target's data is what it wrote
    assert [t.read(i)[0] for i in range(8)] == list(range(1, 9))
    wp(wpd, "detach", t.pid)
    assert_untouched(t)


def _trace(wpd, t, path, *extra):
    """A `wp trace` of memtarget t through wpd, once it is tracing."""
    proc = subprocess.Popen(WP + ["--socket", wpd.sock, "trace", str(t.pid), "-o", str(path)] + list(extra),
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    line = proc.stderr.readline()
    assert "Tracing" in line, line + proc.stderr.read()
    return proc


def _traced_by(wpd, t):
    st = json.loads(wp(wpd, "status", "--json").stdout)
    return next(x["traced_by"] for x in st["targets"] if x["pid"] == t.pid)


@needs_bcc
def test_a_newer_tracer_keeps_the_notes(wpd, memtarget, tmp_path):
    """A second `wp trace` takes the notes over; the first one ending does
    not turn them off for it."""
    t = memtarget("anon", 4)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "%x-%x" % (t.addr, t.addr + t.length))
    first = _trace(wpd, t, tmp_path / "1.jsonl")
    second = _trace(wpd, t, tmp_path / "2.jsonl")
    assert _traced_by(wpd, t) == second.pid
    first.send_signal(signal.SIGINT)
    assert first.wait(60) == 0
    assert _traced_by(wpd, t) == second.pid
    for i in range(4):
        t.write(i, i + 1)
    second.send_signal(signal.SIGINT)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    first.stderr.close()
    recs = [json.loads(line) for line in (tmp_path / "2.jsonl").read_text().splitlines()]
    wp_recs = [r for r in recs if r["kind"] == "wp"]
    assert len(wp_recs) == 4 and all("to_read" in r["phases"] for r in wp_recs)   # noted
    assert _traced_by(wpd, t) is None
    wp(wpd, "detach", t.pid)


@needs_bcc
def test_tracer_killed_leaves_target_and_wpd_working(wpd, memtarget, tmp_path):
    """A `wp trace` killed with -9 never says stop: wpd notices it is gone
    (its pidfd) and turns the notes off, the target's writes still complete
    with their data, and the next trace gets every phase again."""
    t = memtarget("anon", 8)
    wp(wpd, "attach", t.pid, "-o", "exact=true", "--region", "%x-%x" % (t.addr, t.addr + t.length))

    first = _trace(wpd, t, tmp_path / "1.jsonl")
    assert _traced_by(wpd, t) == first.pid
    t.write(0, 1)
    first.kill()
    first.communicate(timeout=30)
    assert eventually(lambda: _traced_by(wpd, t), None, timeout=5) is None, "wpd did not see the tracer die"
    for i in range(1, 4):
        t.write(i, i + 1)
    second = _trace(wpd, t, tmp_path / "2.jsonl")
    for i in range(4, 8):
        t.write(i, i + 1)
    second.send_signal(signal.SIGINT)
    _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    recs = [json.loads(line) for line in (tmp_path / "2.jsonl").read_text().splitlines()]
    wp_recs = [r for r in recs if r["kind"] == "wp"]
    assert sorted(int(r["addr"], 16) & ~4095 for r in wp_recs) == [t.page(i) for i in range(4, 8)]
    assert all("to_read" in r["phases"] and r["decision"] == "unprotect" for r in wp_recs)   # noted
    assert [t.read(i)[0] for i in range(8)] == list(range(1, 9))
    assert json.loads(wp(wpd, "stats", t.pid, "--json").stdout)["faults"] == 8
    wp(wpd, "detach", t.pid)
    assert_untouched(t)


@needs_bcc
def test_wp_trace_bad_targets(wpd, memtarget, tmp_path):
    """No such process, a kernel thread: refused (exit 4, as attach does),
    nothing traced. A process wpd has not attached: said so, and only its
    ordinary faults are traced."""
    r = wp(wpd, "trace", 999999, "-o", tmp_path / "none.jsonl", "--duration", "1", check=False)
    assert r.returncode == 4 and "no such process 999999" in r.stderr, r.stderr
    assert not (tmp_path / "none.jsonl").exists()
    r = wp(wpd, "trace", 2, "-o", tmp_path / "none.jsonl", "--duration", "1", check=False)
    assert r.returncode == 4 and "pid 2 is a kernel thread" in r.stderr
    assert not (tmp_path / "none.jsonl").exists()
    t = memtarget("anon", 4)
    out = tmp_path / "t.jsonl"
    r = wp(wpd, "trace", t.pid, "-o", out, "--duration", "1")
    assert "is not attached to wpd (`wp attach %d` first)" % t.pid in r.stderr
    assert out.read_text().splitlines()[-1].startswith('{"kind":"meta"')
    assert_untouched(t)


@pytest.mark.parametrize("protector,mode", [("trace", []), ("track", []), ("trace", ["--async"]),
                                            ("track", ["--async"])])
def test_writes_after_dontneed_seen_through_wpd(wpd, memtarget, protector, mode):
    """Issue 15 item 2, as a user sees it: 2,000 protected anonymous pages
    written, dropped (MADV_DONTNEED), written again: `wp stats` counts both
    rounds (sync: 4,000 faults; async: 4,000 pages written), and the target
    reads back what it wrote, then zeros after a last drop."""
    n = 2000
    t = memtarget("anon", n)
    sync = [] if mode else ["-o", "exact=true" if protector == "trace" else "sync=true"]
    wp(wpd, "attach", t.pid, "--protector", protector, "--region",
       "%x-%x" % (t.addr, t.addr + t.length), *mode, *sync)
    assert t.cmd("A 0 1")[0] == "done"
    assert t.cmd("D") == ["ok"]
    assert t.cmd("A 0 2")[0] == "done"
    key = "written_pages" if mode else "faults"

    def seen():
        return json.loads(wp(wpd, "stats", t.pid, "--json").stdout)[key]
    # async: wpd's scanner reports per interval
    wait_until(lambda: seen() >= 2 * n, lambda: "%d of %d writes seen" % (seen(), 2 * n))
    assert seen() == 2 * n
    assert t.cmd("S 0 2") == ["same", str(n)]
    assert t.cmd("D") == ["ok"] and t.cmd("S 0 0") == ["same", str(n)]
    wp(wpd, "detach", t.pid)
    assert_untouched(t)
