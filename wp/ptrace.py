"""ptrace(2) for what native/remote.c's syscall injection does not do:
every thread of a target held in a ptrace stop (ThreadStop, for dedupe's
merge batches), one thread stopped for its registers (stop_thread,
thread_registers, release_thread; C in native/threads.c, for snapshot's
core), the requests Python makes itself (ptrace()) and their constants.
Syscalls run inside a target are wp.remote's.

Only the thread that seized a thread may make ptrace requests on it or
wait for it: use each of these from one thread.
"""
import errno
import os
import threading

from wp import procfs
from wp._native import check, ffi, lib
from wp.errors import NoSuchProcess

__all__ = ["PTRACE_CONT", "PTRACE_DETACH", "PTRACE_EVENT_EXEC", "PTRACE_EVENT_STOP",
           "PTRACE_GET_RSEQ_CONFIGURATION", "PTRACE_O_TRACEEXEC", "PTRACE_SEIZE", "ThreadStop", "WALL",
           "ptrace", "release_thread", "stop_thread", "thread_registers"]

PTRACE_CONT, PTRACE_DETACH, PTRACE_SEIZE = 7, 17, 0x4206
PTRACE_GET_RSEQ_CONFIGURATION = 0x420f
PTRACE_O_TRACEEXEC = 0x10
PTRACE_EVENT_EXEC, PTRACE_EVENT_STOP = 4, 128
WALL = 0x40000000     # waitpid's __WALL: wait for threads (clones) too

_libc = None


def ptrace(req, tid, addr=0, data=0):
    """ptrace(2) for the requests the C side (native/remote.c) does not
    make: returns the call's result, or -errno. addr and data are ints or
    ctypes buffers."""
    import ctypes
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        _libc.ptrace.restype = ctypes.c_long
    ret = _libc.ptrace(req, tid, addr, data)
    return -ctypes.get_errno() if ret < 0 else ret


# -- holding every thread ---------------------------------------------------------

# Some facts about stopping every thread of a target (kernel 6.x):
# - PTRACE_SEIZE + PTRACE_INTERRUPT stops a thread at its next return
#   towards user mode (a trap in get_signal()); PTRACE_DETACH from that trap
#   lets it go on untouched: registers are not changed, an interrupted
#   syscall restarts as after a job-control stop, and signals that came
#   meanwhile stay pending and are delivered afterwards.
# - A thread inside a syscall that does not sleep interruptibly (madvise,
#   mmap) stops only when that syscall has returned: once every thread is
#   stopped, no madvise(MADV_DONTNEED) of the target is half done.
# - A thread blocked on a userfaultfd fault taken in *user* mode wakes on the
#   interrupt, returns to user mode and stops (it refaults afterwards); one
#   blocked on a fault taken in *kernel* mode (a read() into a
#   write-protected buffer) retries the fault until it is resolved and
#   cannot stop before: the caller must resolve it (unfreeze) and then
#   release, which waits for such stragglers.
# - Only the tracing thread may wait for and detach its tracees.



class ThreadStop:
    """Every thread of a target but `skip` held in a ptrace stop.

    :meth:`stop` returns True once all are stopped, False if some did not
    stop within timeout (blocked on a fault the caller holds: resolve it,
    then :meth:`release`). :meth:`release` waits for those, then detaches
    every thread. Use from one thread only (ptrace's rule).
    """

    def __init__(self, pid, skip=(), timeout=0.5):
        self.pid = pid
        self.skip = set(skip)
        self.timeout = timeout
        self.stopped = set()    # tids in a ptrace stop
        self.pending = set()    # seized and interrupted, no stop seen yet
        self.elapsed = 0.0      # seconds from stop() to release()
        self._t0 = None

    def _tids(self):
        try:
            return set(procfs.tids(self.pid))
        except FileNotFoundError:
            raise NoSuchProcess(errno.ESRCH, "no such process %d (it exited)" % self.pid) from None

    def _seize(self, tid):
        ret = lib.wp_remote_seize(tid, 0)
        if ret == -errno.ESRCH:
            return          # exited meanwhile
        check(ret, "ptrace(PTRACE_SEIZE, %d)" % tid)
        self.pending.add(tid)
        ret = lib.wp_remote_interrupt(tid)
        if ret < 0 and ret != -errno.ESRCH:
            check(ret, "ptrace(PTRACE_INTERRUPT, %d)" % tid)

    def _poll(self, tid):
        """Takes tid's next stop if there is one: True when it is stopped
        (or gone) for good."""
        try:
            got, status = os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError:
            self.pending.discard(tid)
            return True
        if got != tid:
            return False
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            self.pending.discard(tid)
            return True
        if (status >> 16) == PTRACE_EVENT_STOP:
            self.pending.discard(tid)
            self.stopped.add(tid)
            return True
        # A signal-delivery-stop before our trap: let the signal through
        # (as if we were not there) and ask again.
        ptrace(PTRACE_CONT, tid, 0, os.WSTOPSIG(status))
        lib.wp_remote_interrupt(tid)
        return False

    def _wait(self, deadline):
        import time
        while self.pending:
            for tid in list(self.pending):
                self._poll(tid)
            if not self.pending or time.monotonic() > deadline:
                break
            time.sleep(0.0002)
        return not self.pending

    # Threads a release could not let go (still not stopped after its
    # wait), by tracing thread: let go at that thread's next stop() (or by
    # the kernel when the tracing thread exits).
    _stuck = {}

    @classmethod
    def _reap(cls):
        me = threading.get_ident()
        left = set()
        for tid in cls._stuck.pop(me, ()):
            try:
                got, status = os.waitpid(tid, os.WNOHANG | WALL)
            except ChildProcessError:
                continue
            if got != tid:
                left.add(tid)
            elif os.WIFSTOPPED(status):
                ptrace(PTRACE_DETACH, tid)
        if left:
            cls._stuck[me] = left

    def stop(self):
        import time
        self._reap()
        self._t0 = time.monotonic()
        deadline = self._t0 + self.timeout
        while True:
            new = self._tids() - self.skip - self.stopped - self.pending
            if not new:
                # Threads created by one not stopped yet show up later.
                if not self.pending or not self._wait(deadline):
                    return not self.pending
                continue
            for tid in sorted(new):
                self._seize(tid)
            if not self._wait(deadline):
                return False

    def release(self, timeout=30.0):
        """Waits for the threads that have not stopped yet, then lets every
        thread go. Returns the tids it could not release (stuck)."""
        import time
        self._wait(time.monotonic() + timeout)
        for tid in self.stopped:
            ptrace(PTRACE_DETACH, tid)
        stuck = set(self.pending)
        if stuck:
            self._stuck.setdefault(threading.get_ident(), set()).update(stuck)
        self.stopped.clear()
        if self._t0 is not None:
            self.elapsed = time.monotonic() - self._t0
        return stuck

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# -- one thread stopped for its registers (native/threads.c) ----------------------
# A blocking stop, unlike ThreadStop's: the caller (snapshot's freezer) waits
# for each thread, reads its registers for a core file, and releases it with
# the signal that stopped it first, if one did.

def stop_thread(tid):
    """Seizes and interrupts thread tid and waits for its stop.

    Returns:
        The signal that stopped it first (0: our interrupt did); hand it to
        :func:`release_thread`, which delivers it.
    Raises:
        OSError: ptrace failed (ProcessLookupError: the thread is gone;
            PermissionError: another tracer, or no CAP_SYS_PTRACE).
    """
    sig = ffi.new("int *")
    check(lib.wp_thread_stop(tid, sig), "ptrace(PTRACE_SEIZE/INTERRUPT, %d)" % tid)
    return sig[0]


def thread_registers(tid):
    """Returns (regs, fpregs, xstate) of a thread stopped by
    :func:`stop_thread`: the 27 general registers in the order of
    user_regs_struct (elf_gregset_t), the 512-byte FXSAVE area, and the
    XSAVE area rewritten to the standard x86_64 layout that gdb reads from
    cores (None if the kernel gave none).

    Raises:
        OSError: ptrace(PTRACE_GETREGS/GETFPREGS) failed.
    """
    regs = ffi.new("uint64_t[27]")
    fp = ffi.new("uint8_t[512]")
    check(lib.wp_thread_regs(tid, regs, fp), "ptrace(PTRACE_GETREGS, %d)" % tid)
    xs = ffi.new("uint8_t[]", 1 << 15)
    xs_std = ffi.new("uint8_t[]", 1 << 15)
    xstate = None
    n = lib.wp_thread_xstate(tid, xs, len(xs))
    if n > 0:
        n = lib.wp_xstate_to_standard(xs, n, xs_std, len(xs_std))
    if n > 0:
        xstate = bytes(ffi.buffer(xs_std, n))
    return list(regs), bytes(ffi.buffer(fp)), xstate


def release_thread(tid, sig=0):
    """Detaches a thread stopped by :func:`stop_thread`, delivering sig.
    Returns 0 or -errno (ESRCH: it is gone)."""
    return lib.wp_thread_release(tid, sig)
