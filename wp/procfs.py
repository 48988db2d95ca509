"""What /proc says about processes and threads: stat, status, comm, the
thread list and the children. Plain functions; every module that needs one
of these files reads it here.

Kernel facts the parsing depends on:

- /proc/PID/stat is "pid (comm) state ppid ...". comm is the task's name
  as the process set it (prctl PR_SET_NAME, or the executable's name, up to
  15 bytes) and may itself contain spaces and ")" — so the line is split at
  the *last* ")", and the fields after it are numbered from state (field 3
  of proc(5)) as index 0.
- /proc/PID/task/TID/... answers for one thread; /proc/TID/... also answers
  for a thread that is not a process leader (the kernel hides such ids from
  the /proc listing, not from lookups), but then describes its whole thread
  group for the process-wide fields.
- A process that exits between two reads makes open() or read() fail with
  ENOENT or ESRCH.
"""

import os

# stat field indexes after the comm (proc(5) field number minus 3).
STATE, PPID, PGRP, SID = 0, 1, 2, 3
FLAGS = 6                   # task->flags, PF_*
UTIME, STIME, CUTIME, CSTIME = 11, 12, 13, 14
NICE = 16
NUM_THREADS = 17
STARTTIME = 19              # clock ticks after boot: with the pid, names one process

# task->flags bit of kernel threads (include/linux/sched.h): they have no
# user memory, and /proc lists them like processes.
PF_KTHREAD = 0x00200000

CLK_TCK = os.sysconf("SC_CLK_TCK")   # the unit of utime/stime in stat


def _path(pid, tid, name):
    if tid is None:
        return "/proc/%d/%s" % (pid, name)
    return "/proc/%d/task/%d/%s" % (pid, tid, name)


def read_stat(pid, tid=None):
    """Returns (comm, fields after comm) of /proc/PID[/task/TID]/stat.

    Raises OSError (FileNotFoundError, ProcessLookupError) if it is gone."""
    with open(_path(pid, tid, "stat")) as f:
        s = f.read()
    # comm may contain spaces and ")": it ends at the last ")".
    lpar, rpar = s.index("("), s.rindex(")")
    return s[lpar + 1:rpar], s[rpar + 1:].split()


def stat_fields(pid, tid=None):
    """Fields of /proc/PID[/task/TID]/stat after the comm (state is index
    0), or None if it is gone."""
    try:
        return read_stat(pid, tid)[1]
    except (FileNotFoundError, ProcessLookupError):
        return None


def cpu_seconds(pid):
    """utime + stime of a live process (all its threads), in seconds.
    Raises OSError if it is gone."""
    fields = read_stat(pid)[1]
    return (int(fields[UTIME]) + int(fields[STIME])) / CLK_TCK


def pss_kb(pid):
    """The process's proportional set size in kB (smaps_rollup's Pss: each
    page divided among the processes mapping it, so merging shows)."""
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def is_kernel_thread(fields):
    """True if stat fields (from stat_fields) are a kernel thread's."""
    return bool(int(fields[FLAGS]) & PF_KTHREAD)


def is_zombie(fields):
    """True if stat fields are of a task that has exited (Z) or is being
    reaped (X)."""
    return fields[STATE] in ("Z", "X")


def status(pid, tid=None):
    """/proc/PID[/task/TID]/status as a dict of stripped strings
    ("Tgid" -> "1234"). Raises OSError if it is gone."""
    out = {}
    with open(_path(pid, tid, "status")) as f:
        for line in f:
            k, sep, v = line.partition(":")
            if sep:
                out[k] = v.strip()
    return out


def tgid(tid):
    """Returns the process (thread group) id of thread tid, or 0 if it is
    gone."""
    try:
        return int(status(tid)["Tgid"])
    except (OSError, KeyError, ValueError):
        return 0


def ns_ids(pid, tid):
    """Returns (pid, tid) as the target sees them: the last NStgid / NSpid
    entries, its own pid namespace (a container) being the innermost.
    Falls back to (pid, tid) if they cannot be read."""
    try:
        st = status(pid, tid)
        return int(st["NStgid"].split()[-1]), int(st["NSpid"].split()[-1])
    except (OSError, KeyError, ValueError):
        return pid, tid


def comm(pid):
    """The process's name (/proc/PID/comm), or None if it is gone."""
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return None


def find_by_comm(name):
    """Returns the pid of the first process named name (comm), or None."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and comm(int(entry)) == name:
            return int(entry)
    return None


def tids(pid):
    """The ids of pid's threads, sorted. Raises FileNotFoundError if pid is
    gone."""
    return sorted(int(t) for t in os.listdir("/proc/%d/task" % pid))


def children(pid):
    """The pids of pid's children, over all its threads: the kernel lists a
    child under the thread that forked it (/proc/PID/task/TID/children).
    Raises OSError if pid is gone."""
    kids = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                kids.extend(int(x) for x in f.read().split())
        except FileNotFoundError:
            continue    # that thread exited meanwhile
    return kids
