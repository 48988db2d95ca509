"""dedupe against real targets: the bytes the target reads, PSS from
/proc/PID/smaps_rollup and pagemap bits, before, during and after merging.

tests/targets/dd_target.c lays out groups of four pages (two duplicates,
one zero page, one unique page), remembers what every page must hold and
checks it with its own reads ("c" -> "check NBAD FIRSTBAD").
"""
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from wp import pagemap, procfs
from wp.dedupe.store import STORE_NAME, Store
from wp.protectors.dedupe import DedupeProtector
from wp.session import Session
from wp.space import ProcessSpace

from fixtures_core import wait_until
from fixtures_dedupe import DD, PS, dd, pattern  # noqa: F401  (the dd fixture)

@pytest.fixture
def dedupe():
    """dedupe(target, **knobs) -> (session, protector), merged by two
    passes; sessions are closed at teardown."""
    sessions = []

    def start(t, passes=2, **knobs):
        knobs.setdefault("auto", False)
        prot = DedupeProtector(**knobs)
        s = Session(ProcessSpace.attached(t.pid), prot, regions=["anon"])
        s.start()
        sessions.append(s)
        for _ in range(passes):
            prot.scan_once()
        return s, prot

    yield start
    for s in sessions:
        s.close()


def is_file(e):
    return bool(e & pagemap.PRESENT and e & pagemap.FILE_SHARED)


# -- merging -------------------------------------------------------------------


def test_merge_frees_memory_keeps_bytes(dd, dedupe):
    t = dd(4096, 64)
    pss0 = t.pss_kb()
    _, prot = dedupe(t)
    st = prot.stats()
    # 2048 duplicates of 64 contents, 1024 zero pages.
    assert st["pages_merged"] >= 2048 and st["zero_pages"] == 1024
    assert st["pages_shared"] >= 64 and st["pages_sharing"] >= 2048 - 64
    saved = pss0 - t.pss_kb()
    assert saved >= 0.9 * (2048 - 64 + 1024) * 4, (pss0, t.pss_kb())
    assert t.check() == 0
    ents = t.entries()
    for i, e in enumerate(ents):
        if i % 4 in (0, 1):
            assert is_file(e), "duplicate page %d is not a store page: %#x" % (i, e)
        elif i % 4 == 2:
            assert not e & pagemap.FILE_SHARED
        else:
            assert e & pagemap.PRESENT and not e & pagemap.FILE_SHARED
    assert all(t.page(i) == pattern(i, 64) for i in range(0, 64))
    assert st["vmas_added"] > 0 and st["map_count_headroom"] > 0
    assert st["general_profit"] > 0


def test_write_to_merged_page_copies_it(dd, dedupe):
    t = dd(1024, 16)
    _, prot = dedupe(t)
    before = t.entries(0, 1)[0]
    assert is_file(before)
    assert t.cmd("w 0 7") == ["ok"]
    e = t.entries(0, 1)[0]
    assert e & pagemap.PRESENT and not e & pagemap.FILE_SHARED
    # Other pages that shared the same store page still read the original.
    assert t.check() == 0
    assert t.page(0) == bytes([7]) * PS
    prot.scan_once()
    assert prot.stats()["sharing_breaks"] >= 1


def test_dontneed_merged_page_reads_zeros(dd, dedupe):
    t = dd(1024, 16)
    _, prot = dedupe(t)
    assert is_file(t.entries(4, 1)[0])
    assert t.cmd("d 4 2") == ["ok"]
    assert t.read_sum(4) == 0 and t.read_sum(5) == 0
    assert t.page(4) == bytes(PS)
    assert t.check() == 0
    st = prot.stats()
    assert st["remove_events"] >= 1 and st["zero_fills"] >= 1
    # Written again after DONTNEED: an ordinary private page.
    assert t.cmd("w 4 3") == ["ok"] and t.check() == 0
    # A copied (written) merged page DONTNEED'd reads zeros too.
    assert t.cmd("w 8 9") == ["ok"] and t.cmd("d 8 1") == ["ok"]
    assert t.read_sum(8) == 0 and t.check() == 0


def test_madv_free_on_merged_page_fails(dd, dedupe):
    # The kernel refuses MADV_FREE on file mappings: documented, not hidden.
    t = dd(1024, 16)
    dedupe(t)
    assert t.cmd("F 0 1") == ["error", "22"]
    assert t.check() == 0


def test_fork_child_sees_same_bytes(dd, dedupe):
    t = dd(1024, 16)
    _, prot = dedupe(t)
    # The child checks every page, DONTNEEDs page 0 (merged) and checks it
    # reads zeros, and writes page 1.
    assert t.cmd("k") == ["child", "0"]
    assert t.check() == 0
    assert len(prot.children) >= 1


def test_munmap_and_mremap_of_merged_ranges(dd, dedupe):
    t = dd(1024, 16)
    _, prot = dedupe(t)
    n0 = prot.stats()["pages_merged"]
    # munmap a merged range, map anonymous memory again, refill.
    assert t.cmd("u 0 8") == ["ok"]
    assert t.check() == 0
    assert not any(is_file(e) for e in t.entries(0, 8))
    prot.scan_once()
    st = prot.stats()
    # Pages 0, 1, 4, 5 were merged; they were fresh anonymous pages, which
    # the pass adopted (the new VMA) and merged again.
    assert st["unmapped"] + st["sharing_breaks"] >= 4
    assert st["pages_merged"] == n0
    assert all(is_file(e) for i, e in enumerate(t.entries(0, 8)) if i % 4 < 2)
    assert t.check() == 0
    # mremap of one merged VMA (pages 16, 17: neighbouring store pages)
    # away and back keeps the bytes and the DONTNEED semantics.
    assert t.cmd("m 16 2") == ["ok"], "mremap of one merged VMA"
    assert t.check() == 0
    assert t.cmd("d 16 1") == ["ok"] and t.read_sum(16) == 0 and t.check() == 0
    # Across a merged and an anonymous VMA mremap fails: documented.
    assert t.cmd("m 20 4")[0] == "error"
    assert t.check() == 0


def test_proc_mem_reads_merged_bytes(dd, dedupe):
    t = dd(256, 4)
    dedupe(t)
    ents = t.entries()
    # The duplicates (pages 0 and 1 of each four) are store pages now: what
    # /proc/PID/mem reads of them comes through the merged mapping.
    assert all(is_file(ents[i]) for i in range(256) if i % 4 in (0, 1))
    for i in range(256):
        assert t.page(i) == pattern(i, 4), "page %d" % i


def test_kernel_core_dump_has_merged_pages(dd, dedupe, tmp_path):
    t = dd(256, 4)
    _, prot = dedupe(t)
    assert prot.stats()["pages_merged"] > 0
    with open("/proc/%d/coredump_filter" % t.pid) as f:
        assert int(f.read(), 16) & 0x4, "file-backed private pages must be dumped while merged"
    with open("/proc/sys/kernel/core_pattern") as f:
        saved = f.read()
    try:
        with open("/proc/sys/kernel/core_pattern", "w") as f:
            f.write(str(tmp_path / "core.%p"))
        resource.prlimit(t.pid, resource.RLIMIT_CORE, (-1, -1))
        os.kill(t.pid, signal.SIGSEGV)
        t.proc.wait(10)
        core = tmp_path / ("core.%d" % t.pid)
        for _ in range(100):
            if core.exists() and core.stat().st_size:
                break
            time.sleep(0.05)
        data = core.read_bytes()
    finally:
        with open("/proc/sys/kernel/core_pattern", "w") as f:
            f.write(saved)
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)

    def read(addr):
        for k in range(phnum):
            typ, _, off, va, _, fsz, msz, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + 56 * k)
            if typ == 1 and va <= addr < va + msz and addr - va + PS <= fsz:
                return data[off + addr - va:off + addr - va + PS]
        return None

    for i in (0, 1, 5, 8):
        assert read(t.addr + i * PS) == pattern(i, 4), "page %d missing from the core" % i


def test_volatile_pages_are_not_merged(dd, dedupe):
    t = dd(1024, 16)
    _, prot = dedupe(t, passes=1)
    assert t.cmd("w 0 1") == ["ok"]   # changes between the two passes
    assert t.cmd("w 8 1") == ["ok"]
    prot.scan_once()
    assert prot.stats()["pages_volatile"] >= 2
    assert not is_file(t.entries(0, 1)[0])
    assert is_file(t.entries(4, 1)[0])
    assert t.check() == 0


def test_map_count_reserve_limits_vmas(dd, dedupe):
    t = dd(2048, 512)
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    reserve = limit - t.vmas() - 40
    _, prot = dedupe(t, map_count_reserve=reserve, max_map_count="off")
    st = prot.stats()
    assert st["map_count_limited"] > 0
    assert t.vmas() <= limit - reserve + 2
    assert t.check() == 0
    with open("/proc/sys/vm/max_map_count") as f:
        assert int(f.read()) == limit


def test_max_map_count_auto_raises_and_restores(dd, dedupe):
    """max_map_count=auto (the default): when merging needs more VMAs than
    vm.max_map_count allows, wp raises it, and restores it when the last
    dedupe target detaches."""
    t = dd(2048, 512)
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    reserve = limit - t.vmas() - 40   # as if the target were at the limit
    s, prot = dedupe(t, map_count_reserve=reserve)
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            raised = int(f.read())
        st = prot.stats()
        assert raised > limit and st["map_count_limited"] == 0, (raised, st)
        assert t.vmas() > limit - reserve + 2
        assert t.check() == 0
    finally:
        s.close()
    with open("/proc/sys/vm/max_map_count") as f:
        assert int(f.read()) == limit


# -- across processes and side-channel modes -------------------------------------


def test_merges_across_processes(dd, dedupe):
    a, b = dd(1024, 16), dd(1024, 16)
    _, pa = dedupe(a)
    _, pb = dedupe(b)
    store = pa.store
    assert store is pb.store
    # b's duplicates map the pages a's merge put in the store.
    assert set(pb.idx_refs) <= set(pa.idx_refs) | set(store.key_of)
    assert len(set(pa.idx_refs) & set(pb.idx_refs)) >= 16
    assert a.check() == 0 and b.check() == 0


def test_share_process_keeps_tenants_apart(dd, dedupe):
    a, b = dd(1024, 16), dd(1024, 16)
    _, pa = dedupe(a, share="process")
    _, pb = dedupe(b, share="process")
    assert pa.stats()["pages_merged"] > 0 and pb.stats()["pages_merged"] > 0
    assert not set(pa.idx_refs) & set(pb.idx_refs)
    assert a.check() == 0 and b.check() == 0


def test_share_zero_merges_only_zero_pages(dd, dedupe):
    t = dd(1024, 16)
    _, prot = dedupe(t, share="zero")
    st = prot.stats()
    assert st["pages_merged"] == 0 and st["zero_pages"] == 256
    assert not any(is_file(e) for e in t.entries())
    assert t.check() == 0


# -- file-backed memory is measured, never merged ---------------------------------


def test_shared_memfd_is_measured_not_merged(target_bin, spawn, dedupe):
    p = spawn([target_bin("memtarget"), "memfd", "64"])
    w = p.stdout.readline().split()
    t = DD.__new__(DD)
    t.proc, t.pid = p, int(w[1])
    _, prot = dedupe(t)
    report = [v for k, v in prot.stats()["file_backed"].items() if "wp-test" in k]
    assert report and report[0]["would_save_bytes"] >= 60 * PS
    p.stdin.write("w 3 5\n")
    p.stdin.flush()
    p.stdout.readline()
    prot.scan_once()
    report = [v for k, v in prot.stats()["file_backed"].items() if "wp-test" in k]
    assert report[0]["would_break_pages"] >= 1
    with open("/proc/%d/maps" % t.pid) as f:
        assert STORE_NAME not in f.read()


# -- leaving no trace -------------------------------------------------------------


def test_detach_unmerges(dd, dedupe):
    t = dd(2048, 16)
    pss0 = t.pss_kb()
    with open("/proc/%d/coredump_filter" % t.pid) as f:
        filter0 = f.read()
    s, prot = dedupe(t)
    assert t.store_maps() > 0
    assert t.cmd("d 12 1") == ["ok"]   # a removed page, not read back yet
    s.close()
    assert t.store_maps() == 0
    ents = t.entries()
    assert not any(e & pagemap.FILE_SHARED for e in ents)
    assert t.check() == 0
    assert t.read_sum(12) == 0
    # Anonymous again: DONTNEED reads zeros without any daemon.
    assert t.cmd("d 0 4") == ["ok"] and t.read_sum(0) == 0 and t.check() == 0
    # Duplicates are private copies again (zero pages stay zero pages).
    assert t.pss_kb() >= pss0 - 512 * 4 - 4 * 4 - 256
    with open("/proc/%d/coredump_filter" % t.pid) as f:
        assert f.read() == filter0


KILLED_DAEMON = r"""
import sys, time
from wp.protectors.dedupe import DedupeProtector
from wp.session import Session
from wp.space import ProcessSpace
pid = int(sys.argv[1])
prot = DedupeProtector(auto=False)
s = Session(ProcessSpace.attached(pid), prot, regions=["anon"])
s.start()
prot.scan_once(); prot.scan_once()
print("merged", prot.stats()["pages_merged"], prot.guardian.pid, flush=True)
if sys.argv[2:] == ["fork"]:
    sys.stdin.readline()      # the target forked
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        prot.scan_once()      # learns the child's pid, tells the guardian
        kids = prot.stats()["children"]
        if kids and all(kids):
            break
        time.sleep(0.05)      # the fork event may still be on its way
    print("children", *kids, flush=True)
time.sleep(1000)
"""


class WpdLike:
    """KILLED_DAEMON on target t: .guardian once it merged; kill() kills
    it with -9 and waits for the guardian to have unmerged and exited."""

    def __init__(self, t, tmp_path, *args):
        script = tmp_path / "wpd_like.py"
        script.write_text(KILLED_DAEMON)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen([sys.executable, str(script), str(t.pid), *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root)
        w = self.proc.stdout.readline().split()
        assert w[0] == "merged" and int(w[1]) > 0, w
        self.guardian = int(w[2])

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc.stdout.close()
        self.proc.stdin.close()
        def ended():
            fields = procfs.stat_fields(self.guardian)
            return fields is None or procfs.is_zombie(fields)
        wait_until(ended, "guardian %d ending" % self.guardian, 30)


def test_wpd_killed_guardian_unmerges(dd, tmp_path):
    t = dd(2048, 16)
    d = WpdLike(t, tmp_path)
    try:
        assert t.store_maps() > 0
        assert t.cmd("d 4 1") == ["ok"]   # removed; wpd dies before it is read back
    finally:
        d.kill()
    assert t.store_maps() == 0
    assert not any(e & pagemap.FILE_SHARED for e in t.entries())
    assert t.check() == 0
    assert t.read_sum(4) == 0
    assert t.cmd("d 8 2") == ["ok"] and t.read_sum(8) == 0 and t.check() == 0


# -- a real program -----------------------------------------------------------------


PY_HOLDER = r"""
import hashlib, sys
data = b"".join(hashlib.sha256(b"%d" % (i % 500)).digest() * 128 for i in range(8192))
want = hashlib.sha256(data).hexdigest()
print("ready", flush=True)
for line in sys.stdin:
    if line.startswith("check"):
        print("ok" if hashlib.sha256(data).hexdigest() == want else "BAD", flush=True)
    else:
        break
"""


def test_python_processes_holding_same_data(spawn, dedupe):
    procs = [spawn([sys.executable, "-c", PY_HOLDER]) for _ in range(3)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"

    def pss(p):
        with open("/proc/%d/smaps_rollup" % p.pid) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))

    before = sum(pss(p) for p in procs)
    prots = []
    for p in procs:
        t = DD.__new__(DD)
        t.pid = p.pid
        prots.append(dedupe(t, passes=2)[1])
    for prot in prots:   # a third pass each: the cross-process matches
        prot.scan_once()
    after = sum(pss(p) for p in procs)
    # 32 MiB each, 500 distinct pages: most of it merges.
    assert before - after >= 60 * 1024, (before, after)
    for p in procs:
        p.stdin.write("check\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "ok"


@pytest.mark.skipif(not shutil.which("redis-server") or not shutil.which("redis-cli"),
                    reason="redis-server and redis-cli are not installed")
def test_redis_servers_holding_same_data(spawn, dedupe, tmp_path):
    """Two redis-servers with the same 100 MB dataset: merged across the two,
    redis's own DEBUG DIGEST unchanged, a BGSAVE (fork) + DEBUG RELOAD
    round trip reads back the same data, writes work, detach unmerges."""
    servers = []
    for i in range(2):
        sock = str(tmp_path / ("redis-%d.sock" % i))
        p = spawn(["redis-server", "--port", "0", "--unixsocket", sock, "--save", "",
                   "--appendonly", "no", "--dir", str(tmp_path), "--dbfilename", "dump-%d.rdb" % i,
                   "--enable-debug-command", "yes"], stdout=subprocess.DEVNULL, stdin=None)
        servers.append((p, sock))

    def cli(sock, *args):
        for _ in range(100):
            r = subprocess.run(["redis-cli", "-s", sock, *args], capture_output=True, text=True)
            if "Connection refused" not in r.stdout + r.stderr and "No such file" not in r.stderr:
                return r.stdout.strip()
            time.sleep(0.05)
        raise AssertionError("redis at %s does not answer" % sock)

    def pss(pid):
        with open("/proc/%d/smaps_rollup" % pid) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:"))

    for _, sock in servers:
        assert cli(sock, "DEBUG", "POPULATE", "50000", "key", "2000") == "OK"
    digest = [cli(sock, "DEBUG", "DIGEST") for _, sock in servers]
    assert digest[0] == digest[1]
    before = sum(pss(p.pid) for p, _ in servers)
    sessions = []
    for p, _ in servers:
        t = DD.__new__(DD)
        t.pid = p.pid
        sessions.append(dedupe(t))
    for _, prot in sessions:
        prot.scan_once()
    after = sum(pss(p.pid) for p, _ in servers)
    assert before - after >= 100 * 1024, (before, after)
    assert [cli(sock, "DEBUG", "DIGEST") for _, sock in servers] == digest
    sock0 = servers[0][1]
    assert cli(sock0, "BGSAVE") == "Background saving started"
    wait_until(lambda: "bgsave_in_progress:0" in cli(sock0, "INFO", "persistence"), "BGSAVE done", 10)
    assert "rdb_last_bgsave_status:ok" in cli(sock0, "INFO", "persistence")
    assert cli(sock0, "DEBUG", "RELOAD") == "OK"
    assert cli(sock0, "DEBUG", "DIGEST") == digest[0]
    sock1 = servers[1][1]
    assert cli(sock1, "SET", "key:5", "x") == "OK" and cli(sock1, "GET", "key:5") == "x"
    for s, _ in sessions:
        s.close()
    assert cli(sock0, "DEBUG", "DIGEST") == digest[0]
    assert cli(sock1, "GET", "key:5") == "x"


def test_wpd_killed_guardian_unmerges_a_forked_child(dd, tmp_path):
    """A child forked by a merged target maps store pages too: when wpd is
    killed, the guardian unmerges it as well, and its DONTNEED reads zeros
    with no daemon left."""
    t = dd(1024, 16)
    d = WpdLike(t, tmp_path, "fork")
    try:
        w = t.cmd("K")
        assert w[0] == "child"
        child = int(w[1])
        d.proc.stdin.write("forked\n")
        d.proc.stdin.flush()
        assert d.proc.stdout.readline().split() == ["children", str(child)]
        with open("/proc/%d/maps" % child) as f:
            assert STORE_NAME in f.read()
    finally:
        d.kill()
    with open("/proc/%d/maps" % child) as f:
        assert STORE_NAME not in f.read()
    assert t.store_maps() == 0
    # The child checks every page and that DONTNEED reads zeros: anonymous.
    assert t.cmd("J %d" % child) == ["child", "0"]
    assert t.check() == 0


def test_detach_unmerges_a_forked_child(dd, dedupe):
    t = dd(1024, 16)
    s, prot = dedupe(t)
    w = t.cmd("K")
    assert w[0] == "child"
    child = int(w[1])
    prot.scan_once()   # learns the child's pid
    s.close()
    with open("/proc/%d/maps" % child) as f:
        assert STORE_NAME not in f.read()
    # The child checks every page and that DONTNEED reads zeros: anonymous.
    assert t.cmd("J %d" % child) == ["child", "0"]
    assert t.check() == 0


def test_non_root_target_gets_the_store_over_a_socket(readable_wp, spawn, dedupe):
    """A target that may not open /proc/<wpd>/fd/N receives the store fd
    over a unix socket (SCM_RIGHTS) instead."""
    binary = readable_wp.binary("dd_target")
    p = spawn([binary, "1024", "16"], user=65534, group=65534)
    t = DD(p, 1024, 16)
    # The uffds are created in the target: without root that takes
    # vm.unprivileged_userfaultfd=1 (wp's attach limit, not dedupe's).
    knob = "/proc/sys/vm/unprivileged_userfaultfd"
    with open(knob) as f:
        saved = f.read()
    try:
        with open(knob, "w") as f:
            f.write("1")
        _, prot = dedupe(t)
    finally:
        with open(knob, "w") as f:
            f.write(saved)
    st = prot.stats()
    assert st["pages_merged"] >= 512 and st["merge_errors"] == 0
    assert is_file(t.entries(0, 1)[0])
    assert t.check() == 0
    assert t.cmd("d 0 1") == ["ok"] and t.read_sum(0) == 0 and t.check() == 0


def test_scanner_thread_merges_and_stops(dd):
    """The protector as wpd runs it: its own scanner thread, knobs from
    the client (cpu_budget, sleep_millisecs), stats while it runs; passes
    back off while the target is idle, and come back when it changes."""
    t = dd(2048, 16)
    prot = DedupeProtector(interval=0.05, max_interval=0.4, cpu_budget=0.5, sleep_millisecs=1,
                           pages_to_scan=512)
    s = Session(ProcessSpace.attached(t.pid), prot, regions=["anon"])
    s.start()
    try:
        wait_until(lambda: prot.stats()["pages_merged"] >= 1024, lambda: "1024 pages merged: %s" % prot.stats(),
                   20)
        st = prot.stats()
        assert st["pages_merged"] >= 1024 and st["error"] is None
        assert st["knobs"]["cpu_budget"] == 0.5
        assert t.check() == 0
        # Idle: the wait between passes doubles up to max_interval.
        wait_until(lambda: prot.stats()["pass_interval_s"] >= 0.4, "passes backing off to 0.4 s", 20)
        assert prot.stats()["pass_interval_s"] == 0.4
        # Two pages written alike: the next pass sees them change (back to
        # interval), a later one merges them.
        assert t.cmd("w 0 1") == ["ok"] and t.cmd("w 1 1") == ["ok"] and t.check() == 0
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(is_file(e) for e in t.entries(0, 2)):
            seen.append(prot.stats()["pass_interval_s"])
            time.sleep(0.01)
        assert all(is_file(e) for e in t.entries(0, 2)) and t.check() == 0
        assert min(seen) == 0.05, sorted(set(seen))
    finally:
        s.close()
    assert t.store_maps() == 0 and t.check() == 0


def test_store_pages_freed_when_nothing_maps_them(dd, dedupe):
    t = dd(1024, 16)
    store = Store.shared()
    before = set(store.key_of)   # pages earlier tests' processes may still map
    s, prot = dedupe(t)
    mine = set(prot.idx_refs) - before
    assert mine and all(i in store.key_of for i in mine)
    freed0 = store.stats()["store_pages_freed"]
    s.close()
    # Only this target mapped them (its children too, none here): all go back.
    assert store.stats()["store_pages_freed"] - freed0 >= len(mine)
    assert not mine & set(store.key_of)
    assert t.check() == 0


def test_max_page_sharing_spreads_mappings(dd, dedupe):
    t = dd(1024, 4)    # 512 duplicates of 4 contents
    _, prot = dedupe(t, max_page_sharing=32)
    st = prot.stats()
    assert st["pages_merged"] >= 480
    assert st["pages_shared"] >= 512 // 32
    assert max(prot.idx_refs.values()) <= 32
    assert t.check() == 0
