"""Taking a file descriptor out of another process: pidfd_open(2) +
pidfd_getfd(2) (Linux 5.6+). Every module that takes a target's fd (the
userfaultfds wpd holds, wp trace's notes map, the bench writer's uffd)
does it here.

Kernel facts:

- pidfd_getfd needs PTRACE_MODE_ATTACH_REALCREDS on the target (root, or
  the same user with ptrace allowed by Yama) and returns a new fd with
  FD_CLOEXEC set on the same open file; the target's fd stays open.
- It looks the fd up in the file table of the pidfd's task. A process
  pidfd names the thread-group leader, whose file table is gone if it
  called pthread_exit(); a thread pidfd (PIDFD_THREAD, 6.9+) names that
  thread, which shares the process's table.
"""

import os

from wp._native import check, lib

PIDFD_THREAD = os.O_EXCL    # include/uapi/linux/pidfd.h


def getfd(pid, fd, tid=None):
    """Returns our copy (O_CLOEXEC) of fd fd of process pid, looked up
    through thread tid when given (a thread of pid other than its leader).

    Raises OSError: no such process, no such fd, or not permitted."""
    if tid is None or tid == pid:
        pidfd = check(lib.wp_pidfd_open(pid), "pidfd_open(%d)" % pid)
    else:
        pidfd = os.pidfd_open(tid, PIDFD_THREAD)
    try:
        return check(lib.wp_pidfd_getfd(pidfd, fd), "pidfd_getfd(pid %d, fd %d)" % (pid, fd))
    finally:
        os.close(pidfd)
