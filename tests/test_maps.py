"""wp.maps: what /proc/PID/smaps says about each kind of memory, classified."""
import os

import pytest

from fixtures_core import ALL_KINDS, layout, memtarget, sessions  # noqa: F401  (fixtures)
from wp import maps
from wp.maps import Mapping, classify, read_maps

KIND = {"anon": maps.PRIVATE_ANON, "anon-unpop": maps.PRIVATE_ANON,
        "shared-anon": maps.SHARED_ANON, "memfd": maps.MEMFD, "memfd-private": maps.MEMFD,
        "shm": maps.SHMEM, "hugetlb": maps.HUGETLB, "file": maps.FILE}
SHARED = {"shared-anon", "memfd", "shm", "file"}


def mapping_at(mappings, addr):
    found = [m for m in mappings if m.start <= addr < m.end]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_classify_each_kind(memtarget, kind):
    t = memtarget(kind, 2)
    ms = read_maps(t.pid)
    assert [m.start for m in ms] == sorted(m.start for m in ms)
    m = mapping_at(ms, t.addr)
    # Anonymous private memory may merge with a neighbour; the others are exact.
    assert m.start <= t.addr and m.end >= t.addr + t.length
    if kind not in ("anon", "anon-unpop"):
        assert (m.start, m.end) == (t.addr, t.addr + t.length)
    assert m.kind == KIND[kind]
    assert m.page_size == t.page_size == (2 << 20 if kind == "hugetlb" else 4096)
    assert m.perms == "rw-" + ("s" if kind in SHARED else "p")
    assert m.shared == (kind in SHARED) and m.writable
    assert m.sync_ok == (kind != "file")
    if kind in ("shm", "file"):
        assert m.path == t.path and m.inode == os.stat(t.path).st_ino
    elif kind.startswith("memfd"):
        assert m.path.startswith("/memfd:wp-test")
    elif kind == "shared-anon":
        assert m.path.startswith("/dev/zero")
    if kind == "hugetlb":
        assert "ht" in m.vmflags
    assert {"rd", "wr"} <= m.vmflags
    assert m.kind in m.describe() and "%#x" % m.start in m.describe()


def test_process_image_kinds(memtarget):
    t = memtarget("anon", 1)
    ms = read_maps(t.pid)
    by_path = {}
    for m in ms:
        by_path.setdefault(m.path, []).append(m)
    exe = os.path.realpath("/proc/%d/exe" % t.pid)
    assert {m.kind for m in by_path[exe]} == {maps.FILE}
    assert [m.kind for m in by_path["[stack]"]] == [maps.PRIVATE_ANON]
    assert [m.kind for m in by_path["[heap]"]] == [maps.PRIVATE_ANON]
    for special in ("[vdso]", "[vvar]", "[vsyscall]"):
        assert [m.kind for m in by_path[special]] == [maps.SPECIAL], special
        assert not by_path[special][0].sync_ok
    libc = [p for p in by_path if "/libc.so" in p or "/libc-" in p]
    assert libc and all(m.kind == maps.FILE for p in libc for m in by_path[p])


def test_two_adjacent_kinds(layout):
    t = layout(3)
    ms = read_maps(t.pid)
    a = mapping_at(ms, t.addr)
    b = mapping_at(ms, t.addr + 3 * t.page_size)
    assert (a.kind, b.kind) == (maps.PRIVATE_ANON, maps.MEMFD)
    assert a.end == b.start == t.addr + 3 * t.page_size
    assert b.end == t.addr + 6 * t.page_size
    hole = t.addr + 6 * t.page_size
    assert not [m for m in ms if m.start <= hole < m.end]


def test_kernel_thread_has_no_maps():
    with open("/proc/2/status") as f:
        assert "kthreadd" in f.readline()
    assert read_maps(2) == []


def test_no_such_process():
    pid = (1 << 22) + 1    # above the largest pid_max (4194304)
    with pytest.raises(ProcessLookupError):
        read_maps(pid)


@pytest.mark.parametrize("path,inode,dev,flags,kind", [
    ("/SYSV00000000 (deleted)", 5, (0, 1), set(), maps.SYSV_SHM),
    ("/memfd:x (deleted)", 5, (0, 1), set(), maps.MEMFD),
    ("/memfd:x (deleted)", 5, (0, 99), {"ht"}, maps.HUGETLB),
    ("/anon_hugepage (deleted)", 5, (0, 99), set(), maps.HUGETLB),
    ("", 0, (0, 0), set(), maps.PRIVATE_ANON),
    ("[anon:named]", 0, (0, 0), set(), maps.PRIVATE_ANON),
    ("[stack:1234]", 0, (0, 0), set(), maps.PRIVATE_ANON),
    ("[vvar_vclock]", 0, (0, 0), set(), maps.SPECIAL),
    ("/dev/mem", 7, (0, 5), {"io", "pf"}, maps.SPECIAL),
])
def test_classify_names(path, inode, dev, flags, kind):
    m = Mapping(0x1000, 0x2000, "rw-s", 0, dev, inode, path, vmflags=set(flags))
    assert classify(m, {(0, 1): "tmpfs", (0, 5): "devtmpfs"}) == kind
