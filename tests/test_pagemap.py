"""wp.pagemap against memtarget processes: the bits of /proc/PID/pagemap and
PAGEMAP_SCAN, including the written-and-re-protect scan async WP relies on."""
import pytest

from fixtures_core import layout, memtarget, sessions  # noqa: F401  (fixtures)
from wp import pagemap
from wp.pagemap import (PAGE_IS_FILE, PAGE_IS_PRESENT, PAGE_IS_WRITTEN, PFN_MASK, Pagemap)
from wp.uffd import ASYNC_FEATURES, MODE_WP

# Kinds whose pages pagemap marks "file-page or shared-anon" (bit 61).
FILE_OR_SHARED = ("shared-anon", "memfd", "memfd-private", "shm", "file")


@pytest.mark.parametrize("kind", ["anon", "shared-anon", "memfd", "memfd-private", "shm", "file"])
def test_entry_bits_of_populated_pages(memtarget, kind):
    t = memtarget(kind, 4)
    es = t.entries()
    assert all(e & pagemap.PRESENT for e in es)
    assert not any(e & (pagemap.UFFD_WP | pagemap.SWAPPED) for e in es)
    assert all(e & PFN_MASK for e in es)          # root sees PFNs
    assert len({e & PFN_MASK for e in es}) == 4
    if kind == "memfd-private":
        # Populated by a read-then-write of byte 0: the write made private copies.
        assert not any(e & pagemap.FILE_SHARED for e in es)
    else:
        assert all(bool(e & pagemap.FILE_SHARED) == (kind in FILE_OR_SHARED) for e in es)
    if kind in ("anon", "memfd-private"):
        assert all(e & pagemap.EXCLUSIVE for e in es)

    assert t.cmd("d 1") == ["ok"]
    assert t.present_bits() == [True, False, True, True]
    assert t.read(1) == (0, 0)
    assert t.present_bits() == [True] * 4


def test_unpopulated_zero_page_then_written(memtarget):
    t = memtarget("anon-unpop", 3)
    assert t.present_bits() == [False] * 3
    assert [e & PFN_MASK for e in t.entries()] == [0, 0, 0]
    t.read(0)
    t.read(1)
    e0, e1, e2 = t.entries()
    # Reads map the one shared zero page: present, same PFN, not exclusive.
    assert e0 & pagemap.PRESENT and e1 & pagemap.PRESENT and not e2 & pagemap.PRESENT
    assert e0 & PFN_MASK == e1 & PFN_MASK != 0
    assert not e0 & pagemap.EXCLUSIVE
    t.write(0, 3)
    e0w = t.entries()[0]
    assert e0w & pagemap.EXCLUSIVE and e0w & PFN_MASK != e1 & PFN_MASK


def test_scan_present_runs(memtarget):
    t = memtarget("anon", 8)
    for idx in (2, 5):
        assert t.cmd("d %d" % idx) == ["ok"]
    p = t.page
    end = t.addr + t.length
    with Pagemap(t.pid) as pm:
        assert pm.scan(t.addr, end, category_mask=PAGE_IS_PRESENT, return_mask=PAGE_IS_PRESENT) == [
            (p(0), p(2), PAGE_IS_PRESENT), (p(3), p(5), PAGE_IS_PRESENT), (p(6), p(8), PAGE_IS_PRESENT)]
        assert pm.scan(t.addr, end, category_mask=PAGE_IS_PRESENT, category_inverted=PAGE_IS_PRESENT,
                       return_mask=PAGE_IS_PRESENT) == [(p(2), p(3), 0), (p(5), p(6), 0)]
        assert pm.scan(t.addr, end, category_mask=PAGE_IS_PRESENT, return_mask=PAGE_IS_PRESENT,
                       max_pages=3) == [(p(0), p(2), PAGE_IS_PRESENT), (p(3), p(4), PAGE_IS_PRESENT)]
        # Anonymous memory is not file memory.
        assert pm.scan(t.addr, end, category_mask=PAGE_IS_FILE, return_mask=PAGE_IS_FILE) == []


def test_scan_file_category(layout):
    t = layout(2)
    p = t.page
    with Pagemap(t.pid) as pm:
        got = pm.scan(t.addr, t.addr + t.length, anyof_mask=PAGE_IS_PRESENT,
                      return_mask=PAGE_IS_FILE | PAGE_IS_PRESENT)
    assert got == [(p(0), p(2), PAGE_IS_PRESENT), (p(2), p(4), PAGE_IS_PRESENT | PAGE_IS_FILE)]


@pytest.mark.parametrize("kind", ["anon", "file"])
def test_take_written_reports_and_rearms(memtarget, kind):
    t = memtarget(kind, 8)
    p = t.page
    space = t.space()
    u = space.open_uffd(ASYNC_FEATURES)
    try:
        u.register(t.addr, t.length, MODE_WP)
        u.protect(t.addr, t.length)
        with Pagemap(t.pid) as pm:
            assert pm.take_written(t.addr, t.addr + t.length) == []
            for idx in (1, 4, 5):
                t.write(idx, idx)
            assert t.wp_bits() == [i not in (1, 4, 5) for i in range(8)]
            written = pm.scan(t.addr, t.addr + t.length, category_mask=PAGE_IS_WRITTEN,
                              return_mask=PAGE_IS_WRITTEN)       # a look, no re-arm
            assert written == [(p(1), p(2), PAGE_IS_WRITTEN), (p(4), p(6), PAGE_IS_WRITTEN)]
            assert pm.take_written(t.addr, t.addr + t.length) == [(p(1), p(2)), (p(4), p(6))]
            assert t.wp_bits() == [True] * 8
            assert pm.take_written(t.addr, t.addr + t.length) == []
            t.write(7, 1)
            assert pm.take_written(t.addr, t.addr + t.length) == [(p(7), p(8))]
        assert t.read(4) == (4, 4 * t.page_size)
    finally:
        u.unprotect(t.addr, t.length)
        u.unregister(t.addr, t.length)
        u.close()
    assert not any(t.wp_bits())


def test_no_such_process():
    with pytest.raises(FileNotFoundError):
        Pagemap((1 << 22) + 1)


def test_vm_read_keeps_order_and_stops_at_a_hole():
    """wp_vm_read (native/proc.c) reads adjacent pages in one iovec, in the
    order asked, and a partial read still ends exactly at the first
    unreadable page, inside an iovec: of pages 5, 0, 1, 2, 3, 4 with page 3
    PROT_NONE, the first four come back."""
    import ctypes
    import mmap
    import os

    from wp._native import ffi, lib
    ps = mmap.PAGESIZE
    m = mmap.mmap(-1, 6 * ps)
    for i in range(6):
        m[i * ps:(i + 1) * ps] = bytes([i + 1]) * ps
    base = int(ffi.cast("uint64_t", ffi.from_buffer(m)))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    buf = ffi.new("char[]", 6 * ps)
    # Out of order and adjacent: 5, then 0-1-2-3 (one iovec), then 4.
    order = [5, 0, 1, 2, 3, 4]
    addrs = ffi.new("uint64_t[]", [base + i * ps for i in order])
    assert lib.wp_vm_read(os.getpid(), buf, addrs, 6, ps) == 6 * ps
    assert bytes(ffi.buffer(buf, 6 * ps)) == b"".join(bytes([i + 1]) * ps for i in order)
    assert libc.mprotect(base + 3 * ps, ps, 0) == 0, ctypes.get_errno()
    try:
        buf = ffi.new("char[]", 6 * ps)
        assert lib.wp_vm_read(os.getpid(), buf, addrs, 6, ps) == 4 * ps
        assert bytes(ffi.buffer(buf, 4 * ps)) == b"".join(bytes([i + 1]) * ps for i in (5, 0, 1, 2))
    finally:
        libc.mprotect(base + 3 * ps, ps, mmap.PROT_READ | mmap.PROT_WRITE)
    del buf
    m.close()
