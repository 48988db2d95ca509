"""Address spaces: the memory of one process, local or remote.

Protectors read and write target memory through a Space and never learn
whether it is the daemon's own process or another one. Memory access uses
process_vm_readv/writev, which works on both (and on a process's own pid).

# Some facts about reading memory that a userfaultfd handles
- process_vm_readv pins the pages with a GUP that may drop the mmap lock and
  retry (FAULT_FLAG_ALLOW_RETRY): on a page whose read raises a userfault (a
  MISSING-registered page that is not mapped) it waits, like the target
  would, for the fault handler to resolve it. On the handler's own thread
  that is a deadlock.
- A read of /proc/PID/mem goes through access_remote_vm, whose GUP has no
  retry: handle_userfault answers SIGBUS at once and the read stops short
  there (EIO for its first page). It never waits for the handler.
"""
import errno
import os

from wp import maps as _maps
from wp import pidfd
from wp._native import check, ffi, lib
from wp.uffd import Userfaultfd

__all__ = ["Space", "LocalSpace", "ProcessSpace"]


class Space:
    """Memory of process ``pid``."""

    def __init__(self, pid):
        self.pid = pid
        self.page_size = os.sysconf("SC_PAGESIZE")
        self._mem = None    # /proc/PID/mem, opened by read_present

    def maps(self):
        return _maps.read_maps(self.pid)

    def read(self, addr, length):
        """Returns length bytes of the process's memory at addr."""
        buf = ffi.new("char[]", length)
        addrs = ffi.new("uint64_t[1]", [addr])
        n = check(lib.wp_vm_read(self.pid, buf, addrs, 1, length),
                  "process_vm_readv(%d, %#x+%#x)" % (self.pid, addr, length))
        return ffi.buffer(buf, n)[:]

    def read_present(self, addr, length):
        """Returns (data, holes): length bytes at addr read without ever
        waiting for a userfaultfd handler, and the addresses of the pages it
        could not read that way (not mapped in a MISSING-registered range,
        or not mapped at all), zeros in data. Safe on a fault thread.

        Raises:
            ProcessLookupError: the process is gone.
        """
        ps = self.page_size
        if self._mem is None:
            self._mem = os.open("/proc/%d/mem" % self.pid, os.O_RDONLY | os.O_CLOEXEC)
        parts, holes = [], []
        pos, end = addr, addr + length
        while pos < end:
            try:
                d = os.pread(self._mem, end - pos, pos)
                if not d:   # 0, not EIO: the mm this fd was opened on is gone
                    raise ProcessLookupError(errno.ESRCH, "pid %d exited (reading /proc/%d/mem)"
                                             % (self.pid, self.pid))
            except OSError as err:
                if err.errno not in (errno.EIO, errno.EFAULT):
                    raise
                d = b""
            parts.append(d)
            pos += len(d)
            if pos < end:
                # A short read stops at a page it cannot read: a hole.
                nxt = min(end, pos - pos % ps + ps)
                holes.append(pos - pos % ps)
                parts.append(bytes(nxt - pos))
                pos = nxt
        return b"".join(parts), holes

    def write(self, addr, data):
        """Writes data at addr. Note: a write-protected page faults like any
        other write, so the calling thread blocks until it is resolved."""
        addrs = ffi.new("uint64_t[1]", [addr])
        return check(lib.wp_vm_write(self.pid, data, addrs, 1, len(data)),
                     "process_vm_writev(%d, %#x+%#x)" % (self.pid, addr, len(data)))

    def open_uffd(self, features):
        """Returns a Userfaultfd for this process's memory, held by the daemon."""
        raise NotImplementedError

    def close(self):
        if self._mem is not None:
            os.close(self._mem)
            self._mem = None


class LocalSpace(Space):
    """The daemon's own process."""

    def __init__(self):
        super().__init__(os.getpid())

    def open_uffd(self, features):
        return Userfaultfd.create(features)


class ProcessSpace(Space):
    """Another process. Its uffds come from ``uffd_source(n)``, which returns
    a userfaultfd created in the target and now held by the daemon (taken
    with pidfd_getfd, by cooperation or by syscall injection)."""

    def __init__(self, pid, uffd_source):
        super().__init__(pid)
        self._uffd_source = uffd_source
        self._count = 0

    @classmethod
    def cooperative(cls, pid, fds):
        """A target that created uffds itself and told us their numbers."""
        fds = list(fds)

        def take(_n):
            if not fds:
                raise RuntimeError("target %d offered no more userfaultfds" % pid)
            return pidfd.getfd(pid, fds.pop(0))
        return cls(pid, take)

    @classmethod
    def attached(cls, pid):
        """A target that does not cooperate: each uffd is created in it by
        syscall injection (wp.remote) and the daemon keeps the only copy."""
        from wp.remote import RemoteProcess

        def take(_n):
            with RemoteProcess(pid) as rp:
                return rp.open_userfaultfd()
        return cls(pid, take)

    def open_uffd(self, features):
        fd = self._uffd_source(self._count)
        self._count += 1
        try:
            return Userfaultfd(fd, features)
        except BaseException:
            os.close(fd)
            raise
