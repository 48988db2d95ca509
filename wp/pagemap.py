"""/proc/PID/pagemap: per-page bits, and PAGEMAP_SCAN (6.7+).

# Some facts about pagemap that this code depends on
- Each 64-bit entry: bit 63 present, 62 swapped, 61 file-page or shared-anon,
  57 uffd-wp (the PTE is write-protected by userfaultfd), 56 exclusively
  mapped, 55 soft-dirty, bits 0-54 the PFN (zero unless CAP_SYS_ADMIN).
- PAGEMAP_SCAN walks a range and returns runs of pages that match category
  bits. With PM_SCAN_WP_MATCHING it also write-protects the pages it returns,
  atomically with the walk; for a WP_ASYNC uffd PAGE_IS_WRITTEN means "written
  since last protected", so one ioctl both reports and re-arms.
"""
import os

from wp._native import check, ffi, lib

__all__ = ["Pagemap", "PRESENT", "SWAPPED", "FILE_SHARED", "UFFD_WP", "EXCLUSIVE", "SOFT_DIRTY", "PFN_MASK",
           "page_runs"]

PRESENT = 1 << 63
SWAPPED = 1 << 62
FILE_SHARED = 1 << 61
UFFD_WP = 1 << 57
EXCLUSIVE = 1 << 56
SOFT_DIRTY = 1 << 55
PFN_MASK = (1 << 55) - 1

PAGE_IS_WRITTEN = lib.PAGE_IS_WRITTEN
PAGE_IS_PRESENT = lib.PAGE_IS_PRESENT
PAGE_IS_PFNZERO = lib.PAGE_IS_PFNZERO
PAGE_IS_FILE = lib.PAGE_IS_FILE
PAGE_IS_WPALLOWED = lib.PAGE_IS_WPALLOWED


class Pagemap:
    """An open /proc/PID/pagemap."""

    def __init__(self, pid):
        self.pid = pid
        self.page_size = os.sysconf("SC_PAGESIZE")
        self.fd = os.open("/proc/%d/pagemap" % pid, os.O_RDONLY | os.O_CLOEXEC)
        self._vec = ffi.new("struct wp_page_region[]", 4096)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def entries(self, addr, npages):
        """Returns the raw 64-bit entries of npages pages from addr."""
        buf = ffi.new("uint64_t[]", npages)
        n = check(lib.wp_pagemap_read(self.fd, addr, npages, buf),
                  "pread(/proc/%d/pagemap, %#x)" % (self.pid, addr))
        return list(buf[0:n])

    def scan(self, start, end, category_mask=0, return_mask=0, flags=0,
             category_inverted=0, anyof_mask=0, max_pages=0):
        """Returns [(start, end, categories), ...] of the runs in [start, end)
        whose categories match; follows walk_end until the range is done."""
        out = []
        walk_end = ffi.new("uint64_t *")
        addr = start
        while addr < end:
            n = check(lib.wp_pagemap_scan(self.fd, addr, end, flags, category_mask,
                                          category_inverted, anyof_mask, return_mask,
                                          max_pages, self._vec, len(self._vec), walk_end),
                      "ioctl(PAGEMAP_SCAN, /proc/%d/pagemap, %#x-%#x)" % (self.pid, addr, end))
            out.extend((self._vec[i].start, self._vec[i].end, self._vec[i].categories)
                       for i in range(n))
            if max_pages and sum((e - s) for s, e, _ in out) >= max_pages * self.page_size:
                break
            if walk_end[0] <= addr:
                break
            addr = walk_end[0]
        return out

    def take_written(self, start, end):
        """Returns the runs of pages written since the last call (a WP_ASYNC
        uffd must protect [start, end)) and write-protects them again.

        "Written" is a present PTE without the uffd-wp bit. A read of a
        private anonymous page the target dropped (MADV_DONTNEED takes the
        marker with the PTE) maps the shared zero page without that bit: it
        was not written (a write replaces the zero page), so zero-page PTEs
        are left out, and left unprotected: a write to one maps a new page,
        without the bit, which the next scan reports."""
        return [(s, e) for s, e, _ in self.scan(
            start, end, category_mask=PAGE_IS_WRITTEN | PAGE_IS_PFNZERO,
            category_inverted=PAGE_IS_PFNZERO, return_mask=PAGE_IS_WRITTEN,
            flags=lib.PM_SCAN_WP_MATCHING | lib.PM_SCAN_CHECK_WPASYNC)]


def page_runs(addrs, page_size, key=None):
    """Groups sorted page addresses into runs of neighbouring pages, the
    shape one uffd ioctl or one mmap/madvise takes; with key(addr), a run
    also needs key to grow by one from page to page (neighbouring slots of
    a store).

    Returns:
        [(start, npages, key of the first page)] (key 0 without key).
    """
    out = []
    for a in addrs:
        k = key(a) if key else 0
        if out:
            s, n, k0 = out[-1]
            if a == s + n * page_size and (key is None or k == k0 + n):
                out[-1] = (s, n + 1, k0)
                continue
        out.append((a, 1, k))
    return out
