"""Syscalls injected into real running targets (tests/targets/*.c).

Each target checks its own invariants (no EINTR, no short sleep, no lost
byte, every register unchanged) and reports them when told to quit; the
tests check what the kernel says about the target afterwards (State,
TracerPid, /proc/PID/maps) and what the injected syscalls did.
"""
import os
import re
import signal
import threading
import time

import pytest

from wp.errors import NoSuchProcess, TargetError
from wp.remote import SYS, RemoteProcess

from fixtures_core import proc_status, syscall_of, wait_ready, wait_state, wait_syscall, wait_until

PAGE = 4096
MADV_NORMAL = 0


def assert_released(pid, stopped=False):
    """The target is not traced and not stopped (or stopped by job control
    when stopped is True: 'T', never ptrace's 't')."""
    st = proc_status(pid)
    assert st["TracerPid"] == "0"
    state = st["State"].split()[0]
    if stopped:
        assert state == "T", st["State"]
    else:
        assert state in ("S", "R", "D"), st["State"]


def signals_pending(pid):
    st = proc_status(pid)
    return int(st["SigPnd"], 16) | int(st["ShdPnd"], 16)


def wait_handled(pid):
    """Waits until no signal is pending and the target is back in read()."""
    wait_until(lambda: signals_pending(pid) == 0 and syscall_of(pid) == SYS["read"],
               "pid %d handled its signals and reads again" % pid)


NANOSLEEP = (230, 219)      # clock_nanosleep, or restart_syscall after a stop
PPOLL = 271


def exercise(rp, pid, rounds=40):
    """Runs 5 injected syscalls a round (200 for 40 rounds): getpid, mmap,
    munmap, userfaultfd and the close inside take_fd; checks each result."""
    for i in range(rounds):
        assert rp.syscall(SYS["getpid"]) == pid
        addr = rp.mmap_scratch(PAGE)
        assert addr % PAGE == 0
        data = bytes([i & 0xFF]) * 64
        rp.write_memory(addr, data)
        assert rp.read_memory(addr, 64) == data
        rp.munmap(addr, PAGE)
        fd = rp.open_userfaultfd()
        try:
            assert os.readlink("/proc/self/fd/%d" % fd) == "anon_inode:[userfaultfd]"
            os.fstat(fd)
        finally:
            os.close(fd)


def quit_target(p, cmd="q"):
    if not isinstance(p.stdout.read(0), str):
        cmd = cmd.encode()
    out, _ = p.communicate(cmd, timeout=20)
    return out.strip() if isinstance(out, str) else out.decode().strip()


def target_uffds(pid):
    n = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "anon_inode:[userfaultfd]":
                n += 1
        except FileNotFoundError:
            pass
    return n


# -- targets in the states that matter --------------------------------------

def test_sleeper(target_bin, spawn):
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    for _ in range(3):
        wait_syscall(p.pid, NANOSLEEP)
        with RemoteProcess(p.pid) as rp:
            exercise(rp, p.pid)
            regs = rp.saved_registers()
            assert rp.stops >= 400
        assert_released(p.pid)
    # It was stopped inside clock_nanosleep (230), which the kernel restarts.
    assert regs["orig_rax"] in NANOSLEEP
    assert target_uffds(p.pid) == 0
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_pipereader_loses_nothing(target_bin, spawn):
    p = spawn([target_bin("pipereader")], text=False)
    wait_ready(p)
    chunks = [bytes((i * 7 + j) & 0xFF for j in range(1000 + i)) for i in range(60)]
    stop = threading.Event()

    def feed():
        for c in chunks:
            p.stdin.write(c)
            p.stdin.flush()
            time.sleep(0.005)
        stop.set()

    th = threading.Thread(target=feed)
    th.start()
    try:
        while not stop.is_set():
            with RemoteProcess(p.pid) as rp:
                exercise(rp, p.pid, rounds=8)
            assert_released(p.pid)
    finally:
        th.join()
    # And once more, blocked in read on an idle pipe.
    wait_syscall(p.pid, (SYS["read"],))
    with RemoteProcess(p.pid) as rp:
        exercise(rp, p.pid)
        assert rp.saved_registers()["orig_rax"] == SYS["read"]
    assert_released(p.pid)
    data = b"".join(chunks)
    out = quit_target(p, "")
    wsum = sum(b * (i + 1) for i, b in enumerate(data))
    assert out == "total %d sum %d wsum %d eintr 0 usr1 0 trap 0" % (len(data), sum(data), wsum)


def test_signal_during_injection_is_delivered(target_bin, spawn):
    """SIGUSR1 sent while the thread is held stays pending and runs the
    target's handler after detach; read() restarts (SA_RESTART), no EINTR."""
    p = spawn([target_bin("pipereader")])
    wait_ready(p)
    wait_syscall(p.pid, (SYS["read"],))
    with RemoteProcess(p.pid) as rp:
        rp.syscall(SYS["getpid"])
        os.kill(p.pid, signal.SIGUSR1)
        exercise(rp, p.pid, rounds=4)
        assert "SigPnd" in proc_status(p.pid)
    assert_released(p.pid)
    p.stdin.write("abc")
    out = quit_target(p, "")
    assert out == "total 3 sum %d wsum %d eintr 0 usr1 1 trap 0" % (
        sum(b"abc"), sum(b * (i + 1) for i, b in enumerate(b"abc")))


def test_unblockable_signal_during_injection_is_resent(target_bin, spawn):
    """SIGTRAP is left unblocked while we hold the thread (the batch blob
    ends on one): one sent meanwhile stops the thread on its way; it is held
    back and sent again after detach, so the target's handler runs once."""
    p = spawn([target_bin("pipereader")])
    wait_ready(p)
    wait_syscall(p.pid, (SYS["read"],))
    with RemoteProcess(p.pid) as rp:
        rp.syscall(SYS["getpid"])
        os.kill(p.pid, signal.SIGTRAP)
        exercise(rp, p.pid, rounds=2)
        os.kill(p.pid, signal.SIGTRAP)   # held once per signal number
        assert rp.syscalls([(SYS["getpid"], ())] * 100) == [p.pid] * 100
    assert_released(p.pid)
    wait_until(lambda: signals_pending(p.pid) == 0, "the held SIGTRAP delivered")
    out = quit_target(p, "")
    assert out == "total 0 sum 0 wsum 0 eintr 0 usr1 0 trap 1", out


def test_threads(target_bin, spawn):
    p = spawn([target_bin("threads")])
    wait_ready(p)   # printed after its 8 writer threads were created
    tids = sorted(int(t) for t in os.listdir("/proc/%d/task" % p.pid))
    assert len(tids) == 9
    for tid in (p.pid, tids[1], tids[-1], p.pid):
        with RemoteProcess(p.pid, tid=tid) as rp:
            assert rp.tid == tid
            exercise(rp, p.pid)
        assert_released(p.pid)
        for t in tids:
            assert proc_status(p.pid)["TracerPid"] == "0"
            with open("/proc/%d/task/%d/status" % (p.pid, t)) as f:
                assert "TracerPid:\t0\n" in f.read()
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_busy_loop_registers(target_bin, spawn):
    p = spawn([target_bin("rt_busy")])
    wait_ready(p)
    in_user = 0
    for _ in range(3):
        time.sleep(0.05)    # let it run its loop between attaches (no state to wait for)
        with RemoteProcess(p.pid) as rp:
            exercise(rp, p.pid)
            # Stopped in user mode, or (rarely) in its poll of stdin.
            orig = rp.saved_registers()["orig_rax"]
            assert orig in (2**64 - 1, 7)
            in_user += orig == 2**64 - 1
        assert_released(p.pid)
    assert in_user
    out = quit_target(p)
    assert out.startswith("ok"), out


# -- job control and stop signals --------------------------------------------

def test_job_control_stopped_target_stays_stopped(target_bin, spawn):
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    os.kill(p.pid, signal.SIGSTOP)
    wait_state(p.pid, "T")
    with RemoteProcess(p.pid) as rp:
        assert rp.was_group_stopped
        exercise(rp, p.pid, rounds=10)
    assert_released(p.pid, stopped=True)
    time.sleep(0.2)     # and it stays stopped: nothing we left behind wakes it
    assert_released(p.pid, stopped=True)
    os.kill(p.pid, signal.SIGCONT)
    wait_state(p.pid, "S")
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_sigstop_during_injection_is_not_lost(target_bin, spawn):
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    wait_syscall(p.pid, NANOSLEEP)
    with RemoteProcess(p.pid) as rp:
        os.kill(p.pid, signal.SIGSTOP)
        exercise(rp, p.pid, rounds=10)
    wait_state(p.pid, "T")
    assert_released(p.pid, stopped=True)
    os.kill(p.pid, signal.SIGCONT)
    wait_state(p.pid, "S")
    out = quit_target(p)
    assert out.startswith("ok"), out


# -- batches -------------------------------------------------------------------

def test_batch_10000(target_bin, spawn):
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    with RemoteProcess(p.pid) as rp:
        res = rp.syscalls([(SYS["getppid"], ())] * 10000)
        assert res == [os.getpid()] * 10000
        # More than one blob's worth, mixed, with failures reported as -errno.
        addr = rp.mmap_scratch(PAGE)
        calls = []
        for i in range(20000):
            calls.append([(SYS["getpid"], ()), (SYS["madvise"], (addr, PAGE, MADV_NORMAL)),
                          (SYS["close"], (-1,))][i % 3])
        res = rp.syscalls(calls)
        assert res == [[p.pid, 0, -9][i % 3] for i in range(20000)]   # -EBADF
        assert rp.syscalls(calls[:10], stop_on_error=True) == [p.pid, 0, -9]
        rp.munmap(addr, PAGE)
    assert_released(p.pid)
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_batch_effects_seen_in_maps(target_bin, spawn):
    """1000 mprotects in one batch split a region into 1000 VMAs."""
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    n = 1000
    with RemoteProcess(p.pid) as rp:
        base = rp.mmap_scratch(n * PAGE)
        res = rp.syscalls((SYS["mprotect"], (base + i * PAGE, PAGE, 1 if i % 2 else 3))
                          for i in range(n))
        assert res == [0] * n
        vmas = []
        with open("/proc/%d/maps" % p.pid) as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo < base + n * PAGE and hi > base:
                    vmas.append((lo, hi, line.split()[1]))
        # One VMA a page (the first or last may merge with a neighbour).
        assert len(vmas) == n
        for i in range(n):
            addr = base + i * PAGE
            perms = [v[2] for v in vmas if v[0] <= addr < v[1]]
            assert perms == ["r--p" if i % 2 else "rw-p"]
        rp.munmap(base, n * PAGE)
    out = quit_target(p)
    assert out.startswith("ok"), out


# -- errors ------------------------------------------------------------------

def test_bad_targets():
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = int(f.read())
    with pytest.raises(NoSuchProcess, match="no such process") as ei:
        RemoteProcess(pid_max + 1)
    assert isinstance(ei.value, ProcessLookupError)
    with pytest.raises(TargetError, match="init"):
        RemoteProcess(1)
    with pytest.raises(TargetError, match="kernel thread"):
        RemoteProcess(2)
    with pytest.raises(TargetError, match="this process"):
        RemoteProcess(os.getpid())
    for pid in (1, 2):
        assert proc_status(pid)["TracerPid"] == "0"


def test_already_traced_names_the_tracer(target_bin, spawn):
    """A second seizer (another wp command, a debugger) is told who holds
    the target; the holder is not disturbed."""
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    with open("/proc/self/comm") as f:
        me = f.read().strip()
    with RemoteProcess(p.pid) as rp:
        with pytest.raises(TargetError, match=re.escape("already traced by pid %d (%s: " % (os.getpid(), me))):
            RemoteProcess(p.pid)
        assert rp.syscall(SYS["getpid"]) == p.pid
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_injected_error_names_the_syscall(target_bin, spawn):
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    with RemoteProcess(p.pid) as rp:
        with pytest.raises(OSError, match=r"close\(12345\)") as ei:
            rp.syscall(SYS["close"], 12345)
        assert ei.value.errno == 9
        assert rp.syscall(SYS["getpid"]) == p.pid
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_target_exits_during_injection(target_bin, spawn):
    """The target runs the injected exit_group(7) and is gone. It runs under
    sh, which reports its status: were it our child, the tracer's own
    waitpid would reap it and take the status with it."""
    sh = spawn(["sh", "-c", '"$0"; echo "status $?"', target_bin("threads")])
    wait_ready(sh)
    with open("/proc/%d/task/%d/children" % (sh.pid, sh.pid)) as f:
        pid = int(f.read().split()[0])
    t0 = time.monotonic()
    with pytest.raises(NoSuchProcess, match="exit_group"):
        with RemoteProcess(pid) as rp:
            rp.syscall(SYS["exit_group"], 7)
    assert time.monotonic() - t0 < 5
    assert sh.stdout.readline().strip() == "status 7"


def test_target_killed_during_blocking_injection(target_bin, spawn):
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    killer = threading.Timer(0.3, os.kill, (p.pid, signal.SIGKILL))
    t0 = time.monotonic()
    with pytest.raises(NoSuchProcess):
        with RemoteProcess(p.pid) as rp:
            killer.start()
            rp.syscall(SYS["pause"])   # returns only for a signal
    killer.join()
    assert time.monotonic() - t0 < 5
    p.wait(timeout=5)   # reaped already by the tracer's waitpid (it is our child)
    assert not os.path.exists("/proc/%d" % p.pid)


def test_blocking_injection_times_out(target_bin, spawn):
    """pause() never returns: after the timeout the thread is interrupted,
    put back as it was and released; the target goes on unharmed."""
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    with RemoteProcess(p.pid, timeout=0.3) as rp:
        with pytest.raises(TimeoutError, match=r"pause\(\)"):
            rp.syscall(SYS["pause"])
    assert_released(p.pid)
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_zombie_leader_uses_another_thread(target_bin, spawn):
    """The main thread called pthread_exit(): a live thread is chosen, and
    its maps, memory and file table are used."""
    p = spawn([target_bin("rt_zombie_leader")])
    wait_ready(p)
    wait_state(p.pid, "Z")
    with RemoteProcess(p.pid) as rp:
        assert rp.tid != p.pid
        exercise(rp, p.pid, rounds=10)
    with open("/proc/%d/task/%d/status" % (p.pid, rp.tid)) as f:
        assert "TracerPid:\t0\n" in f.read()
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_seccomp_filter_suspended_while_injecting(target_bin, spawn):
    """The target's filter kills it for getpid/userfaultfd; ours still run
    (PTRACE_O_SUSPEND_SECCOMP) and the filter is back in force after."""
    p = spawn([target_bin("rt_seccomp")])
    wait_ready(p)
    with RemoteProcess(p.pid) as rp:
        assert rp.seccomp_suspended
        exercise(rp, p.pid, rounds=5)
    assert_released(p.pid)
    assert proc_status(p.pid)["Seccomp"] == "2"
    assert p.poll() is None
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_signal_during_batch_is_delivered(target_bin, spawn):
    """SIGUSR1 sent while the blob runs a long batch: every call still runs,
    and the target's handler runs once after detach."""
    p = spawn([target_bin("pipereader")])
    wait_ready(p)
    wait_syscall(p.pid, (SYS["read"],))
    with RemoteProcess(p.pid) as rp:
        rp.syscalls([(SYS["getppid"], ())])
        t = threading.Timer(0.02, os.kill, (p.pid, signal.SIGUSR1))
        t.start()
        res = rp.syscalls([(SYS["getppid"], ())] * 300000)
        t.join()
        assert res == [os.getpid()] * 300000
    assert_released(p.pid)
    out = quit_target(p, "xy")
    assert out.endswith("eintr 0 usr1 1 trap 0"), out


def test_ppoll_temporary_mask_survives(target_bin, spawn):
    """Stopped inside ppoll() with a temporary signal mask: the real mask
    is what we put back, ppoll restarts with its temporary one, and a later
    SIGUSR1 still interrupts it (EINTR, handler) — once per signal."""
    p = spawn([target_bin("rt_ppoll")])
    wait_ready(p)
    wait_syscall(p.pid, (PPOLL,))
    with RemoteProcess(p.pid) as rp:
        assert rp.saved_registers()["orig_rax"] == PPOLL
        exercise(rp, p.pid, rounds=5)
    assert_released(p.pid)
    wait_syscall(p.pid, (PPOLL,))
    # Back in the restarted ppoll, its temporary (empty) mask in force; the
    # target checks its real one each time ppoll returns.
    assert int(proc_status(p.pid)["SigBlk"], 16) == 0
    os.kill(p.pid, signal.SIGUSR1)
    handled_and_back_in_ppoll = lambda: signals_pending(p.pid) == 0 and syscall_of(p.pid) == PPOLL  # noqa: E731
    wait_until(handled_and_back_in_ppoll, "SIGUSR1 handled, ppoll entered again")
    with RemoteProcess(p.pid) as rp:
        os.kill(p.pid, signal.SIGUSR1)   # held while we hold the thread
        exercise(rp, p.pid, rounds=2)
    wait_until(handled_and_back_in_ppoll, "the held SIGUSR1 handled, ppoll entered again")
    out = quit_target(p)
    assert out == "ok 2 2", out


def test_uffd_acts_on_target_memory(target_bin, spawn):
    """The uffd taken out of the target write-protects the target's pages:
    pagemap shows the uffd-wp bit (57) on them."""
    from wp.uffd import SYNC_FEATURES, Userfaultfd
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    n = 16
    with RemoteProcess(p.pid) as rp:
        fd = rp.open_userfaultfd()
        addr = rp.mmap_scratch(n * PAGE)
        rp.write_memory(addr, b"\xab" * (n * PAGE))
    assert target_uffds(p.pid) == 0
    with Userfaultfd(fd, SYNC_FEATURES) as u:
        u.register(addr, n * PAGE)
        u.protect(addr, n * PAGE)
        with open("/proc/%d/pagemap" % p.pid, "rb") as f:
            f.seek(addr // PAGE * 8)
            entries = [int.from_bytes(f.read(8), "little") for _ in range(n)]
        assert all(e >> 63 & 1 and e >> 57 & 1 for e in entries)   # present, uffd-wp
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_pid_namespace(target_bin, spawn):
    """A target in its own pid namespace (a container): it sees itself as
    pid 1, and the batch blob signals itself by that pid."""
    u = spawn(["unshare", "--pid", "--fork", target_bin("sleeper")])
    wait_ready(u)
    with open("/proc/%d/task/%d/children" % (u.pid, u.pid)) as f:
        pid = int(f.read().split()[0])
    with RemoteProcess(pid) as rp:
        assert rp.syscall(SYS["getpid"]) == 1
        assert rp.syscalls([(SYS["getpid"], ())] * 1000) == [1] * 1000
        exercise(rp, 1, rounds=2)
    assert_released(pid)
    out = quit_target(u)
    assert out.startswith("ok"), out


def test_blocking_batch_times_out(target_bin, spawn):
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    with RemoteProcess(p.pid, timeout=0.3) as rp:
        with pytest.raises(TimeoutError, match="batch"):
            rp.syscalls([(SYS["getpid"], ()), (SYS["pause"], ())])
        assert rp.syscall(SYS["getpid"]) == p.pid   # still held, still usable
    assert_released(p.pid)
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_many_short_attaches(target_bin, spawn):
    """50 attach/detach cycles on every kind of thread of a busy target."""
    p = spawn([target_bin("threads")])
    wait_ready(p)
    tids = sorted(int(t) for t in os.listdir("/proc/%d/task" % p.pid))
    for i in range(50):
        with RemoteProcess(p.pid, tid=tids[i % len(tids)]) as rp:
            for _ in range(10):
                assert rp.syscall(SYS["getpid"]) == p.pid
            assert rp.syscalls([(SYS["getppid"], ())] * 100) == [os.getpid()] * 100
        assert_released(p.pid)
    out = quit_target(p)
    assert out.startswith("ok"), out


def _sigqueue(pid, sig, value):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.sigqueue.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    if libc.sigqueue(pid, sig, value) != 0:
        raise OSError(ctypes.get_errno(), "sigqueue")


def test_signals_during_injection_keep_their_siginfo(target_bin, spawn):
    """Signals queued while we hold the thread reach the target's handler
    after detach with the sender's si_code, si_pid and si_value, RT signals
    each time and in order, and the read they interrupted restarts."""
    p = spawn([target_bin("rt_siginfo")])
    wait_ready(p)
    wait_syscall(p.pid, (SYS["read"],))
    rtmin = signal.SIGRTMIN
    with RemoteProcess(p.pid) as rp:
        rp.syscall(SYS["getpid"])
        _sigqueue(p.pid, rtmin, 1)
        _sigqueue(p.pid, signal.SIGUSR2, 4242)
        exercise(rp, p.pid, rounds=2)
        _sigqueue(p.pid, rtmin, 2)
        assert rp.syscalls([(SYS["getpid"], ())] * 100) == [p.pid] * 100
        _sigqueue(p.pid, rtmin, 3)
        rp.syscall(SYS["getpid"])
    assert_released(p.pid)
    assert int(proc_status(p.pid)["SigBlk"], 16) == 0
    wait_handled(p.pid)
    out = quit_target(p, "").splitlines()
    me = os.getpid()
    want = ["sig %d code -1 pid %d value %d" % (s, me, v)
            for s, v in ((rtmin, 1), (signal.SIGUSR2, 4242), (rtmin, 2), (rtmin, 3))]
    assert sorted(out[:-1]) == sorted(want)
    assert [line for line in out if line.startswith("sig %d " % rtmin)] == \
        [w for w in want if w.startswith("sig %d " % rtmin)]
    assert out[-1] == "eintr 0"


HOLDER = """
import sys, time
from wp.remote import RemoteProcess, SYS
rp = RemoteProcess(int(sys.argv[1]))
rp.stop()
for _ in range(10):
    rp.syscall(SYS["getpid"])
if sys.argv[2] == "batch":
    rp.syscalls([(SYS["getpid"], ())] * 100)
print("held", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("last", ["single", "batch"])
def test_tracer_killed_while_holding(target_bin, spawn, last):
    """The daemon dies (SIGKILL) between two operations: the kernel
    detaches the thread where it stands, and it carries on unharmed."""
    import sys
    p = spawn([target_bin("sleeper")])
    wait_ready(p)
    wait_syscall(p.pid, NANOSLEEP)
    holder = spawn([sys.executable, "-c", HOLDER, str(p.pid), last])
    assert holder.stdout.readline().strip() == "held"
    st = proc_status(p.pid)
    assert st["TracerPid"] == str(holder.pid) and st["State"].startswith("t")
    holder.kill()
    holder.wait(timeout=10)
    wait_until(lambda: proc_status(p.pid)["TracerPid"] == "0", "the kernel detached pid %d" % p.pid)
    wait_syscall(p.pid, NANOSLEEP)   # running its own sleeps again
    assert_released(p.pid)
    assert int(proc_status(p.pid)["SigBlk"], 16) == 0
    out = quit_target(p)
    assert out.startswith("ok"), out


def test_signal_during_injection_without_sa_restart_gives_eintr(target_bin, spawn):
    """The target's own semantics, exactly: a handler without SA_RESTART
    makes the read() it interrupts fail with EINTR, also when the signal
    came while we held the thread."""
    p = spawn([target_bin("rt_siginfo"), "norestart"])
    wait_ready(p)
    wait_syscall(p.pid, (SYS["read"],))
    with RemoteProcess(p.pid) as rp:
        rp.syscall(SYS["getpid"])
        _sigqueue(p.pid, signal.SIGUSR2, 7)
        exercise(rp, p.pid, rounds=2)
    assert_released(p.pid)
    wait_handled(p.pid)
    out = quit_target(p, "").splitlines()
    assert out == ["sig %d code -1 pid %d value 7" % (signal.SIGUSR2, os.getpid()), "eintr 1"]
