"""snapshot against real targets: one instant per image, cores gdb can read.

The sweeping target (targets/gen_sweep.c) writes generation numbers word by
word, in address order, as fast as it can: at any instant its region reads
g+1 up to the writer's position and g after it. So an image holds one
instant exactly when its words are [g+1]*m + [g]*(N-m) for some m; only the
page holding word m (the page under the writer) is torn.
"""
import array
import os
import shutil
import struct
import subprocess
import threading

import pytest

from wp import maps
from wp.errors import BadRange, UnsupportedMemory, WPError
from wp.commands.snapshot import snapshot
from wp.protectors.snapshot import SnapshotProtector
from wp.session import Session
from wp.space import ProcessSpace

from conftest import Sweep
from fixtures_core import memtarget, wait_until  # noqa: F401 (memtarget is a fixture)

NCPU = os.cpu_count()


class Held(SnapshotProtector):
    """A snapshot whose copier waits for .go before it copies memory of
    the kind held names: "sync" (_copy_sync) or "plain" (_copy_plain,
    async-only memory)."""

    def __init__(self, *args, held="sync", **kw):
        super().__init__(*args, **kw)
        self.go = threading.Event()
        self.held = held

    def _copy_sync(self, p):
        if self.held == "sync":
            self.go.wait(10)
        super()._copy_sync(p)

    def _copy_plain(self, p):
        if self.held == "plain":
            self.go.wait(10)
        super()._copy_plain(p)


@pytest.fixture
def sweep(target_bin, spawn):
    def start(kind="anon", npages=2048, *extra):
        return Sweep(spawn([target_bin("gen_sweep"), kind, str(npages), *extra]))
    return start


def one_instant(data, page_size=4096):
    """Asserts data is [g+1]*m + [g]*(N-m); returns (g_high, m, torn_pages)."""
    a = array.array("Q", data)
    hi, lo = a[0], a[-1]
    assert hi in (lo, lo + 1), "first word gen %d, last %d: not one sweep" % (hi, lo)
    if hi == lo:
        assert a.count(hi) == len(a), "gens vary inside one generation"
        return hi, len(a), 0
    m = a.index(lo)
    assert a.count(hi) == m and a.count(lo) == len(a) - m, "more than one boundary"
    torn = 0 if m % (page_size // 8) == 0 else 1
    return hi, m, torn


def read_core_range(path, start, length):
    """Returns bytes [start, start+length) from an ELF core's PT_LOADs."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and struct.unpack_from("<H", data, 16)[0] == 4  # ET_CORE
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    for i in range(phnum):
        ptype, _, off, vaddr, _, filesz, memsz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + 56 * i)
        if ptype == 1 and vaddr <= start and start + length <= vaddr + filesz:
            return data[off + start - vaddr:off + start - vaddr + length]
    raise AssertionError("%#x+%#x not dumped in %s" % (start, length, path))


@pytest.mark.parametrize("kind", ["anon", "memfd"])
def test_every_snapshot_holds_one_instant(sweep, tmp_path, kind):
    t = sweep(kind, 2048)
    assert t.cmd("s 0") == ["ok"]
    wait_until(lambda: t.swept() > 0, "the target sweeping")
    gens = []
    for i in range(4):
        out = tmp_path / ("snap%d" % i)
        st = snapshot(t.space(), str(out), regions=[t.range()], raw=True, cpu=NCPU - 1)
        assert st["stop_ms"] is not None and st["copied_bytes"] == t.length
        assert out.stat().st_size == t.length
        g, m, torn = one_instant(out.read_bytes())
        assert torn <= 1
        gens.append(g)
        # Protection is gone: the target runs at full speed again.
        assert t.wp_pages() == 0
    # Later snapshots saw later generations; the target still sweeps.
    assert gens == sorted(gens)
    before = t.swept()
    wait_until(lambda: t.swept() > before, "the target sweeping on")
    assert t.cmd("p")[0] == "ok"


def test_core_of_sweeping_target_holds_one_instant(sweep, tmp_path):
    t = sweep("anon", 4096)
    assert t.cmd("s 0") == ["ok"]
    wait_until(lambda: t.swept() > 0, "the target sweeping")
    core = tmp_path / "core"
    st = snapshot(t.space(), str(core), cpu=NCPU - 1)
    assert st["threads"] == 2 and st["threads_with_registers"] == 2
    g, m, torn = one_instant(read_core_range(str(core), t.addr, t.length))
    assert torn <= 1
    # The sweeper's own counters, in the same image, agree with its pages:
    # gen is the last finished sweep, pos the page it was writing.
    gen, pos, _pages, running = struct.unpack("<4Q", read_core_range(str(core), t.stats_addr, 32))
    assert running == 1
    if m == t.length // 8:
        assert g in (gen, gen + 1)
    elif m % 512:
        assert g == gen + 1 and pos == m // 512      # stopped inside page pos
    else:
        assert g == gen + 1 and pos in (m // 512 - 1, m // 512)   # between two pages
    t.cmd("p")


def test_snapshot_without_freeze_has_no_stop(sweep, tmp_path):
    t = sweep("anon", 1024)
    out = tmp_path / "raw"
    t.cmd("w 0 1024 7")
    st = snapshot(t.space(), str(out), regions=[t.range()], raw=True, freeze=False)
    assert st["stop_ms"] is None and st["threads_with_registers"] == 0
    assert out.read_bytes() == struct.pack("<Q", 7) * (t.length // 8)


def test_writes_during_copy_see_old_bytes(sweep, tmp_path):
    """Pages written before the copier reaches them are copied first."""
    t = sweep("anon", 4096)
    t.cmd("w 0 4096 1")
    out = tmp_path / "raw"
    prot = Held(str(out), raw=True)
    s = Session(t.space(), prot, regions=[t.range()], follow_fork=False, cpu=NCPU - 1)
    s.start()
    try:
        assert t.cmd("w 2048 2048 2") == ["done"]
        prot.go.set()
        prot.wait(20)
    finally:
        s.close()
    assert out.read_bytes() == struct.pack("<Q", 1) * (t.length // 8)
    assert prot.stats()["copied_on_write_pages"] == 2048
    assert t.cmd("w 0 1 3") == ["done"]   # unprotected, unregistered


def test_target_exit_fails_the_snapshot(sweep, tmp_path):
    t = sweep("anon", 256)
    prot = Held(str(tmp_path / "raw"), raw=True)
    s = Session(t.space(), prot, regions=[t.range()], follow_fork=False)
    s.start()
    try:
        t.proc.kill()
        t.proc.wait()
        prot.go.set()
        with pytest.raises(WPError, match="exited during the snapshot"):
            prot.wait(20)
    finally:
        s.close()


def test_shared_file_copied_while_stopped(sweep, tmp_path):
    """Async-only memory (MAP_SHARED on ext4) is copied during the stop."""
    t = sweep("file", 512, str(tmp_path / "shared"))
    kinds = {m.kind for m in maps.read_maps(t.pid) if m.start < t.addr + t.length and m.end > t.addr}
    assert kinds == {maps.FILE}, "tmp_path must be on a disk filesystem, not tmpfs"
    assert t.cmd("s 0") == ["ok"]
    wait_until(lambda: t.swept() > 0, "the target sweeping")
    out = tmp_path / "raw"
    st = snapshot(t.space(), str(out), regions=[t.range()], raw=True, cpu=NCPU - 1)
    assert st["stop_ms"] is not None and not st["warnings"]
    _, _, torn = one_instant(out.read_bytes())
    assert torn <= 1
    with pytest.raises(UnsupportedMemory, match="only async WP"):
        snapshot(t.space(), str(out), regions=[t.range()], raw=True, strict=True)
    t.cmd("p")


def test_async_memory_copied_late_is_flagged(sweep, tmp_path):
    """Past freeze_copy_limit async-only memory is copied after the instant:
    the snapshot says so and counts the pages written meanwhile."""
    t = sweep("file", 512, str(tmp_path / "shared"))
    prot = Held(str(tmp_path / "raw"), raw=True, freeze=False, freeze_copy_limit=0, held="plain")
    s = Session(t.space(), prot, regions=[t.range()], follow_fork=False)
    s.start()
    try:
        assert t.cmd("w 100 10 4") == ["done"]    # after the instant, before the copy
        prot.go.set()
        st = prot.wait(20)
    finally:
        s.close()
    assert st["stop_ms"] is None
    assert st["warnings"] and "inconsistent_pages" in st["warnings"][0]
    assert st["inconsistent_pages"] == 10


@pytest.mark.parametrize("rewrite", [False, True])
def test_pages_dropped_during_the_copy(memtarget, tmp_path, rewrite):
    """MADV_DONTNEED of pages the copier has not reached. The REMOVE event
    comes before the zap but lets the target go as soon as it is read, so
    the snapshot copies the pages from the event where it wins that race;
    each page it lost is zeros in the image and named in stats()["discarded"]
    and a warning. Never the later bytes: not the zeros the target now
    reads unflagged, not what it wrote after the drop (a MISSING write fault,
    handled after the event)."""
    t = memtarget("anon", 16)
    pid, addr, length, uffds, cmd = t.pid, t.addr, t.length, t.uffds, t.cmd
    ps = 4096
    for i in range(16):
        assert cmd("w %d %d" % (i, 16 + i))[0] == "done"
    out = tmp_path / "raw"
    prot = Held(str(out), raw=True, chunk=ps)
    s = Session(ProcessSpace.cooperative(pid, uffds), prot,
                regions=["%x-%x" % (addr, addr + length)], follow_fork=False)
    s.start()
    try:
        for i in (3, 4, 9):
            assert cmd("d %d" % i) == ["ok"]
        if rewrite:
            for i in (3, 9):
                assert cmd("w %d 119" % i)[0] == "done"
        assert cmd("r 4") == ["page", "4", "0", "0"]     # zeros for the target, as ever
        prot.go.set()
        st = prot.wait(20)
    finally:
        s.close()
    data = out.read_bytes()
    named = set()
    for run in st["discarded"]:
        lo, hi = (int(x, 16) for x in run.split("-"))
        named.update(range((lo - addr) // ps, (hi - addr) // ps))
    assert named <= {3, 4, 9} and st["discarded_pages"] == len(named)
    for i in range(16):
        page = data[i * ps:(i + 1) * ps]
        if i in named:
            assert page == bytes(ps), i
        else:
            assert page == bytes([16 + i]) * ps, i        # the instant's bytes
    if named:
        assert any("%#x" % (addr + min(named) * ps) in w for w in st["warnings"])
    for i in (3, 9):
        assert cmd("r %d" % i)[2:] == (["119", str(119 * ps)] if rewrite else ["0", "0"])
    assert cmd("w 4 5")[0] == "done" and cmd("r 4")[2:] == ["5", str(5 * ps)]


def test_never_populated_pages_are_skipped(memtarget, tmp_path):
    """Anonymous pages never touched are zeros in the image without being
    read or written (the file stays sparse); one first written after the
    instant is still zeros there."""
    t = memtarget("anon-unpop", 256)
    pid, addr, length, uffds, cmd = t.pid, t.addr, t.length, t.uffds, t.cmd
    assert cmd("w 5 1")[0] == "done" and cmd("w 40 2")[0] == "done"
    out = tmp_path / "raw"
    prot = Held(str(out), raw=True, chunk=4096)
    s = Session(ProcessSpace.cooperative(pid, uffds), prot,
                regions=["%x-%x" % (addr, addr + length)], follow_fork=False)
    s.start()
    try:
        assert cmd("w 100 3")[0] == "done"      # first write after the instant
        prot.go.set()
        st = prot.wait(20)
    finally:
        s.close()
    data = out.read_bytes()
    expect = bytearray(length)
    expect[5 * 4096:6 * 4096] = b"\x01" * 4096
    expect[40 * 4096:41 * 4096] = b"\x02" * 4096
    assert data == bytes(expect)
    assert st["zero_pages_skipped"] == 253 and st["copied_on_write_pages"] == 1
    assert out.stat().st_blocks * 512 <= 16 * 4096     # sparse
    assert cmd("r 100")[2:4] == ["3", str(3 * 4096)]


def test_raw_needs_one_range(sweep, tmp_path):
    t = sweep("anon", 16)
    with pytest.raises(BadRange, match="one range"):
        snapshot(t.space(), str(tmp_path / "x"), regions=["all"], raw=True)
    # Refused before anything was protected or stopped.
    assert t.wp_pages() == 0 and t.cmd("w 0 1 5") == ["done"]


@pytest.mark.skipif(not shutil.which("gdb"), reason="gdb is not installed")
def test_gdb_reads_the_core(target_bin, spawn, tmp_path):
    exe = target_bin("sn_globals")
    p = spawn([exe])
    _, pid, u1, u2 = p.stdout.readline().split()
    p.stdin.write("b 0x0b55000000000042\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"
    core = tmp_path / "core"
    st = snapshot(ProcessSpace.cooperative(int(pid), [int(u1), int(u2)]), str(core))
    assert st["threads_with_registers"] == 2 and st["stop_ms"] < 1000
    out = subprocess.run(
        ["gdb", "-nx", "-batch", "-ex", "print/x sn_data", "-ex", "print/x sn_bss",
         "-ex", "print/x *sn_heap", "-ex", "print/x sn_anon[0]", "-ex", "info threads",
         "-ex", "thread apply all bt", exe, str(core)],
        capture_output=True, text=True, timeout=60).stdout
    assert "$1 = 0x5eed0123456789ab" in out
    assert "$2 = 0xb55000000000042" in out
    assert "$3 = 0x4ea9000000000002" in out
    assert "$4 = 0xa404000000000003" in out
    assert "LWP %s" % pid in out and out.count("LWP") >= 2
    assert "sn_sleeper" in out and "in main ()" in out
    # The target went on: its read() was restarted, not broken.
    p.stdin.write("b 1\n")
    p.stdin.flush()
    assert p.stdout.readline().strip() == "ok"


def test_cli_entry_point(sweep, tmp_path, capsys):
    import argparse
    import json
    from wp.commands import snapshot as snap_mod
    parser = argparse.ArgumentParser(prog="wp")
    snap_mod.add_parser(parser.add_subparsers(dest="cmd"))
    t = sweep("anon", 64)
    t.cmd("w 0 64 9")
    out = tmp_path / "r.bin"
    args = parser.parse_args(["snapshot", str(t.pid), "--raw", "--region", t.range(), "-o", str(out),
                              "--json", "--uffd", str(t.uffds[0]), "--uffd", str(t.uffds[1])])
    assert args.func(args) == 0
    cap = capsys.readouterr()
    st = json.loads(cap.out)
    assert st["format"] == "raw" and st["copied_bytes"] == t.length and st["stop_ms"] is not None
    assert out.read_bytes() == struct.pack("<Q", 9) * (t.length // 8)
    # --raw without a single range is a usage error, before touching the target.
    from wp.cli import run_command
    args = parser.parse_args(["snapshot", str(t.pid), "--raw", "-o", str(out)])
    assert run_command(args.func, args) == 2


@pytest.mark.skipif(not shutil.which("gcore"), reason="gdb's gcore is not installed")
def test_bench_snapshot_small(tmp_path):
    from wp.bench.snapshot import run
    res = run(size=32 << 20, out_dir=str(tmp_path), baseline_s=0.2)
    w, g = res["wp_snapshot"], res["gcore"]
    assert res["baseline"]["bytes_per_s"] > 0
    assert w["copied_bytes"] >= 32 << 20 and w["stop_ms"] > 0 and w["bytes_per_s"] > 0
    assert g["exit"] == 0 and g["file_bytes"] >= 32 << 20
    assert not list(tmp_path.iterdir())    # cores removed
