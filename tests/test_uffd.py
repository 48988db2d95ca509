"""wp.uffd against the kernel, on this test process's own memory.

Pages of a range registered MISSING or MINOR are only touched from Python
once an ioctl has filled them: a Python thread that faults on a
userfaultfd-registered page would block holding the GIL, and nothing could
then resolve it.
"""
import ctypes
import errno
import mmap
import os
import tempfile

import pytest

from wp import pagemap
from wp.uffd import (ASYNC_FEATURES, MODE_MINOR, MODE_MISSING, MODE_WP, SYNC_FEATURES,
                     Userfaultfd, feature_names, supported_features)

PS = mmap.PAGESIZE

# Kernel ABI (include/uapi/linux/userfaultfd.h), written out here so the test
# does not trust our own constants: feature bits, and the ioctl numbers whose
# bits UFFDIO_REGISTER returns as "allowed here".
WP_UNPOPULATED = 1 << 13
WP_ASYNC = 1 << 15
MOVE = 1 << 16
IOC_WAKE, IOC_COPY, IOC_ZEROPAGE, IOC_MOVE, IOC_WRITEPROTECT, IOC_CONTINUE = (
    1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6, 1 << 7)


def address(m):
    """Returns the address of mmap object m."""
    c = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(c)
    finally:
        del c   # drop the buffer export so m can be closed


@pytest.fixture
def anon():
    """anon(npages) -> (mmap, addr): private anonymous memory, never touched."""
    maps = []

    def make(npages):
        m = mmap.mmap(-1, npages * PS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        maps.append(m)
        return m, address(m)
    yield make
    for m in maps:
        m.close()


@pytest.fixture
def uffd():
    """uffd(features=SYNC_FEATURES) -> Userfaultfd, closed at teardown."""
    made = []

    def make(features=SYNC_FEATURES):
        u = Userfaultfd.create(features)
        made.append(u)
        return u
    yield make
    for u in made:
        u.close()


def entries(addr, npages):
    with pagemap.Pagemap(os.getpid()) as pm:
        return pm.entries(addr, npages)


def present(addr, npages):
    return [bool(e & pagemap.PRESENT) for e in entries(addr, npages)]


def wp(addr, npages):
    return [bool(e & pagemap.UFFD_WP) for e in entries(addr, npages)]


# -- features ----------------------------------------------------------------


def test_supported_features():
    mask = supported_features()
    assert mask & WP_ASYNC and mask & WP_UNPOPULATED and mask & MOVE
    names = feature_names(mask)
    for name in ("wp_async", "wp_unpopulated", "move", "pagefault_flag_wp", "thread_id",
                 "event_fork", "event_remap", "event_remove", "event_unmap",
                 "wp_hugetlbfs_shmem", "minor_shmem", "minor_hugetlbfs"):
        assert name in names, (name, names)
    assert supported_features() == mask   # probed once, stable


def test_feature_names():
    assert feature_names(0) == []
    assert feature_names(WP_ASYNC | MOVE | WP_UNPOPULATED) == ["move", "wp_async", "wp_unpopulated"]
    assert feature_names(1 << 63) == []
    all_names = feature_names(supported_features())
    assert all_names == sorted(all_names) and len(set(all_names)) == len(all_names)


def test_create():
    with Userfaultfd.create() as u:
        assert os.readlink("/proc/self/fd/%d" % u.fd) == "anon_inode:[userfaultfd]"
        assert u.ioctls   # UFFDIO_API reports the ioctls the uffd takes
        assert u.offered == supported_features()
    # A bit the kernel does not know is dropped before UFFDIO_API (which
    # would refuse it with EINVAL).
    with Userfaultfd.create(SYNC_FEATURES | (1 << 60)) as u:
        assert u.fd >= 0


# UFFDIO_API writes back *every* feature the kernel offers ("report all
# available features and ioctls to userland", fs/userfaultfd.c), not the ones
# this uffd enabled: .features must be what was asked for (and supported).
def test_features_are_the_enabled_ones(uffd):
    s = uffd(SYNC_FEATURES)
    a = uffd(ASYNC_FEATURES)
    assert s.features == SYNC_FEATURES and not s.is_async
    assert a.features == ASYNC_FEATURES and a.is_async
    assert "wp_async" in feature_names(a.features) and "wp_async" not in feature_names(s.features)
    # Bits the kernel does not know are dropped, not passed to UFFDIO_API.
    u = uffd(SYNC_FEATURES | (1 << 60))
    assert u.features == SYNC_FEATURES


def test_api_twice_fails_and_names_the_ioctl(uffd):
    u = uffd()
    dup = os.dup(u.fd)
    try:
        with pytest.raises(OSError) as exc:
            Userfaultfd(dup, SYNC_FEATURES)
        assert exc.value.errno == errno.EINVAL
        assert "UFFDIO_API" in str(exc.value)
    finally:
        os.close(dup)


def test_close_is_idempotent():
    with Userfaultfd.create() as u:
        fd = u.fd
    assert u.fd == -1
    u.close()
    with pytest.raises(OSError):
        os.fstat(fd)


# -- MISSING: copy and zeropage ----------------------------------------------


def test_missing_copy_and_zeropage(anon, uffd):
    m, addr = anon(4)
    u = uffd()
    allowed = u.register(addr, 4 * PS, MODE_MISSING | MODE_WP)
    assert allowed & IOC_COPY and allowed & IOC_ZEROPAGE and allowed & IOC_WAKE
    assert allowed & IOC_WRITEPROTECT and allowed & IOC_MOVE
    assert present(addr, 4) == [False] * 4

    src = ctypes.create_string_buffer(bytes(range(256)) * (PS // 256), PS)
    assert u.copy(addr, ctypes.addressof(src), PS) == PS
    assert u.zeropage(addr + PS, PS) == PS
    assert u.copy(addr + 2 * PS, ctypes.addressof(src), PS, wp=True) == PS
    assert present(addr, 4) == [True, True, True, False]
    assert wp(addr, 3) == [False, False, True]

    # A page that is already there is not replaced.
    with pytest.raises(FileExistsError) as exc:
        u.copy(addr, ctypes.addressof(src), PS)
    assert "UFFDIO_COPY" in str(exc.value)
    with pytest.raises(FileExistsError):
        u.zeropage(addr + PS, PS)

    # Filled pages can be read from Python now.
    assert m[:PS] == src.raw
    assert m[PS:2 * PS] == bytes(PS)
    assert m[2 * PS:3 * PS] == src.raw

    u.unprotect(addr + 2 * PS, PS)
    assert wp(addr, 3) == [False] * 3
    u.unregister(addr, 4 * PS)
    assert m[3 * PS:] == bytes(PS)   # unregistered: an ordinary zero page


def test_move(anon, uffd):
    src_m, src = anon(3)
    dst_m, dst = anon(3)
    src_m[:PS] = b"\xa5" * PS
    src_m[PS:2 * PS] = b"\x5a" * PS
    u = uffd()
    u.register(dst, 3 * PS, MODE_MISSING)

    assert u.move(dst, src, 2 * PS) == 2 * PS
    assert present(dst, 3) == [True, True, False]
    assert present(src, 2) == [False, False]
    assert dst_m[:PS] == b"\xa5" * PS and dst_m[PS:2 * PS] == b"\x5a" * PS

    # Source page 2 was never touched: a hole, moved only if holes are allowed.
    with pytest.raises(FileNotFoundError) as exc:
        u.move(dst + 2 * PS, src + 2 * PS, PS)
    assert "UFFDIO_MOVE" in str(exc.value)
    assert u.move(dst + 2 * PS, src + 2 * PS, PS, allow_holes=True) == PS
    assert present(dst, 3) == [True, True, False]

    # The source is not registered: it reads as fresh zero pages again.
    assert src_m[:2 * PS] == bytes(2 * PS)
    u.zeropage(dst + 2 * PS, PS)
    assert dst_m[2 * PS:] == bytes(PS)


# -- MINOR: continue ----------------------------------------------------------


@pytest.fixture
def memfd_map():
    """memfd_map(npages, contents) -> (mmap, addr) of a MAP_SHARED memfd whose
    page cache already holds contents (written with pwrite, not mapped)."""
    made = []

    def make(npages, contents):
        fd = os.memfd_create("wp-test-minor", os.MFD_CLOEXEC)
        os.ftruncate(fd, npages * PS)
        os.pwrite(fd, contents, 0)
        m = mmap.mmap(fd, npages * PS, flags=mmap.MAP_SHARED)
        os.close(fd)
        made.append(m)
        return m, address(m)
    yield make
    for m in made:
        m.close()


def test_minor_continue(memfd_map, uffd):
    data = b"\x11" * PS + b"\x22" * PS
    m, addr = memfd_map(3, data)
    u = uffd()
    allowed = u.register(addr, 3 * PS, MODE_MINOR | MODE_WP)
    assert allowed & IOC_CONTINUE and allowed & IOC_WRITEPROTECT
    assert present(addr, 3) == [False] * 3

    assert u.continue_(addr, PS) == PS
    assert u.continue_(addr + PS, PS, wp=True) == PS
    assert present(addr, 3) == [True, True, False]
    assert wp(addr, 2) == [False, True]
    with pytest.raises(FileExistsError) as exc:
        u.continue_(addr, PS)
    assert "UFFDIO_CONTINUE" in str(exc.value)

    assert m[:2 * PS] == data
    u.unprotect(addr + PS, PS)
    u.unregister(addr, 3 * PS)
    m[PS:PS + 4] = b"abcd"
    assert m[PS:PS + 5] == b"abcd\x22"


# -- WP on this process's memory ----------------------------------------------


def test_writeprotect_populated_and_unpopulated(anon, uffd):
    m, addr = anon(4)
    m[:PS] = b"x" * PS        # page 0 present, the rest never touched
    m[2 * PS] = 1             # page 2 present
    u = uffd()
    assert u.register(addr, 4 * PS, MODE_WP) & IOC_WRITEPROTECT
    assert wp(addr, 4) == [False] * 4
    u.protect(addr, 4 * PS)
    # WP_UNPOPULATED: markers on the never-touched pages too.
    assert present(addr, 4) == [True, False, True, False]
    assert wp(addr, 4) == [True] * 4
    u.unprotect(addr + PS, 2 * PS)
    assert wp(addr, 4) == [True, False, False, True]
    u.unprotect(addr, 4 * PS)
    assert wp(addr, 4) == [False] * 4
    u.unregister(addr, 4 * PS)
    m[:4] = b"done"
    assert m[:5] == b"donex"


def test_without_wp_unpopulated_unpopulated_pages_are_skipped(anon, uffd):
    m, addr = anon(2)
    m[0] = 1
    u = uffd(SYNC_FEATURES & ~WP_UNPOPULATED)
    assert not u.features & WP_UNPOPULATED
    u.register(addr, 2 * PS, MODE_WP)
    u.protect(addr, 2 * PS)
    assert wp(addr, 2) == [True, False]
    u.unprotect(addr, 2 * PS)


def test_errors_name_the_ioctl(anon, uffd):
    m, addr = anon(2)
    u = uffd()
    with pytest.raises(OSError) as exc:
        u.register(addr + 1, PS, MODE_WP)
    assert exc.value.errno == errno.EINVAL and "UFFDIO_REGISTER" in str(exc.value)
    with pytest.raises(OSError) as exc:
        u.protect(addr, PS)      # not registered
    assert exc.value.errno == errno.ENOENT and "UFFDIO_WRITEPROTECT" in str(exc.value)


def test_disk_file_takes_async_wp_only(uffd):
    """A regular file on the root filesystem (ext4): sync WP registration is
    refused with EINVAL, a WP_ASYNC uffd accepts it (what wp.maps.SYNC_KINDS
    and the session's choice of mode rely on)."""
    with tempfile.TemporaryFile(dir="/var/tmp") as f:
        f.truncate(2 * PS)
        m = mmap.mmap(f.fileno(), 2 * PS, flags=mmap.MAP_SHARED)
        try:
            addr = address(m)
            m[0] = 1
            with pytest.raises(OSError) as exc:
                uffd(SYNC_FEATURES).register(addr, 2 * PS, MODE_WP)
            assert exc.value.errno == errno.EINVAL
            a = uffd(ASYNC_FEATURES)
            a.register(addr, 2 * PS, MODE_WP)
            a.protect(addr, 2 * PS)
            assert wp(addr, 2) == [True, True]
            m[0] = 2          # async: the kernel resolves the fault itself
            assert wp(addr, 2) == [False, True]
            a.unprotect(addr, 2 * PS)
            a.unregister(addr, 2 * PS)
        finally:
            m.close()
