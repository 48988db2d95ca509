"""Catching a process at its first instruction after exec (``wp run``).

The client forks the command and holds it before exec; wpd seizes it with
PTRACE_O_TRACEEXEC and lets it exec. At the exec event stop the new address
space exists but no instruction of the new program has run. wpd queues a
SIGSTOP and detaches: the signal is acted on as the thread returns to user
mode, so the process sits in a job-control stop at its first instruction
while wpd injects its userfaultfd and protects its memory, then SIGCONT.
"""
import errno
import os
import signal
import time

from wp.errors import TargetError
from wp.ptrace import (PTRACE_CONT, PTRACE_DETACH, PTRACE_EVENT_EXEC, PTRACE_O_TRACEEXEC,
                       PTRACE_SEIZE, WALL, ptrace)

__all__ = ["seize_for_exec", "stop_at_exec"]


def _ptrace(req, pid, addr=0, data=0, what=""):
    ret = ptrace(req, pid, addr, data)
    if ret < 0:
        raise OSError(-ret, "%s (originated from ptrace(%s, %d))" % (os.strerror(-ret), what, pid))


def seize_for_exec(pid):
    """Seizes pid (not stopping it) so that its next exec stops it."""
    _ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACEEXEC, "PTRACE_SEIZE")


def stop_at_exec(pid, timeout=30.0):
    """Waits for pid's exec, leaves it job-control stopped at its first
    instruction and detached. Must run on the thread that seized it.

    Raises:
        TargetError: the process exited (or was killed) instead of exec'ing.
        TimeoutError: no exec within timeout (pid is detached and left running).
    """
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG | WALL)
        if got == pid:
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                code = os.waitstatus_to_exitcode(status)
                raise TargetError("pid %d ended before exec (status %d): is the command right?"
                                  % (pid, code))
            if os.WIFSTOPPED(status):
                if status >> 8 == signal.SIGTRAP | (PTRACE_EVENT_EXEC << 8):
                    break
                # Some other stop (a signal for it): pass the signal on.
                sig = os.WSTOPSIG(status)
                _ptrace(PTRACE_CONT, pid, 0, 0 if sig == signal.SIGTRAP else sig, "PTRACE_CONT")
        elif time.monotonic() > deadline:
            try:
                _ptrace(PTRACE_DETACH, pid, 0, 0, "PTRACE_DETACH")
            except OSError as err:
                if err.errno != errno.ESRCH:
                    raise
            raise TimeoutError(errno.ETIMEDOUT, "pid %d did not exec within %.0f s" % (pid, timeout))
        else:
            time.sleep(0.001)
    os.kill(pid, signal.SIGSTOP)
    try:
        _ptrace(PTRACE_DETACH, pid, 0, 0, "PTRACE_DETACH")
    except ProcessLookupError:
        # Killed meanwhile (wp run kills its command if we were too slow):
        # a traced zombie is reported to us first; wait it so its parent can.
        os.waitpid(pid, os.WNOHANG | WALL)
        raise TargetError("pid %d was killed at its exec (wp run gave up waiting for wpd?)" % pid) from None
