"""Syscalls inside another process, run through ptrace: the way wp attaches
to a process that does nothing to help.

One thread of the target is seized and held in a ptrace stop; every syscall
it is made to run happens at an existing ``syscall`` instruction of its vdso
(no code is patched: the other threads keep running the same text). At
detach its registers and signal mask go back byte for byte and the kernel's
own syscall-restart logic resumes whatever it was blocked in; see
native/remote.c for the kernel behaviour this relies on.

    with RemoteProcess(pid) as rp:
        uffd = rp.open_userfaultfd()     # the daemon now holds the only copy

Only the thread that entered may use a RemoteProcess: ptrace requests are
accepted from the tracing thread alone.

Costs measured here (python -m wp.bench.attach; tracer and target pinned to
one CPU): one injected syscall 15-17 us (two ptrace stops), ~31 us with the
two on different CPUs; a batch round trip ~13 us plus 0.13 us per getppid
in C, ~0.25 us per call from Python; attach + detach ~130 us.

Signals that come while we hold the thread are kept and requeued, siginfo
and all, at detach; the thread's mask is never changed except for that
moment. Between operations the thread holds its original registers, so a
daemon killed meanwhile leaves it running as if nothing happened.

Not handled:
  - the daemon dying *during* an operation (a syscall or batch running):
    the thread is detached with our registers and will likely crash; and a
    signal kept back at that point is lost.
  - a fork by another thread between userfaultfd() and its close() in the
    target copies the uffd into the child (the daemon then no longer holds
    the only copy).
  - injected syscalls that use the thread's restart_block (nanosleep,
    clock_nanosleep, poll/select/futex with timeouts) and get interrupted
    overwrite the one of the syscall the thread was in.
  - a thread in uninterruptible sleep for longer than the timeout: attach
    fails and the thread stays seized until this process exits (it traps
    once it wakes). choose_thread() avoids D-state threads.
  - 32-bit (compat) targets are refused; execve by another thread while we
    hold one is untested.
"""
import contextlib
import errno
import os
import threading

from wp import pidfd, procfs
from wp.ptrace import PTRACE_GET_RSEQ_CONFIGURATION, ptrace
from wp._native import check, ffi, lib
from wp.errors import NoSuchProcess, TargetError

__all__ = ["RemoteProcess", "SYS", "choose_thread", "validate_pid", "validate_target"]

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl) of every
# syscall wp injects: the one table, also for wp.dedupe. Error messages name
# a failed call from it.
SYS = {
    "read": 0, "write": 1, "open": 2, "close": 3, "fstat": 5, "mmap": 9, "mprotect": 10,
    "munmap": 11, "mremap": 25, "madvise": 28, "pause": 34, "nanosleep": 35, "getpid": 39,
    "socket": 41, "connect": 42, "recvmsg": 47, "getppid": 110, "gettid": 186,
    "exit_group": 231, "tgkill": 234, "memfd_create": 319, "userfaultfd": 323,
}
_NAMES = {nr: name for name, nr in SYS.items()}

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20

BLOB_SIZE = 1 << 20   # code page + 16,320 records of 64 bytes

def _syscall_name(nr, args=()):
    return "%s(%s)" % (_NAMES.get(nr, "syscall %d" % nr),
                       ", ".join(hex(a) if a >= 1 << 16 else str(a) for a in args))


def validate_pid(pid):
    """Raises unless pid is a live user process (its process id, not the id
    of one of its threads).

    Raises:
        NoSuchProcess: no such pid.
        TargetError: a kernel thread, or the id of a thread that is not its
            process's main thread (/proc answers for those too, and the
            kernel's pidfd_open refuses them with a bare EINVAL).
    """
    fields = procfs.stat_fields(pid)
    if fields is None:
        raise NoSuchProcess(errno.ESRCH, "no such process %d (check the pid with ps)" % pid)
    if procfs.is_kernel_thread(fields):
        raise TargetError("pid %d is a kernel thread: it has no user memory to attach to" % pid)
    try:
        tgid = int(procfs.status(pid).get("Tgid", pid))
    except (FileNotFoundError, ProcessLookupError, ValueError):
        raise NoSuchProcess(errno.ESRCH, "no such process %d (it exited)" % pid) from None
    if tgid != pid:
        raise TargetError("%d is a thread of process %d, not a process: give the process id (%d)"
                          % (pid, tgid, tgid))


def validate_target(pid, session=False):
    """Raises unless pid is a process we may seize (session: and protect
    with a wp.session.Session).

    Raises:
        NoSuchProcess: no such pid.
        TargetError: pid 1, a kernel thread, a zombie, this very process,
            or a process some debugger already traces; with session, also
            a process whose main thread has exited.
    """
    if pid == os.getpid():
        raise TargetError("pid %d is this process: ptrace cannot stop its own thread group; "
                          "run wp from another process" % pid)
    if pid == 1:
        raise TargetError("pid 1 is init: wp refuses to stop it; attach to a service's own pid")
    validate_pid(pid)
    fields = procfs.stat_fields(pid)
    if fields is None:
        raise NoSuchProcess(errno.ESRCH, "no such process %d (it exited)" % pid)
    if procfs.is_zombie(fields) and int(fields[procfs.NUM_THREADS]) <= 1:
        raise TargetError("pid %d is a zombie: it has no memory left" % pid)
    if procfs.is_zombie(fields) and session:
        # Injection works through another thread, but a session reads the
        # memory map through /proc/PID, the leader's, which has none now.
        raise TargetError("pid %d's main thread has exited (its other threads run on): wp reads a "
                          "process's memory map through its main thread; not supported" % pid)
    try:
        tracer = int(procfs.status(pid).get("TracerPid", "0"))
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(errno.ESRCH, "no such process %d (it exited)" % pid) from None
    if tracer:
        raise TargetError("pid %d is already traced by pid %d (%s: a debugger, strace, or another "
                          "wp command at work): wait for it or detach that first"
                          % (pid, tracer, procfs.comm(tracer) or "?"))


def choose_thread(pid):
    """Returns the thread to seize: the main thread, unless it has exited
    (pthread_exit leaves a zombie leader) or sits in uninterruptible sleep
    (D: our interrupt would wait for it) — then the first other live one."""
    try:
        tids = procfs.tids(pid)
    except FileNotFoundError:
        raise NoSuchProcess(errno.ESRCH, "no such process %d (it exited)" % pid) from None
    live = []
    for tid in [pid] + [t for t in tids if t != pid]:
        fields = procfs.stat_fields(pid, tid)
        if fields is not None and not procfs.is_zombie(fields):
            live.append((fields[procfs.STATE] == "D", tid))
    if not live:
        raise TargetError("pid %d has no live thread left" % pid)
    return min(live, key=lambda dt: dt[0])[1]   # stable: the leader first


_SYSCTL_UFFD = "/proc/sys/vm/unprivileged_userfaultfd"
_sysctl_lock = threading.Lock()


@contextlib.contextmanager
def _unprivileged_userfaultfd():
    """Sets vm.unprivileged_userfaultfd to 1 for the duration, then puts the
    old value back."""
    with _sysctl_lock:
        with open(_SYSCTL_UFFD) as f:
            old = f.read().strip()
        if old != "1":
            with open(_SYSCTL_UFFD, "w") as f:
                f.write("1")
        try:
            yield
        finally:
            if old != "1":
                with open(_SYSCTL_UFFD, "w") as f:
                    f.write(old)


class RemoteProcess:
    """One thread of a target held in a ptrace stop, running syscalls for us.

    A context manager: ``__enter__`` stops the thread, ``__exit__`` restores
    and releases it. Other threads of the target keep running throughout.
    """

    def __init__(self, pid, tid=None, timeout=10.0, syscall_ip=None):
        """Checks the target; stops nothing yet.

        Args:
            pid: the target process.
            tid: the thread to use (default: :func:`choose_thread`).
            timeout: seconds to wait for any one ptrace stop (None: forever).
                A syscall that blocks longer is interrupted and reported
                as TimeoutError.
            syscall_ip: where an earlier RemoteProcess found the target's
                syscall instruction (its :attr:`syscall_ip`). Used if the
                two bytes there are still ``0f 05``; saves reading
                /proc/PID/maps, which costs tens of ms for a target with
                tens of thousands of VMAs.
        Raises:
            NoSuchProcess, TargetError: see :func:`validate_target`.
        """
        validate_target(pid)
        self.pid = pid
        self.tid = tid
        self.timeout_ms = -1 if timeout is None else int(timeout * 1000)
        self._r = ffi.new("struct wp_remote *")
        self._r.memfd = -1
        self._owner = None
        self._syscall_ip_hint = syscall_ip

    # -- stop and release ----------------------------------------------------

    def __enter__(self):
        self.stop()
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            self.detach()
        except (OSError, TargetError):
            if exc_type is None:
                raise
            # The error in flight (often the same exit) says more.

    def stop(self):
        """Seizes and stops one thread; blocks its signals until detach.

        Raises:
            NoSuchProcess: the target exited meanwhile.
            TargetError: a 32-bit target, or no syscall instruction found.
            OSError: ptrace failed (PermissionError without CAP_SYS_PTRACE).
        """
        if self._owner is not None:
            raise TargetError("pid %d is already stopped by this RemoteProcess" % self.pid)
        if self.tid is None:
            self.tid = choose_thread(self.pid)
        ret = lib.wp_remote_attach(self._r, self.pid, self.tid, self.timeout_ms)
        if ret == -errno.ESRCH:
            raise NoSuchProcess(errno.ESRCH, "no such process %d (it exited while wp seized it)"
                                % self.pid)
        if ret == -errno.EPROTONOSUPPORT:
            raise TargetError("pid %d is a 32-bit process: wp injects x86_64 syscalls only"
                              % self.pid)
        check(ret, "ptrace(PTRACE_SEIZE/INTERRUPT, %d)" % self.tid)
        self._owner = threading.get_ident()
        try:
            self._r.ns_pid, self._r.ns_tid = procfs.ns_ids(self.pid, self.tid)
            self._r.syscall_ip = self._reuse_syscall_insn() or self._find_syscall_insn()
        except BaseException:
            self.detach()
            raise

    def detach(self):
        """Unmaps our scratch blob, puts registers and signal mask back,
        detaches and re-sends signals held back. Idempotent.

        Raises:
            NoSuchProcess: the target exited while we held it.
            OSError: ptrace failed; TimeoutError if the thread never came back
                from an injected syscall (it is then left as it is).
        """
        if self._owner is None:
            return
        self._check_thread()
        self._owner = None
        ret = lib.wp_remote_detach(self._r)
        if ret == -errno.ESRCH:
            raise NoSuchProcess(errno.ESRCH, "process %d exited while wp held it" % self.pid)
        check(ret, "ptrace(PTRACE_DETACH, %d)" % self.tid)

    # -- state ---------------------------------------------------------------

    @property
    def stops(self):
        """How many ptrace stops we waited for (two per single syscall)."""
        return self._r.stops

    @property
    def was_group_stopped(self):
        """True if job control had stopped the target when we came."""
        return bool(self._r.flags & lib.WP_REMOTE_GROUP_STOP)

    @property
    def seccomp_suspended(self):
        return bool(self._r.flags & lib.WP_REMOTE_SECCOMP_OFF)

    @property
    def syscall_ip(self):
        return self._r.syscall_ip

    def saved_registers(self):
        """The registers of the thread when it was stopped, as a dict."""
        regs = self._r.saved
        return {name: getattr(regs, name) for name, _ in ffi.typeof("struct wp_regs").fields}

    def _check_thread(self):
        if self._owner is None:
            raise TargetError("pid %d is not stopped: use RemoteProcess as a context manager"
                              % self.pid)
        if self._owner != threading.get_ident():
            raise TargetError("ptrace requests must come from the thread that stopped pid %d"
                              % self.pid)

    def rseq_page(self):
        """Returns the page of the seized thread's rseq area, or None if it
        has registered none. The kernel writes that area whenever the
        thread returns to user mode, so it must never be write-protected
        while we inject syscalls: the thread would block on our own fault."""
        import ctypes
        self._check_thread()
        conf = (ctypes.c_uint64 * 3)()     # struct ptrace_rseq_configuration
        if ptrace(PTRACE_GET_RSEQ_CONFIGURATION, self.tid, ctypes.sizeof(conf), conf) <= 0 \
                or not conf[0]:
            return None
        return conf[0] & ~(os.sysconf("SC_PAGESIZE") - 1)

    def _reuse_syscall_insn(self):
        ip = self._syscall_ip_hint
        if not ip:
            return None
        try:
            return ip if self.read_memory(ip, 2) == b"\x0f\x05" else None
        except OSError:
            return None

    def _find_syscall_insn(self):
        """Returns the address of a ``0f 05`` in the target's vdso, or failing
        that in its first executable mapping that has one. The bytes need not
        be an instruction of the original code: the CPU decodes from rip."""
        maps = []
        with open("/proc/%d/task/%d/maps" % (self.pid, self.tid)) as f:
            for line in f:
                parts = line.split()
                start, end = (int(x, 16) for x in parts[0].split("-"))
                name = parts[5] if len(parts) > 5 else ""
                if "x" in parts[1] and name not in ("[vsyscall]",):
                    maps.append((name != "[vdso]", start, end))
        for _, start, end in sorted(maps):
            data = self.read_memory(start, min(end - start, 1 << 20))
            at = data.find(b"\x0f\x05")
            if at >= 0:
                return start + at
        raise TargetError("pid %d has no syscall instruction mapped (no vdso?)" % self.pid)

    # -- syscalls ------------------------------------------------------------

    def syscall_raw(self, nr, *args):
        """Runs syscall nr in the target; returns its raw result (-errno on
        failure). Raises OSError only when ptrace or the target failed."""
        self._check_thread()
        if len(args) > 6:
            raise ValueError("a syscall takes at most 6 arguments")
        a = ffi.new("uint64_t[6]", [x & 0xFFFFFFFFFFFFFFFF for x in args] + [0] * (6 - len(args)))
        res = ffi.new("int64_t *")
        ret = lib.wp_remote_syscall(self._r, nr, a, res)
        if ret == -errno.ESRCH:
            raise NoSuchProcess(errno.ESRCH, "process %d exited during injected %s"
                                % (self.pid, _syscall_name(nr, args)))
        if ret == -errno.ETIMEDOUT:
            raise TimeoutError(errno.ETIMEDOUT, "injected %s in pid %d did not return within "
                               "%d ms" % (_syscall_name(nr, args), self.pid, self.timeout_ms))
        check(ret, "ptrace running %s in pid %d" % (_syscall_name(nr, args), self.tid))
        return res[0]

    def syscall(self, nr, *args):
        """Runs syscall nr with up to 6 integer args in the target.

        Returns:
            Its result (an address, an fd, ...).
        Raises:
            OSError: the syscall failed in the target (errno set, the syscall
                named), or ptrace failed; NoSuchProcess if the target exited.
        """
        ret = self.syscall_raw(nr, *args)
        if -4096 < ret < 0:
            raise OSError(-ret, "%s (originated from %s in pid %d)"
                          % (os.strerror(-ret), _syscall_name(nr, args), self.pid))
        return ret

    def syscalls(self, calls, stop_on_error=False):
        """Runs many syscalls in one ptrace round trip each 16,320 of them,
        through a small code blob mapped in the target.

        Args:
            calls: iterable of (nr, args) with args a sequence of <= 6 ints.
            stop_on_error: stop at the first call that fails.
        Returns:
            A list of raw results (>= 0, or -errno), one per call that ran.
        """
        self._check_thread()
        calls = list(calls)
        if not calls:
            return []
        if not self._r.blob:
            ret = lib.wp_remote_blob_setup(self._r, BLOB_SIZE)
            if ret == -errno.ESRCH:
                raise NoSuchProcess(errno.ESRCH, "process %d exited" % self.pid)
            check(ret, "mapping the syscall blob in pid %d" % self.pid)
        recs = ffi.new("struct wp_call[]", len(calls))
        for i, (nr, args) in enumerate(calls):
            recs[i].nr = nr
            for j, a in enumerate(args):
                recs[i].args[j] = a & 0xFFFFFFFFFFFFFFFF
        n = lib.wp_remote_batch(self._r, recs, len(calls), 1 if stop_on_error else 0)
        if n == -errno.ESRCH:
            raise NoSuchProcess(errno.ESRCH, "process %d exited during a syscall batch" % self.pid)
        if n == -errno.ETIMEDOUT:
            raise TimeoutError(errno.ETIMEDOUT, "syscall batch in pid %d did not finish within "
                               "%d ms" % (self.pid, self.timeout_ms))
        check(n, "running a batch of %d syscalls in pid %d" % (len(calls), self.pid))
        return [recs[i].result for i in range(n)]

    # -- memory --------------------------------------------------------------

    def read_memory(self, addr, n):
        """Returns n bytes at addr in the target (through /proc/PID/mem)."""
        buf = ffi.new("char[]", n)
        got = check(lib.wp_remote_read(self._r, addr, buf, n), "pread(/proc/%d/mem, %#x+%d)"
                    % (self.pid, addr, n))
        return ffi.buffer(buf, got)[:]

    def write_memory(self, addr, data):
        """Writes data at addr in the target; read-only pages too (as a
        debugger does: the kernel copies a private page on write)."""
        data = bytes(data)
        put = check(lib.wp_remote_write(self._r, addr, data, len(data)),
                    "pwrite(/proc/%d/mem, %#x+%d)" % (self.pid, addr, len(data)))
        if put != len(data):
            raise OSError(errno.EIO, "short write to pid %d at %#x" % (self.pid, addr))

    def mmap_scratch(self, size=4096, prot=PROT_READ | PROT_WRITE):
        """Returns the address of size bytes of fresh anonymous memory mapped
        in the target. Free it with :meth:`munmap`."""
        return self.syscall(SYS["mmap"], 0, size, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)

    def munmap(self, addr, size):
        self.syscall(SYS["munmap"], addr, size)

    # -- file descriptors ----------------------------------------------------

    def take_fd(self, remote_fd):
        """Moves fd remote_fd out of the target: returns our copy (O_CLOEXEC)
        and closes the target's."""
        self._check_thread()
        # Through our thread: the leader's file table is gone if it
        # called pthread_exit() (see wp.pidfd).
        fd = pidfd.getfd(self.pid, remote_fd, self.tid)
        try:
            self.syscall(SYS["close"], remote_fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_userfaultfd(self, flags=os.O_CLOEXEC | os.O_NONBLOCK):
        """Returns a userfaultfd of the target's mm, created by the target
        itself; the target keeps no copy. Every uffd ioctl on it acts on the
        target's memory."""
        remote = self.syscall_raw(SYS["userfaultfd"], flags)
        if remote == -errno.EPERM:
            # The kernel asks the *target* for CAP_SYS_PTRACE unless
            # vm.unprivileged_userfaultfd is 1 (UFFD_USER_MODE_ONLY would
            # pass, but turns the target's own syscalls that touch protected
            # memory into EFAULT). Allow it for this one call.
            with _unprivileged_userfaultfd():
                remote = self.syscall_raw(SYS["userfaultfd"], flags)
        if remote < 0:
            raise OSError(-remote, "%s (originated from userfaultfd() in pid %d)"
                          % (os.strerror(-remote), self.pid))
        try:
            return self.take_fd(remote)
        except OSError:
            self.syscall_raw(SYS["close"], remote)
            raise
