"""The dedupe facility's calls into C (native/dedupe.c): batched read and
hash of target pages, byte comparison, store hole punching, kpagecount."""
import os

from wp._native import check, ffi, lib

__all__ = ["Hasher", "punch", "kpagecount", "uffd_feature", "hash_bytes"]


def uffd_feature(name):
    """Returns the UFFD_FEATURE_<NAME> bit."""
    return getattr(lib, "UFFD_FEATURE_" + name)


def hash_bytes(data):
    """Returns the dedupe hash of one page of bytes (0 if all zero)."""
    h = ffi.new("uint64_t[1]")
    z = ffi.new("uint8_t[1]")
    lib.wp_dd_hash_pages(ffi.from_buffer(data), 1, len(data), h, z)
    return h[0]


class Hasher:
    """Reads pages of one process in batches and hashes them.

    One buffer of ``batch`` pages is reused for every call: the bytes of the
    last batch stay readable through :meth:`page` until the next call.
    """

    def __init__(self, pid, page_size=4096, batch=4096):
        self.pid = pid
        self.page_size = page_size
        self.batch = batch
        self.buf = ffi.new("char[]", batch * page_size)
        self.addrs = ffi.new("uint64_t[]", batch)
        self.hashes = ffi.new("uint64_t[]", batch)
        self.zero = ffi.new("uint8_t[]", batch)
        self._view = ffi.buffer(self.buf)

    def read(self, addrs):
        """Reads and hashes up to ``batch`` pages at addrs. Returns how many
        were read: pages from the first unreadable one on are not (the
        caller skips that page and goes on)."""
        n = len(addrs)
        assert n <= self.batch
        self.addrs[0:n] = addrs
        return check(lib.wp_dd_read_hash(self.pid, self.addrs, n, self.page_size, self.buf,
                                         self.hashes, self.zero),
                     "process_vm_readv(%d, %d pages)" % (self.pid, n))

    def page(self, i):
        """Returns the bytes of page i of the last batch."""
        ps = self.page_size
        return self._view[i * ps:(i + 1) * ps]


def punch(fd, offset, length):
    """Frees [offset, offset+length) of a memfd (the file keeps its size)."""
    check(lib.wp_dd_punch(fd, offset, length), "fallocate(PUNCH_HOLE, %#x+%#x)" % (offset, length))


_kpc_fd = None


def kpagecount(pfns):
    """Returns the map counts of physical pages pfns (/proc/kpagecount, root)."""
    global _kpc_fd
    if _kpc_fd is None:
        _kpc_fd = os.open("/proc/kpagecount", os.O_RDONLY | os.O_CLOEXEC)
    n = len(pfns)
    arr = ffi.new("uint64_t[]", list(pfns))
    out = ffi.new("uint64_t[]", n)
    check(lib.wp_dd_kpagecount(_kpc_fd, arr, n, out), "pread(/proc/kpagecount)")
    return list(out)
