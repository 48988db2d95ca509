"""Fixtures for the write-protection core tests: memtarget processes of each
kind of memory, protection sessions closed at teardown, hugetlb pages
reserved and given back, and the files the file-backed kinds map.

Import the fixtures into a test module with
``from fixtures_core import ...`` (pytest puts tests/ on sys.path).
"""
import fcntl
import os
import select
import tempfile
import time

import pytest

from wp import pagemap
from wp.protectors.trace import TraceProtector
from wp.session import Session
from wp.space import ProcessSpace

__all__ = ["MemTarget", "memtarget", "hugepages", "sessions", "SYNC_KINDS", "ALL_KINDS",
           "SHARED_KINDS", "page_bits", "HUGE_PAGES",
           "HugePages", "layout", "eventually", "wait_until", "wait_state", "wait_ready",
           "proc_status", "syscall_of", "wait_syscall"]

# memtarget's KINDs that sync WP protects, and the one only async WP takes.
SYNC_KINDS = ("anon", "anon-unpop", "shared-anon", "memfd", "memfd-private", "shm", "hugetlb")
ALL_KINDS = SYNC_KINDS + ("file",)
# Kinds whose pages a forked child shares with its parent (writes show in both).
SHARED_KINDS = ("shared-anon", "memfd", "shm")
# 2 MiB pages a hugetlb test may map; the hugepages fixture reserves this many.
HUGE_PAGES = 4
TIMEOUT = 10.0


class MemTarget:
    """A memtarget (or pt_layout) process driven line by line.

    ``uffds`` are the userfaultfd numbers it offered and nobody took yet;
    :meth:`space` hands them out one session at a time.
    """

    def __init__(self, proc, npages):
        self.proc = proc
        words = self._line().split()
        assert words and words[0] == "ready", words
        self.pid = int(words[1])
        self.addr = int(words[2], 16)
        self.length = int(words[3], 16) if words[3].startswith("0x") else int(words[3]) * int(words[4])
        self.page_size = int(words[4])
        self.uffds = [int(words[5]), int(words[6])]
        self.npages = npages

    def _line(self, timeout=TIMEOUT):
        # One command, one answer line: nothing is ever buffered ahead, so
        # select on the pipe tells whether the answer came.
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert r, "target %d did not answer within %.0f s (a writer left blocked?)" % (
            self.proc.pid, timeout)
        line = self.proc.stdout.readline()
        assert line, "target %d exited (rc %r)" % (self.proc.pid, self.proc.poll())
        return line

    def cmd(self, line, timeout=TIMEOUT):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self._line(timeout).split()

    def write(self, idx, val):
        """A new thread of the target fills page idx with val; returns its tid."""
        out = self.cmd("w %d %d" % (idx, val))
        assert out[0] == "done", out
        return int(out[1])

    def fork_write(self, idx, val):
        """A forked child fills page idx with val and checks it reads val
        back; returns the child's pid (asserts it exited 0)."""
        out = self.cmd("F %d %d" % (idx, val))
        assert out[0] == "done", out
        assert out[2] == "0", "child %s: wait status %s" % (out[1], out[2])
        return int(out[1])

    def write_together(self, idx, val, n):
        """n threads of the target, released together, write page idx;
        returns their tids."""
        out = self.cmd("c %d %d %d" % (idx, val, n))
        assert out[0] == "done" and len(out) == n + 1, out
        return [int(x) for x in out[1:]]

    def background_write(self, idx, val):
        """A background thread writes page idx; returns its tid at once
        (join() waits for it)."""
        out = self.cmd("b %d %d" % (idx, val))
        assert out[0] == "started", out
        return int(out[1])

    def join(self):
        out = self.cmd("j")
        assert out[0] == "done", out
        return int(out[1])

    def send(self, line):
        """Sends a command without waiting for its answer (see answer())."""
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def answer(self, timeout=TIMEOUT):
        return self._line(timeout).split()

    def blocked_in_uffd(self):
        """Returns how many of its threads wait in a userfaultfd fault."""
        n = 0
        for tid in os.listdir("/proc/%d/task" % self.pid):
            try:
                with open("/proc/%d/task/%s/wchan" % (self.pid, tid)) as f:
                    n += f.read().strip() == "handle_userfault"
            except OSError:
                pass   # the thread exited
        return n

    def new_uffd(self):
        """Has the target create one more userfaultfd and offer it."""
        out = self.cmd("u")
        assert out[0] == "uffd" and int(out[1]) >= 0, out
        self.uffds.append(int(out[1]))
        return int(out[1])

    def read(self, idx):
        """Returns (first byte, byte sum) of page idx as the target reads it."""
        out = self.cmd("r %d" % idx)
        assert out[:2] == ["page", str(idx)], out
        return int(out[2]), int(out[3])

    def page(self, idx):
        return self.addr + idx * self.page_size

    def entries(self):
        """Returns the pagemap entry of the first 4 kB of each target page."""
        return page_bits(self.pid, self.addr, self.npages, self.page_size)

    def wp_bits(self):
        return [bool(e & pagemap.UFFD_WP) for e in self.entries()]

    def present_bits(self):
        return [bool(e & pagemap.PRESENT) for e in self.entries()]

    def maps_text(self):
        with open("/proc/%d/maps" % self.pid) as f:
            return f.read()

    def space(self, n=1):
        """Returns a ProcessSpace that can take n of the offered uffds."""
        assert len(self.uffds) >= n, "target %d has only %d uffds left" % (self.pid, len(self.uffds))
        fds, self.uffds = self.uffds[:n], self.uffds[n:]
        return ProcessSpace.cooperative(self.pid, fds)

    def assert_alive(self):
        assert self.proc.poll() is None
        self.read(0)    # it answers a command: alive, and its main loop not blocked


def eventually(get, want, timeout=2.0):
    """Returns get() once it equals want, or its last value after timeout.

    For what the daemon counts after the kernel let the target go on: the
    fault loop counts a fault resolved after the ioctl that wakes the writer,
    and counts an event after the read that releases the thread that caused
    it, so the target's answer can overtake the count by a few microseconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        got = get()
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.001)


def wait_until(cond, what, timeout=5.0):
    """Waits until cond() is true; fails naming what never happened (what:
    a string, or a function giving one, called only then, to show the
    state it was in)."""
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("never: " + (what() if callable(what) else what))
        time.sleep(0.002)


def proc_status(pid):
    with open("/proc/%d/status" % pid) as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def wait_state(pid, want, timeout=5.0):
    """Waits until /proc/PID/status says State want ("S", "T", "Z", ...)."""
    wait_until(lambda: proc_status(pid)["State"].split()[0] == want,
               "pid %d in state %s" % (pid, want), timeout)


def wait_ready(p):
    """Reads the "ready" line a target prints once it is set up."""
    assert p.stdout.readline().strip() in ("ready", b"ready")


def syscall_of(pid, tid=None):
    """The syscall number a thread is blocked in (/proc/PID/syscall), or None
    while it runs or blocks outside a syscall."""
    with open("/proc/%d/task/%d/syscall" % (pid, tid or pid)) as f:
        first = f.read().split()[0]
    return None if first in ("running", "-1") else int(first)


def wait_syscall(pid, nrs, tid=None):
    """Waits until the thread is blocked in one of the syscalls nrs."""
    wait_until(lambda: syscall_of(pid, tid) in nrs,
               "pid %d blocked in syscall %s" % (pid, nrs))


def page_bits(pid, addr, npages, page_size):
    with pagemap.Pagemap(pid) as pm:
        return [pm.entries(addr + i * page_size, 1)[0] for i in range(npages)]


class HugePages:
    """Raises /proc/sys/vm/nr_hugepages by n; restore() gives them back.

    Other test runs on this machine may reserve huge pages at the same time,
    so every change is a read-modify-write under a lock file; restore() puts
    the old value back if nobody else changed it meanwhile, else takes back
    only our n.
    """
    PATH = "/proc/sys/vm/nr_hugepages"
    LOCK = "/run/lock/wp-tests-nr_hugepages.lock"

    def __init__(self, n=HUGE_PAGES):
        self.n = n
        with self._locked():
            self.old = self._get()
            self._set(self.old + n)
            self.set_to = self._get()
        if self.set_to < self.old + n:
            self.restore()
            raise AssertionError("kernel gave %d huge pages, wanted %d" % (self.set_to, self.old + n))

    def _locked(self):
        os.makedirs(os.path.dirname(self.LOCK), exist_ok=True)
        fd = os.open(self.LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return os.fdopen(fd)   # closing it unlocks

    def _get(self):
        with open(self.PATH) as f:
            return int(f.read())

    def _set(self, value):
        with open(self.PATH, "w") as f:
            f.write(str(value))

    def restore(self):
        with self._locked():
            cur = self._get()
            self._set(self.old if cur == self.set_to else max(cur - self.n, 0))


@pytest.fixture
def hugepages():
    """Reserves HUGE_PAGES more 2 MiB pages; gives them back at teardown."""
    h = HugePages()
    try:
        yield h
    finally:
        h.restore()


@pytest.fixture
def sessions(spawn, memtarget, layout):
    """open(...) -> a started Session, closed at teardown (before the targets
    it protects are killed, since this fixture is set up after them)."""
    opened = []

    def open_session(target, protector=None, regions=None, nuffds=1, **kw):
        if regions is None:
            regions = [(target.addr, target.addr + target.length)]
        s = Session(target.space(nuffds), protector or TraceProtector(exact=True), regions=regions, **kw)
        opened.append(s)
        return s.start()

    yield open_session
    for s in opened:
        s.close()


@pytest.fixture
def memtarget(target_bin, spawn):
    """memtarget(kind, npages) -> MemTarget. "shm" and "file" get a fresh file
    (in /dev/shm and /var/tmp), "hugetlb" reserved huge pages. At teardown the
    targets are killed and reaped first, then files removed and nr_hugepages
    restored (so no huge page is still mapped when it is given back)."""
    paths, procs, huge = [], [], []

    def start(kind, npages=4):
        argv = [target_bin("memtarget"), kind, str(npages)]
        path = None
        if kind in ("shm", "file"):
            fd, path = tempfile.mkstemp(prefix="wp-core-", dir="/dev/shm" if kind == "shm" else "/var/tmp")
            os.close(fd)
            paths.append(path)
            argv.append(path)
        if kind == "hugetlb" and not huge:
            assert npages <= HUGE_PAGES
            huge.append(HugePages())
        proc = spawn(argv)
        procs.append(proc)
        t = MemTarget(proc, npages)
        t.kind = kind
        t.path = path
        return t

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        for h in huge:
            h.restore()


@pytest.fixture
def layout(target_bin, spawn):
    """layout(npages) -> MemTarget of pt_layout: anon pages [0, n), memfd
    pages [n, 2n), a hole [2n, 3n). Its npages covers both mappings."""
    def start(npages=4):
        t = MemTarget(spawn([target_bin("pt_layout"), str(npages)]), 2 * npages)
        t.n = npages
        t.length = 2 * npages * t.page_size
        return t
    return start
