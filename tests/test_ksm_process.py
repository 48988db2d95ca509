"""wp ksm against the real kernel: enable/disable by injection, status, the
knob record, the estimate checked against what KSM then merges, refusals.

Every test that touches KSM's knobs takes the ksm_state fixture: it holds
/tmp/wp-ksm.lock (tests of concurrent suites that change KSM knobs wait for
each other), points wp's knob record at a file of its own, and puts every
knob back at teardown.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from wp import ksm, ksm_advisor
from wp.cli import main as wp_main
from wp.remote import RemoteProcess

from fixtures_core import wait_until
from fixtures_daemon import ROOT, WP, wpd  # noqa: F401  (the wpd fixture)

pytestmark = pytest.mark.skipif(not ksm.available(), reason="kernel without KSM (CONFIG_KSM)")

PAGE = 4096


def _held_knobs():
    """KSM's knobs as they rest: read holding the knob lock (every holder
    puts back what it changed before it lets go)."""
    with ksm.knob_lock():
        return ksm.knobs()


@pytest.fixture(autouse=True)
def knobs_unchanged():
    """Every test here leaves KSM's knobs as it found them."""
    before = _held_knobs()
    yield
    assert _held_knobs() == before


@pytest.fixture
def ksm_state(tmp_path, monkeypatch):
    """KSM's knobs as found, put back at teardown (run last); fast scanning
    meanwhile, and ksmd stopped (run=0, merged pages kept): the tests start
    it through wp and check what wp says it changed, which must not depend
    on whether something else left ksmd running. Holds wp.ksm.knob_lock
    throughout (suites running side by side wait for each other)."""
    with ksm.knob_lock():
        saved = ksm.knobs()
        record = tmp_path / "ksm-knobs.json"
        monkeypatch.setenv("WP_KSM_RECORD", str(record))
        try:
            ksm.write("pages_to_scan", 4000)
            ksm.write("sleep_millisecs", 0)
            ksm.write("run", 0)
            yield record
        finally:
            left = ksm.put_back(saved)
        assert left == {}, "KSM knobs not put back: %s (were %s)" % (left, saved)


class DD:
    """A dd_target: page i % 4 is 0/1 a duplicate (ndistinct contents), 2 a
    page of zeros, 3 unique; the target checks its pages itself ("c")."""

    def __init__(self, proc, npages, ndistinct):
        self.proc = proc
        w = proc.stdout.readline().split()
        assert w[0] == "ready", w
        self.pid, self.addr, self.length = int(w[1]), int(w[2], 16), int(w[3], 16)
        self.npages, self.ndistinct = npages, ndistinct

    def cmd(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().split()

    def check(self):
        assert self.cmd("c")[:2] == ["check", "0"]


@pytest.fixture
def dd(target_bin, spawn):
    def start(npages=2048, ndistinct=16):
        return DD(spawn([target_bin("dd_target"), str(npages), str(ndistinct)]), npages, ndistinct)
    return start


def wp(capsys, *args):
    """Runs `wp ARGS` in this process; returns (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = wp_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def merged(pid):
    st = ksm.process_stat(pid)
    return st["ksm_merging_pages"] + st.get("ksm_zero_pages", 0)


KPF_KSM = 1 << 21


def ksm_pages(pid, addr, npages):
    """How many of the npages pages at addr are KSM pages (/proc/kpageflags)."""
    from wp import pagemap
    with pagemap.Pagemap(pid) as pm:
        pfns = [e & pagemap.PFN_MASK for e in pm.entries(addr, npages) if e & pagemap.PRESENT]
    n = 0
    with open("/proc/kpageflags", "rb") as f:
        for pfn in pfns:
            f.seek(pfn * 8)
            n += bool(int.from_bytes(f.read(8), "little") & KPF_KSM)
    return n


def smaps_flags(pid, start, end):
    from wp.maps import read_maps
    return [m.vmflags for m in read_maps(pid) if m.start < end and m.end > start]


def test_enable_merges_disable_unmerges(ksm_state, dd, capsys):
    t = dd()
    assert not ksm.process_stat(t.pid)["ksm_merge_any"]
    run0 = ksm.read("run")
    code, out, err = wp(capsys, "ksm", "enable", t.pid, "--start", "--no-daemon")
    assert code == 0, err
    assert "enabled" in out and "run %s -> 1" % run0 in err
    st = ksm.process_stat(t.pid)
    assert st["ksm_merge_any"] and st["ksm_mergeable"]
    assert ksm.read("run") == 1
    # 1024 duplicate pages of 16 contents and 512 zero pages merge.
    want = t.npages // 2 + t.npages // 4 - 8
    wait_until(lambda: merged(t.pid) >= want, lambda: "%d pages merged: %s" % (want, ksm.process_stat(t.pid)),
               30)
    if not ksm.read("use_zero_pages"):
        assert ksm_pages(t.pid, t.addr, t.npages) >= want
    t.check()
    code, out, err = wp(capsys, "ksm", "disable", t.pid, "--no-daemon")
    assert code == 0, err
    # The kernel unmerged inside the injected prctl: no KSM page is left;
    # ksm_merging_pages follows at ksmd's next pass.
    assert ksm_pages(t.pid, t.addr, t.npages) == 0
    st = ksm.process_stat(t.pid)
    assert not st["ksm_merge_any"] and not st["ksm_mergeable"]
    wait_until(lambda: ksm.process_stat(t.pid)["ksm_merging_pages"] == 0, "no page merging", 10)
    t.check()
    assert t.cmd("w 0 7") == ["ok"] and t.cmd("r 0")[0] == "page"
    t.check()
    code, out, err = wp(capsys, "ksm", "stop", "--no-daemon")
    assert code == 0 and "run=%s" % run0 in out
    assert ksm.read("run") == run0
    assert not ksm_state.exists()


def test_enable_ranges_madvise(ksm_state, dd, capsys):
    t = dd(npages=1024)
    half = t.addr + t.length // 2
    rng = "%x-%x" % (t.addr, half)
    code, out, err = wp(capsys, "ksm", "enable", t.pid, "--range", rng, "--json", "--no-daemon")
    assert code == 0, err
    res = json.loads(out)
    assert res["how"] == "madvise" and res["ranges"] == [[hex(t.addr), hex(half)]]
    st = ksm.process_stat(t.pid)
    assert st["ksm_mergeable"] and not st["ksm_merge_any"]
    flags = smaps_flags(t.pid, t.addr, t.addr + t.length)
    assert len(flags) == 2 and "mg" in flags[0] and "mg" not in flags[1]
    ksm.start("test")
    # Only the first half merges: its 256 duplicates and 128 zero pages.
    wait_until(lambda: merged(t.pid) >= 256 + 128 - 8, lambda: "the first half merged: %d" % merged(t.pid), 30)
    assert merged(t.pid) <= 256 + 128 + 64
    code, out, err = wp(capsys, "ksm", "disable", t.pid, "--range", rng, "--no-daemon")
    assert code == 0, err
    assert ksm_pages(t.pid, t.addr, t.npages) == 0
    wait_until(lambda: ksm.process_stat(t.pid)["ksm_merging_pages"] == 0, "no page merging", 10)
    assert not any("mg" in f for f in smaps_flags(t.pid, t.addr, t.addr + t.length))
    t.check()
    ksm.restore_knobs()


@pytest.mark.parametrize("rng, words", [("1000-0", "empty range"), ("1001-3000", "not page aligned"),
                                        ("1000-2000", "not mapped"), ("xyz", "bad range")])
def test_bad_ranges_refused(ksm_state, dd, capsys, rng, words):
    t = dd(npages=64)
    code, out, err = wp(capsys, "ksm", "enable", t.pid, "--range", rng, "--no-daemon")
    assert code == 4 and words in err
    assert not ksm.process_stat(t.pid)["ksm_mergeable"]
    assert not ksm_state.exists()   # no knob changed


def test_status_shows_who_changed_what(ksm_state, dd, capsys):
    t = dd(npages=64)
    code, out, err = wp(capsys, "ksm", "start", "-o", "pages_to_scan=1234", "--no-daemon")
    assert code == 0, err
    code, out, err = wp(capsys, "ksm", "enable", t.pid, "--no-daemon")
    assert code == 0
    code, out, err = wp(capsys, "ksm", "status", t.pid, "--json")
    assert code == 0, err
    st = json.loads(out)
    assert st["knobs"]["pages_to_scan"] == 1234 and st["knobs"]["run"] == 1
    ch = st["changed"]
    assert ch["pages_to_scan"]["original"] == 4000 and ch["pages_to_scan"]["value"] == 1234
    assert "wp ksm start" in ch["run"]["by"] and ch["run"]["now"] == 1
    assert [p["pid"] for p in st["processes"]] == [t.pid] and st["processes"][0]["ksm_merge_any"]
    assert "pages_sharing" in st["counters"] and "general_profit" in st["counters"]
    code, out, err = wp(capsys, "ksm", "status")
    assert code == 0 and "changed by wp: pages_to_scan 4000 -> 1234" in out and str(t.pid) in out
    code, out, err = wp(capsys, "ksm", "stop", "--no-daemon")
    assert code == 0
    assert ksm.read("pages_to_scan") == 4000 and json.loads(wp(capsys, "ksm", "status", "--json")[1])["changed"] == {}
    wp(capsys, "ksm", "disable", t.pid, "--no-daemon")


def test_estimate_counts_what_the_target_holds(dd, capsys):
    t = dd(npages=4096, ndistinct=16)
    code, out, err = wp(capsys, "ksm", "estimate", t.pid, "--json", "--quiet")
    assert code == 0, err
    est = json.loads(out)
    p = est["processes"][0]
    # The region: 2048 duplicates of 16 contents, 1024 zero pages, 1024
    # unique pages; the rest of the process (stack, libc data) is small.
    assert 1024 <= p["zero_pages"] <= 1024 + 64
    assert 2048 <= p["duplicate_pages"] <= 2048 + 64
    assert 16 + 1024 <= p["distinct_contents"] <= 16 + 1024 + 128
    assert p["pages"] >= 4096 and p["volatile_pages"] is None
    use_zero = est["knobs"]["use_zero_pages"]
    k = (2048 - 16) + (1024 if use_zero else 1024 - 4)   # max_page_sharing 256: 4 KSM pages of zeros
    assert k <= p["kernel_ksm_would_save_bytes"] // PAGE <= k + 64
    # wp dedupe: every zero page; the duplicates come in runs of two whose
    # store pages are side by side the first time (one run), single pages
    # afterwards: far under the VMA budget here, so all of them.
    assert 2048 - 16 + 1024 <= p["wp_dedupe_would_save_bytes"] // PAGE <= 2048 + 1024 + 64
    assert est["set"]["kernel_ksm_would_save_bytes"] == p["kernel_ksm_would_save_bytes"]
    assert est["cpu_s"] > 0 and est["scanned_bytes"] >= 4096 * PAGE
    # Nothing was changed in the target.
    t.check()
    assert not ksm.process_stat(t.pid)["ksm_mergeable"]


def test_estimate_across_processes(dd, capsys):
    a, b = dd(npages=1024, ndistinct=8), dd(npages=1024, ndistinct=8)
    est = ksm_advisor.estimate([a.pid, b.pid])
    pa, pb, s = est["processes"][0], est["processes"][1], est["set"]
    # The same contents in both: merged together they save about one
    # process's worth more than each alone.
    alone = pa["kernel_ksm_would_save_bytes"] + pb["kernel_ksm_would_save_bytes"]
    assert s["kernel_ksm_would_save_bytes"] >= alone + 8 * PAGE * 0.9
    assert s["duplicate_pages"] >= pa["duplicate_pages"] + pb["duplicate_pages"]
    assert s["pids"] == [a.pid, b.pid]


def test_estimate_vma_budget_bounds_dedupe(dd):
    t = dd(npages=4096, ndistinct=16)
    r = ksm_advisor.read_process(t.pid)
    full = ksm_advisor.analyse([r], max_map_count=65530)["set"]
    # A budget of 1024 reserved + 200 VMAs: 100 runs merge (with the
    # sysctl as it is; dedupe's max_map_count=auto would raise it).
    tight = ksm_advisor.analyse([r], max_map_count=r.map_count + 1024 + 200)["set"]
    assert tight["kernel_ksm_would_save_bytes"] == full["kernel_ksm_would_save_bytes"]
    dup_full = full["wp_dedupe_would_save_bytes_at_max_map_count"] // PAGE - full["zero_pages"]
    dup_tight = tight["wp_dedupe_would_save_bytes_at_max_map_count"] // PAGE - tight["zero_pages"]
    assert dup_full >= 2000 and 0 < dup_tight <= 200
    if ksm_advisor._dedupe_defaults()["max_map_count"] == "auto":
        assert tight["wp_dedupe_would_save_bytes"] == full["wp_dedupe_would_save_bytes"]


def test_estimate_volatility(dd):
    t = dd(npages=1024, ndistinct=16)
    first = ksm_advisor.read_process(t.pid)
    for i in range(0, 40, 4):       # ten pages change (to ten copies of one content)
        assert t.cmd("w %d 7" % i) == ["ok"]
    second = ksm_advisor.read_process(t.pid)
    vol = ksm_advisor._volatile(first, second)
    est = ksm_advisor.analyse([second], volatile=[vol])
    # Exactly those in the region; a few more elsewhere (its stack, stdio).
    in_region = (second.addrs >= t.addr) & (second.addrs < t.addr + t.length)
    assert sorted(int(a) for a in second.addrs[vol & in_region]) == [t.addr + i * PAGE for i in range(0, 40, 4)]
    assert 10 <= est["processes"][0]["volatile_pages"] <= 10 + 32
    still = ksm_advisor.analyse([second], volatile=[vol & False])
    assert (still["set"]["kernel_ksm_would_save_bytes"] - est["set"]["kernel_ksm_would_save_bytes"]) // PAGE >= 9


def test_estimate_of_a_target_writing_all_the_time(target_bin, spawn, capsys):
    """A target that keeps writing gives a figure (and its volatility), not an error."""
    p = spawn([target_bin("gen_sweep"), "anon", "8192"])
    pid = int(p.stdout.readline().split()[1])
    p.stdin.write("s\n")
    p.stdin.flush()
    assert p.stdout.readline().startswith("ok")
    code, out, err = wp(capsys, "ksm", "estimate", pid, "--interval", "0.2", "--json", "--quiet")
    assert code == 0, err
    est = json.loads(out)
    assert est["processes"][0]["pages"] >= 8192 and est["processes"][0]["volatile_pages"] > 0


def test_estimate_matches_what_ksm_saves(ksm_state, dd, capsys):
    t = dd(npages=8192, ndistinct=64)
    est = ksm_advisor.estimate([t.pid])
    p = est["processes"][0]
    before = ksm.stats()
    assert wp(capsys, "ksm", "enable", t.pid, "--start", "--no-daemon")[0] == 0
    want = p["set_ksm_merging_pages"] + p["set_ksm_zero_pages"]
    wait_until(lambda: merged(t.pid) >= want * 0.98, lambda: "%d of %d merged" % (merged(t.pid), want), 60)
    # One more full scan of ksmd: nothing more should merge.
    scans = ksm.read("full_scans")
    wait_until(lambda: ksm.read("full_scans") > scans, "another full scan of ksmd", 30)
    st = ksm.process_stat(t.pid)
    assert abs(st["ksm_merging_pages"] + st.get("ksm_zero_pages", 0) - want) <= 0.02 * want
    after = ksm.stats()
    saved = (after["pages_sharing"] - before["pages_sharing"]) + (after["ksm_zero_pages"] - before["ksm_zero_pages"])
    assert abs(saved * PAGE - p["kernel_ksm_would_save_bytes"]) <= 0.1 * p["kernel_ksm_would_save_bytes"]
    t.check()
    assert wp(capsys, "ksm", "disable", t.pid, "--no-daemon")[0] == 0
    assert ksm_pages(t.pid, t.addr, t.npages) == 0
    ksm.restore_knobs()


@pytest.mark.parametrize("cmd", ["enable", "disable", "estimate", "status"])
def test_kernel_thread_refused(capsys, cmd):
    code, out, err = wp(capsys, "ksm", cmd, 2, *(["--no-daemon"] if cmd in ("enable", "disable") else []))
    assert code == 4 and "kernel thread" in err


@pytest.mark.parametrize("cmd", ["enable", "disable"])
def test_init_refused(capsys, cmd):
    code, out, err = wp(capsys, "ksm", cmd, 1, "--no-daemon")
    assert code == 4 and "init" in err


def test_missing_pid_refused(capsys):
    for cmd in ("enable", "estimate", "status"):
        code, out, err = wp(capsys, "ksm", cmd, 4 << 20, *(["--no-daemon"] if cmd == "enable" else []))
        assert code == 4 and "no such process" in err, (cmd, err)


@pytest.mark.parametrize("cmd", ["enable", "disable"])
def test_traced_process_refused(dd, capsys, cmd):
    t = dd(npages=64)
    with RemoteProcess(t.pid):
        code, out, err = wp(capsys, "ksm", cmd, t.pid, "--no-daemon")
        assert code == 4 and "already traced by pid %d" % os.getpid() in err
    assert not ksm.process_stat(t.pid)["ksm_mergeable"]
    t.check()


def test_non_root_refused(readable_wp):
    base = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    target = subprocess.Popen(base + ["sleep", "60"])
    try:
        for args in (["enable", target.pid, "--no-daemon"], ["disable", target.pid, "--no-daemon"],
                     ["estimate", target.pid], ["start", "--no-daemon"], ["stop"]):
            r = subprocess.run(base + [readable_wp.python, "-m", "wp.cli", "ksm"] + [str(a) for a in args],
                               capture_output=True, text=True, env=readable_wp.env, cwd="/", timeout=60)
            assert r.returncode == 4 and "needs root" in r.stderr, (args, r.stderr)
        assert ksm.process_stat(target.pid)["ksm_mergeable"] is False
    finally:
        target.kill()
        target.wait()


def test_through_wpd_and_its_shutdown_restores(ksm_state, wpd, dd):  # noqa: F811
    t = dd(npages=256)
    run0 = ksm.read("run")
    r = subprocess.run(WP + ["--socket", wpd.sock, "ksm", "enable", str(t.pid), "--start"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "through wpd %d" % wpd.pid in r.stdout and "by wpd %d" % wpd.pid in r.stderr
    assert ksm.process_stat(t.pid)["ksm_merge_any"] and ksm.read("run") == 1
    ch = ksm.changed_knobs()
    assert ch["run"]["owner"] == "wpd:%d" % wpd.pid
    r = subprocess.run(WP + ["--socket", wpd.sock, "ksm", "enable", "1"], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 4 and "init" in r.stderr
    wpd.send_signal(signal.SIGTERM)
    assert wpd.wait(20) == 0
    assert ksm.read("run") == run0 and ksm.changed_knobs() == {}
    # The process stays opted in (its own state, not a knob) until disabled.
    assert ksm.process_stat(t.pid)["ksm_merge_any"]
    ksm.disable(t.pid)
    t.check()


def test_unknown_knob_refused_through_wpd(ksm_state, wpd):  # noqa: F811
    before = ksm.knobs()
    r = subprocess.run(WP + ["--socket", wpd.sock, "ksm", "start", "-o", "pages_to_shred=1"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 4 and "pages_to_shred" in r.stderr
    from wp import protocol
    c = protocol.Connection.connect(wpd.sock, 10)
    try:
        reply = c.request({"op": "ksm", "action": "start", "options": {"pages_to_shred": 1}})
        assert not reply["ok"] and reply["type"] == "BadRequest" and "pages_to_shred" in reply["error"]
        reply = c.request({"op": "ksm", "action": "explode"})
        assert not reply["ok"] and reply["type"] == "BadRequest"
    finally:
        c.close()
    assert ksm.knobs() == before and not ksm_state.exists()


def test_memory_mapped_after_enable_merges_too(ksm_state, dd, capsys):
    """prctl(PR_SET_MEMORY_MERGE) injected late covers VMAs mapped after
    it (the memory a process allocates once enabled), and children it forks."""
    t = dd(npages=1024)
    assert wp(capsys, "ksm", "enable", t.pid, "--no-daemon")[0] == 0
    # The whole region is unmapped and mapped again: a new VMA, born after enable.
    assert t.cmd("u 0 %d" % t.npages) == ["ok"]
    assert any("mg" in f for f in smaps_flags(t.pid, t.addr, t.addr + t.length))
    child = int(t.cmd("K")[1])
    try:
        assert ksm.process_stat(child)["ksm_merge_any"]
    finally:
        assert t.cmd("J %d" % child) == ["child", "0"]
    ksm.start("test")
    want = t.npages // 2 + t.npages // 4 - 8
    wait_until(lambda: merged(t.pid) >= want, lambda: "%d pages merged: %s" % (want, ksm.process_stat(t.pid)),
               30)
    t.check()
    assert wp(capsys, "ksm", "disable", t.pid, "--no-daemon")[0] == 0
    assert ksm_pages(t.pid, t.addr, t.npages) == 0
    t.check()
    ksm.restore_knobs()


def test_knob_lock_excludes_other_processes_and_nests():
    probe = ("import fcntl, os, sys\n"
             "fd = os.open(sys.argv[1], os.O_RDWR)\n"
             "try:\n"
             "    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except BlockingIOError:\n"
             "    sys.exit(1)\n")
    with ksm.knob_lock():
        with ksm.knob_lock():
            assert subprocess.run([sys.executable, "-c", probe, ksm.KNOB_LOCK]).returncode == 1
        assert subprocess.run([sys.executable, "-c", probe, ksm.KNOB_LOCK]).returncode == 1
    assert subprocess.run([sys.executable, "-c", probe, ksm.KNOB_LOCK], timeout=30).returncode == 0


BENCH_SMALL = ["--keys", "48", "--value-kib", "64", "--distinct", "4", "--pythons", "1"]


@pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-benchmark")),
                    reason="redis-server and redis-benchmark (scripts/setup installs them)")
@pytest.mark.parametrize("sig", [None, signal.SIGINT, signal.SIGTERM])
def test_bench_ksm_puts_every_knob_back(sig, tmp_path):
    """wp bench ksm, run to the end or stopped midway by Ctrl-C or SIGTERM,
    leaves every KSM knob as it found it and no redis behind."""
    before = _held_knobs()
    p = subprocess.Popen(WP + ["bench", "ksm", "--json"] + BENCH_SMALL, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    kids = set()
    try:
        if sig is not None:
            # Midway: Ctrl-C once its reference redis runs and ksmd's knobs
            # are changed; SIGTERM once ksmd merges too (run=1).
            from wp import procfs
            started = (lambda: ksm.read("run") == 1) if sig == signal.SIGTERM else (lambda: True)
            wait_until(lambda: kids.update(procfs.children(p.pid)) or
                       (kids and ksm.read("pages_to_scan") != before["pages_to_scan"] and started()),
                       lambda: "the bench's redis and knobs: %s" % kids, 60)
            p.send_signal(sig)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if sig is None:
        res = json.loads(out)
        # All of the user's path works at this size; the CPU per GiB of a
        # 15 MiB estimate is python's start-up, not the reading (not checked).
        failed = [k for k, v in res["checks"].items() if v != "ok" and "per GiB" not in k]
        assert failed == [] and p.returncode in (0, 1), (failed, err)
        assert res["checks"]["every KSM knob put back"] == "ok"
        assert res["knobs_after"] == res["knobs_before"] == before
    else:
        assert p.returncode == 130, err
        assert "interrupted" in err
    assert _held_knobs() == before
    from wp import procfs
    alive = lambda k: (lambda f: f is not None and not procfs.is_zombie(f))(procfs.stat_fields(k))  # noqa: E731
    assert [(k, procfs.comm(k)) for k in kids if alive(k)] == []


def test_zombie_refused(capsys):
    z = subprocess.Popen(["true"])
    try:
        from wp import procfs
        wait_until(lambda: procfs.is_zombie(procfs.stat_fields(z.pid)), "pid %d a zombie" % z.pid, 10)
        for cmd in ("enable", "disable", "estimate", "status"):
            code, out, err = wp(capsys, "ksm", cmd, z.pid, *(["--no-daemon"] if cmd in ("enable", "disable") else []))
            assert code == 4 and "zombie" in err, (cmd, err)
    finally:
        z.wait()


def test_estimate_reads_a_traced_process(dd, capsys):
    """The estimate stops and injects nothing: a process a debugger holds is
    read, not refused, and stays as it was."""
    t = dd(npages=256)
    with RemoteProcess(t.pid):
        code, out, err = wp(capsys, "ksm", "estimate", t.pid, "--json", "--quiet")
    assert code == 0, err
    assert json.loads(out)["processes"][0]["duplicate_pages"] >= 128
    t.check()


def test_enable_says_how_long_ksmd_will_take(ksm_state, dd, capsys):
    """At the kernel's default pace (100 pages every 20 ms) enable says how
    long a pass over the process takes; scanning without sleep it says nothing."""
    t = dd(npages=2048)
    ksm.write("pages_to_scan", 100)
    ksm.write("sleep_millisecs", 20)
    code, out, err = wp(capsys, "ksm", "enable", t.pid, "--start", "--no-daemon")
    assert code == 0, err
    assert "ksmd scans 100 pages every 20 ms (~5,000 pages/s)" in err and "second pass" in err
    ksm.write("sleep_millisecs", 0)
    code, out, err = wp(capsys, "ksm", "enable", t.pid, "--no-daemon")
    assert code == 0 and "pages/s" not in err
    assert wp(capsys, "ksm", "disable", t.pid, "--no-daemon")[0] == 0
    ksm.restore_knobs()


def test_estimate_progress_on_stderr(dd, capsys, monkeypatch):
    """Progress goes to stderr as pages are read (every 256 MiB; 1 MiB
    here), for both reads with --interval; --quiet has none."""
    t = dd(npages=1024)
    monkeypatch.setattr(ksm_advisor, "PROGRESS_BYTES", 1 << 20)
    code, out, err = wp(capsys, "ksm", "estimate", t.pid, "--interval", "0.05")
    assert code == 0, err
    for what in ("read", "second read"):
        mib = [int(line.split()[5]) for line in err.splitlines()
               if line.startswith("wp ksm estimate: pid %d: " % t.pid) and line.endswith(" MiB " + what)]
        assert mib and mib[-1] >= 4 and mib == sorted(set(mib)), (what, err)
    assert "KSM_SAVES" in out and "wp ksm estimate" not in out
    code, out, err = wp(capsys, "ksm", "estimate", t.pid, "--quiet")
    assert code == 0 and err == ""


def test_own_process_and_wpd_itself_refused(wpd, capsys):  # noqa: F811
    """One-shot wp cannot inject into itself; wpd refuses itself and names the one-shot way."""
    code, out, err = wp(capsys, "ksm", "enable", os.getpid(), "--no-daemon")
    assert code == 4 and "is this process" in err
    r = subprocess.run(WP + ["--socket", wpd.sock, "ksm", "enable", str(wpd.pid)], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert r.returncode == 4 and "is wpd itself" in r.stderr and "--no-daemon" in r.stderr, r.stderr
    assert not ksm.process_stat(wpd.pid)["ksm_merge_any"]
    assert not ksm.process_stat(os.getpid())["ksm_merge_any"]
