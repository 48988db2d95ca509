"""Address spaces: the memory of one process, local or remote.

Protectors read and write target memory through a Space and never learn
whether it is the daemon's own process or another one. Memory access uses
process_vm_readv/writev, which works on both (and on a process's own pid).
"""
import os

from wp import maps as _maps
from wp._native import check, ffi, lib
from wp.uffd import Userfaultfd

__all__ = ["Space", "LocalSpace", "ProcessSpace"]


class Space:
    """Memory of process ``pid``."""

    def __init__(self, pid):
        self.pid = pid
        self.page_size = os.sysconf("SC_PAGESIZE")

    def maps(self):
        return _maps.read_maps(self.pid)

    def read(self, addr, length):
        """Returns length bytes of the process's memory at addr."""
        buf = ffi.new("char[]", length)
        addrs = ffi.new("uint64_t[1]", [addr])
        n = check(lib.wp_vm_read(self.pid, buf, addrs, 1, length),
                  "process_vm_readv(%d, %#x+%#x)" % (self.pid, addr, length))
        return ffi.buffer(buf, n)[:]

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
        pass


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
            pidfd = check(lib.wp_pidfd_open(pid), "pidfd_open(%d)" % pid)
            try:
                return check(lib.wp_pidfd_getfd(pidfd, fds.pop(0)), "pidfd_getfd(%d)" % pid)
            finally:
                os.close(pidfd)
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
