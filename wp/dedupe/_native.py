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



def _pfn(zero_pfn):
    """The zero page's pfn for C: all ones when unknown (negative)."""
    return zero_pfn if zero_pfn >= 0 else 2**64 - 1

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

    def read(self, addrs, hash=True):
        """Reads and hashes up to ``batch`` pages at addrs. Returns how many
        were read: pages from the first unreadable one on are not (the
        caller skips that page and goes on)."""
        n = len(addrs)
        assert n <= self.batch
        self.addrs[0:n] = addrs
        return check(lib.wp_dd_read_hash(self.pid, self.addrs, n, self.page_size, self.buf,
                                         self.hashes if hash else ffi.NULL, self.zero),
                     "process_vm_readv(%d, %d pages)" % (self.pid, n))

    def hash_of(self, i):
        """Returns the hash of page i of the last batch (as the scan has it)."""
        ps = self.page_size
        lib.wp_dd_hash_pages(self.buf + i * ps, 1, ps, self.hashes + i, self.zero + i)
        return self.hashes[i]

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


class RegionState:
    """What the scanner keeps for one region between passes, in C arrays:
    the pagemap entries of this pass, each page's hash from the last pass,
    and the store page each merged page maps (index + 1; 0: not merged)."""

    def __init__(self, start, end, prot, page_size=4096):
        self.start = start
        self.end = end
        self.prot = prot
        self.page_size = page_size
        self.n = (end - start) // page_size
        self.pm = ffi.new("uint64_t[]", self.n)
        self.hashes = ffi.new("uint64_t[]", self.n)
        self.merged = ffi.new("uint64_t[]", self.n)

    def index(self, addr):
        return (addr - self.start) // self.page_size

    def addr(self, i):
        return self.start + i * self.page_size


class Scanner(Hasher):
    """Hasher plus the per-region passes done in C (native/dedupe.c)."""

    def __init__(self, pid, page_size=4096, batch=4096):
        super().__init__(pid, page_size, batch)
        self.pm_fd = os.open("/proc/%d/pagemap" % pid, os.O_RDONLY | os.O_CLOEXEC)
        self._idx = ffi.new("uint64_t[]", batch)
        self._eq = ffi.new("uint8_t[]", batch)
        self.counts = ffi.new("uint64_t[5]")

    def close(self):
        if self.pm_fd >= 0:
            os.close(self.pm_fd)
            self.pm_fd = -1

    def read_pagemap(self, region):
        """Reads the region's pagemap entries into region.pm."""
        n = check(lib.wp_pagemap_read(self.pm_fd, region.start, region.n, region.pm),
                  "pread(/proc/%d/pagemap, %#x)" % (self.pid, region.start))
        if n < region.n:
            ffi.memmove(region.pm + n, bytes(8 * (region.n - n)), 8 * (region.n - n))

    def _count_stable(self, scan):
        """Runs scan(counts): a wp_dd_scan* call, which sets counts[3] and
        [4] to the stable zero and other pages it found. Returns those two
        and adds them to the running totals there."""
        c = self.counts
        z0, s0 = c[3], c[4]
        c[3] = c[4] = 0
        scan(c)
        nz, ns = c[3], c[4]
        c[3], c[4] = z0 + nz, s0 + ns
        return nz, ns

    def verify(self, region):
        """Returns (broken, absent) page indexes of merged pages (wp_dd_verify)."""
        broken = ffi.new("uint64_t[]", region.n)
        absent = ffi.new("uint64_t[]", region.n)
        cnt = ffi.new("uint64_t[2]")
        lib.wp_dd_verify(region.pm, region.merged, region.n, broken, absent, cnt)
        return ffi.unpack(broken, cnt[0]), ffi.unpack(absent, cnt[1])

    def compare(self, n, store_base, idxs):
        """Compares the first n pages of the last read with store pages
        idxs[i] (None: with zeros). Returns a list of bools."""
        self._idx[0:n] = [2**64 - 1 if i is None else i for i in idxs]
        lib.wp_dd_compare(self.buf, n, self.page_size, store_base, self._idx, self._eq)
        return ffi.unpack(self._eq, n)

    def scan_window(self, region, frm, to, zero_pfn):
        """Like scan() for to - frm <= batch pages, leaving their bytes in
        the buffer. Returns (zero_idx, zero_pos, stable_idx, stable_pos):
        region page indexes and buffer positions (see page())."""
        n = to - frm
        zi = ffi.new("uint64_t[]", max(n, 1))
        zp = ffi.new("uint64_t[]", max(n, 1))
        si = ffi.new("uint64_t[]", max(n, 1))
        sp = ffi.new("uint64_t[]", max(n, 1))
        nz, ns = self._count_stable(lambda c: lib.wp_dd_scan_window(
            self.pid, region.start, self.page_size, region.pm, frm, to, _pfn(zero_pfn), region.hashes,
            self.buf, self.batch, self.addrs, zi, zp, si, sp, c))
        return ffi.unpack(zi, nz), ffi.unpack(zp, nz), ffi.unpack(si, ns), ffi.unpack(sp, ns)

    def compare_at(self, store_base, pos, idx):
        """Compares buffer pages at positions pos with store pages idx."""
        n = len(pos)
        p = ffi.new("uint64_t[]", pos)
        i = ffi.new("uint64_t[]", idx)
        eq = ffi.new("uint8_t[]", max(n, 1))
        lib.wp_dd_compare_at(self.buf, self.page_size, store_base, p, i, n, eq)
        return ffi.unpack(eq, n)
