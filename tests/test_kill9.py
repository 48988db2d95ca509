"""wpd (or wp snapshot) killed with -9 at its worst moments, reproducibly:
a BPF program (tests/killer.py) sends SIGKILL as the process enters a
chosen syscall. Each test checks what the target itself sees afterwards,
and where something is lost, that it is what README.md's "Known limits"
says."""
import os
import signal
import subprocess

from conftest import needs_bcc
from fixtures_core import eventually, memtarget, wait_until  # noqa: F401 (memtarget is a fixture)
from fixtures_dedupe import DD, STORE_NAME
from fixtures_daemon import ROOT, WP, assert_untouched, slurp, wp, wpd  # noqa: F401 (fixtures)

pytestmark = needs_bcc

SYS_PTRACE, SYS_KILL, SYS_PROCESS_VM_READV = 101, 62, 310
PTRACE_CONT, PTRACE_SYSCALL = 7, 24


def kill_at(pid, nr, nth=1, cond="", sig=signal.SIGKILL):
    from killer import KillAt
    return KillAt(pid, nr, nth, cond, sig)


def test_kill9_during_attach_injection(wpd, memtarget):
    """wpd dies while a thread of the target runs an injected syscall (it
    is let go into userfaultfd() with wpd's registers): the kernel detaches
    it with those registers and the process dies of SIGSEGV. This is the
    loss README.md names; wp attach says wpd went away (exit 3)."""
    t = memtarget("anon", 4)
    with kill_at(wpd.pid, SYS_PTRACE, 1, "if (args->args[0] != %d) return 0;" % PTRACE_SYSCALL) as k:
        r = wp(wpd, "attach", t.pid, check=False)
        assert wpd.wait(10) == -signal.SIGKILL and k.hits() == 1
    assert r.returncode == 3 and "wpd closed the connection" in r.stderr, r.stderr
    assert t.proc.wait(10) == -signal.SIGSEGV


def test_kill9_at_wp_run_exec_stop(wpd, tmp_path):
    """wpd dies as it stops wp run's command at its exec (right after its
    kill(SIGSTOP)): the command never runs an instruction of its own (it
    would create a file first), wp run kills it rather than leave it
    stopped or let it run unprotected, and exits 3 saying so."""
    ran = tmp_path / "ran"
    cond = "if (args->args[1] != %d) return 0;" % signal.SIGSTOP
    with kill_at(wpd.pid, SYS_KILL, 1, cond) as k:
        r = subprocess.run(WP + ["--socket", wpd.sock, "run", "--", "sh", "-c", "echo ran > %s" % ran],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert wpd.wait(10) == -signal.SIGKILL and k.hits() == 1
    assert r.returncode == 3, r.stderr
    assert "wpd went away before the command was protected" in r.stderr
    assert "killed before it could run unprotected" in r.stderr
    assert not ran.exists()


def test_wpd_stuck_at_wp_run_exec_stop(wpd, tmp_path):
    """wpd stops (SIGSTOP, as a debugger or a stuck thread would) as it
    stops wp run's command at its exec: wp run gives up after --timeout
    (exit 3, saying how to unstick wpd), the command never runs, and SIGINT
    is not needed to get out; wpd, continued, serves on."""
    ran = tmp_path / "ran"
    cond = "if (args->args[1] != %d) return 0;" % signal.SIGSTOP
    try:
        with kill_at(wpd.pid, SYS_KILL, 1, cond, sig=signal.SIGSTOP) as k:
            r = subprocess.run(WP + ["--socket", wpd.sock, "--timeout", "1", "run", "--", "sh", "-c",
                                     "echo ran > %s" % ran], capture_output=True, text=True, cwd=ROOT,
                               timeout=60)
            assert k.hits() == 1
        assert r.returncode == 3 and "did not answer within 1 s" in r.stderr, r.stderr
        assert not ran.exists()
    finally:
        os.kill(wpd.pid, signal.SIGCONT)
    assert wp(wpd, "status").returncode == 0
    assert not ran.exists()
    # wpd, continued, lets go of the killed command (no traced zombie kept).
    assert eventually(lambda: "was killed at its exec" in slurp(wpd.logfile), True)
    assert eventually(lambda: _traced_by(wpd.pid), []) == []


def _traced_by(tracer):
    out = []
    for d in os.listdir("/proc"):
        try:
            with open("/proc/%s/status" % d) as f:
                if "TracerPid:\t%d\n" % tracer in f.read():
                    out.append(int(d))
        except (OSError, ValueError):
            pass
    return out


def test_kill9_during_snapshot_copy(memtarget, tmp_path):
    """wp snapshot dies while it copies (at its eighth process_vm_readv):
    the target runs on with its data, unprotected and untraced (the
    kernel closed the snapshot's uffd); an existing FILE is left as it was
    and the incomplete copy is FILE.partial, never a truncated FILE."""
    t = memtarget("anon", 4096)
    for i in range(0, 4096, 512):
        t.write(i, i % 251 + 1)
    out = tmp_path / "core"
    out.write_text("an older core\n")
    # exec keeps the pid: arm the kill on the shell, then let it exec.
    p = subprocess.Popen(["sh", "-c", "read go; exec \"$@\"", "sh"] + WP +
                         ["snapshot", str(t.pid), "-o", str(out), "--quiet"],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        with kill_at(p.pid, SYS_PROCESS_VM_READV, 8) as k:
            p.stdin.write("go\n")
            p.stdin.close()
            assert p.wait(60) == -signal.SIGKILL, p.stderr.read()
            assert k.hits() == 8
    finally:
        p.stderr.close()
    assert out.read_text() == "an older core\n"
    assert (tmp_path / "core.partial").exists()
    assert_untouched(t)
    for i in range(0, 4096, 512):
        assert t.read(i)[0] == i % 251 + 1
    t.write(1, 9)
    assert t.read(1)[0] == 9


def test_kill9_during_dedupe_passes(wpd, target_bin, spawn):
    """wpd dies during dedupe's passes, at its 5th and 16th PTRACE_CONT
    (a pass's seizes and merge batches; if there are fewer, it is killed
    after 10 s, any moment must do): the target either
    runs on with every page as it wrote it (checked by the target) and the
    guardian has unmerged it (no store mapped), or, if wpd died while the
    target ran a merge batch's code, it died of that batch's SIGTRAP, the
    loss README.md names. Never alive with wrong data."""
    outcomes = []
    for nth in (5, 16):
        t = DD(spawn([target_bin("dd_target"), "16384", "16"]), 16384, 16)
        d = _wpd(spawn, wpd, nth)
        with kill_at(d.pid, SYS_PTRACE, nth, "if (args->args[0] != %d) return 0;" % PTRACE_CONT):
            subprocess.run(WP + ["--socket", d.sock, "attach", str(t.pid), "--protector", "dedupe",
                                 "--region", "anon"], capture_output=True, text=True, cwd=ROOT, timeout=60)
            try:
                d.wait(10)
            except subprocess.TimeoutExpired:
                d.kill()
            assert d.wait(10) == -signal.SIGKILL
        wait_until(lambda: t.proc.poll() is not None or STORE_NAME not in _maps(t.pid),
                   "the target unmerged by the guardian, or ended", 20)
        if t.proc.poll() is None:
            assert t.check() == 0, "page contents as the target wrote them"
            assert STORE_NAME not in _maps(t.pid), "the guardian unmerged"
            outcomes.append("alive")
        else:
            assert t.proc.wait() == -signal.SIGTRAP
            outcomes.append("SIGTRAP")
    assert outcomes


def _maps(pid):
    try:
        return slurp("/proc/%d/maps" % pid)
    except OSError:
        return ""


def _wpd(spawn, base, n):
    """Another wpd next to the fixture's, on a socket of its own."""
    sock = "%s.%d" % (base.sock, n)
    p = spawn(WP[:2] + ["wp.daemon", "--socket", sock], stdout=None, stderr=subprocess.DEVNULL, cwd=ROOT)
    wait_until(lambda: os.path.exists(sock) or p.poll() is not None, "wpd's socket %s" % sock, 10)
    assert p.poll() is None
    p.sock = sock
    return p
