"""wp bench dedupe: the dedupe protector against kernel KSM, in one run.

Workload (tests/targets/dd_target.c): SIZE MiB of anonymous memory in
groups of four pages — two duplicates (DISTINCT contents in all, the two of
a group with consecutive content ids), one zero page, one unique page — so
50% duplicates, 25% zero, 25% unique, interleaved page by page.

Kernel KSM: the same target with MADV_MERGEABLE; KSM set to
sleep_millisecs=0, pages_to_scan=4000, use_zero_pages=1, run=1 (every knob
restored and KSM's merges undone afterwards). wp dedupe: the same knobs,
attached by syscall injection like wpd does, passes until one merges
nothing more.

For each: PSS saved (/proc/PID/smaps_rollup), CPU seconds (ksmd's; for wp
the daemon's threads plus the system time the injected syscalls cost the
target), wall time to converge, the cost of a first write to a merged page
(measured by the target, one byte per page), VMAs added, and for wp the
time to unmerge at detach. vm.max_map_count is raised for the run when the
workload needs more VMAs than it allows, and restored.

    python -m wp.bench.dedupe [--size MiB] [--distinct N] [--json] [--only ksm|wp]
"""
import argparse
import json
import os
import subprocess
import sys
import time

from wp import ksm, maps, procfs
from wp.bench import machine

__all__ = ["add_parser", "run", "main"]

PAGE = 4096


def _target_bin():
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    src = os.path.join(root, "tests", "targets", "dd_target.c")
    out = os.path.join(root, "tests", "targets", "bin", "dd_target")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run(["gcc", "-O2", "-g", "-Wall", "-pthread", "-o", out, src], check=True)
    return out


class _Target:
    def __init__(self, npages, distinct, mergeable=False):
        argv = [_target_bin(), str(npages), str(distinct)] + (["ksm"] if mergeable else [])
        self.p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        w = self.p.stdout.readline().split()
        if not w or w[0] != "ready":
            raise RuntimeError("dd_target did not start: %r" % (w,))
        self.pid = int(w[1])

    def cmd(self, line):
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().split()

    def pss_kb(self):
        return procfs.pss_kb(self.pid)

    def vmas(self):
        return maps.count_vmas(self.pid)

    def first_write_ns(self, n=2000):
        # Duplicate pages are those with index % 4 in (0, 1): every 4th page.
        w = self.cmd("W 0 %d 4" % n)
        return int(w[1]), int(w[2])

    def check(self):
        w = self.cmd("c")
        return int(w[1])

    def close(self):
        try:
            self.cmd("q")
            self.p.wait(10)
        except (OSError, ValueError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()


def _expected_saved(npages, distinct):
    return npages // 2 - min(distinct, npages // 2) + npages // 4


def run_ksm(size_mib=1024, distinct=1000, timeout=300):
    """The kernel KSM half. Returns a dict."""
    npages = size_mib * 256
    t = _Target(npages, distinct, mergeable=True)
    try:
        pss0 = t.pss_kb()
        vmas0 = t.vmas()
        with ksm.KsmSettings(sleep_millisecs=0, pages_to_scan=4000, use_zero_pages=1,
                             max_page_sharing=256, run=1):
            cpu0 = ksm.ksmd_cpu_seconds()
            scans0 = ksm.read("full_scans")
            t0 = time.monotonic()
            expect = _expected_saved(npages, distinct)
            converged = True
            try:
                ksm.wait_converged(expect_saved_pages=int(expect * 0.999), timeout=timeout, poll=0.01)
            except TimeoutError:
                converged = False
            wall = time.monotonic() - t0
            cpu = ksm.ksmd_cpu_seconds() - cpu0
            s = ksm.stats()
            pss1 = t.pss_kb()
            bad = t.check()
            lat_avg, lat_max = t.first_write_ns()
            vmas1 = t.vmas()
            out = {
                "pss_before_kib": pss0, "pss_after_kib": pss1,
                "pss_saved_mib": round((pss0 - pss1) / 1024, 1),
                "cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "converged": converged,
                "full_scans": s.get("full_scans", 0) - scans0,
                "pages_shared": s.get("pages_shared"), "pages_sharing": s.get("pages_sharing"),
                "zero_pages": s.get("ksm_zero_pages"), "general_profit": s.get("general_profit"),
                "first_write_ns_avg": lat_avg, "first_write_ns_max": lat_max,
                "vmas_added": vmas1 - vmas0, "target_check_bad_pages": bad,
            }
        return out
    finally:
        t.close()


def _cpu_self():
    t = os.times()
    return t.user + t.system


class _MapCount:
    """Raises vm.max_map_count to at least need for a while; restores it."""

    PATH = "/proc/sys/vm/max_map_count"

    def __init__(self, need):
        self.need = need
        self.saved = None

    def __enter__(self):
        with open(self.PATH) as f:
            self.saved = int(f.read())
        if self.need > self.saved:
            with open(self.PATH, "w") as f:
                f.write(str(self.need))
        return self

    def __exit__(self, *exc):
        with open(self.PATH, "w") as f:
            f.write(str(self.saved))


def run_wp(size_mib=1024, distinct=1000, pages_to_scan=4000, max_passes=8, **knobs):
    """The wp dedupe half. Returns a dict."""
    from wp.protectors.dedupe import DedupeProtector
    from wp.session import Session
    from wp.space import ProcessSpace

    npages = size_mib * 256
    t = _Target(npages, distinct)
    try:
        pss0 = t.pss_kb()
        vmas0 = t.vmas()
        with _MapCount(npages + 65536) as mc:
            prot = DedupeProtector(pages_to_scan=pages_to_scan, sleep_millisecs=0,
                                   use_zero_pages=True, max_page_sharing=256, auto=False,
                                   measure_files=False, **knobs)
            cpu0 = _cpu_self()
            tsys0 = procfs.cpu_seconds(t.pid)
            t0 = time.monotonic()
            session = Session(ProcessSpace.attached(t.pid), prot,
                              regions=["anon"])
            session.start()
            passes = []
            expect = _expected_saved(npages, distinct)
            wall = None
            try:
                for _ in range(max_passes):
                    tp = time.monotonic()
                    merged = prot.scan_once()
                    passes.append({"merged": merged, "s": round(time.monotonic() - tp, 3)})
                    st = prot.stats()
                    if wall is None and st["pages_sharing"] + st["zero_pages"] >= expect * 0.999:
                        wall = time.monotonic() - t0
                        cpu = _cpu_self() - cpu0
                        tsys = procfs.cpu_seconds(t.pid) - tsys0
                        break
                    if len(passes) > 2 and merged == 0:
                        break
                if wall is None:
                    wall = time.monotonic() - t0
                    cpu = _cpu_self() - cpu0
                    tsys = procfs.cpu_seconds(t.pid) - tsys0
                pss1 = t.pss_kb()
                vmas1 = t.vmas()
                bad = t.check()
                st = prot.stats()
                lat_avg, lat_max = t.first_write_ns()
                bad_after_write = t.check()
            finally:
                tc = time.monotonic()
                session.close()
                unmerge_s = time.monotonic() - tc
            pss2 = t.pss_kb()
            bad_after_detach = t.check()
        return {
            "pss_before_kib": pss0, "pss_after_kib": pss1,
            "pss_saved_mib": round((pss0 - pss1) / 1024, 1),
            "cpu_s": round(cpu + tsys, 3), "cpu_daemon_s": round(cpu, 3),
            "cpu_target_sys_s": round(tsys, 3), "wall_s": round(wall, 3),
            "passes": passes, "pages_shared": st["pages_shared"],
            "pages_sharing": st["pages_sharing"], "zero_pages": st["zero_pages"],
            "general_profit": st["general_profit"], "compare_failed": st["compare_failed"],
            "first_write_ns_avg": lat_avg, "first_write_ns_max": lat_max,
            "vmas_added": vmas1 - vmas0, "max_map_count_used": max(mc.need, mc.saved),
            "remote_ms": round(st["remote_ms"], 1), "unmerge_s": round(unmerge_s, 3),
            "pss_after_detach_kib": pss2,
            "target_check_bad_pages": bad, "bad_pages_after_writes": bad_after_write,
            "bad_pages_after_detach": bad_after_detach,
        }
    finally:
        t.close()


def _proc_cpu(pid):
    """utime + stime of process pid, all threads (seconds)."""
    return procfs.cpu_seconds(pid)


def _wpd_stats(conn, pid):
    r = conn.request({"op": "stats", "pid": pid})
    if not r.get("ok"):
        raise RuntimeError("wp stats %d: %s" % (pid, r.get("error")))
    return r["stats"]["protector_stats"]


def run_wpd(size_mib=1024, distinct=1000, timeout=300, idle_s=30.0, target=None):
    """The user's path: a wpd of its own, `wp attach PID --protector dedupe`
    with default options, the machine's sysctls as found (wp's own
    max_map_count=auto may raise vm.max_map_count; reported). Converged
    once a pass merges nothing more (stats merge_stopped). CPU is wpd's
    (every thread) plus the system time of the target's injected syscalls;
    then wpd's CPU on the converged target over idle_s. Returns a dict."""
    import shutil
    import tempfile

    from wp.protocol import Connection

    npages = size_mib * 256
    mmc_found = _read_int("/proc/sys/vm/max_map_count")
    tmp = tempfile.mkdtemp(prefix="wp-bench-dedupe-")
    sock = os.path.join(tmp, "wpd.sock")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    log = open(os.path.join(tmp, "wpd.log"), "w+")
    wpd = subprocess.Popen([sys.executable, "-m", "wp.daemon", "--socket", sock], stderr=log,
                           cwd=root)
    t = None
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            time.sleep(0.02)
        t = target if target is not None else _Target(npages, distinct)
        pss0 = t.pss_kb()
        vmas0 = t.vmas()
        conn = Connection.connect(sock)
        cpu0 = _proc_cpu(wpd.pid)
        tsys0 = procfs.cpu_seconds(t.pid)
        t0 = time.monotonic()
        r = conn.request({"op": "attach", "pid": t.pid, "protector": "dedupe"})
        if not r.get("ok"):
            raise RuntimeError("wp attach: %s" % r.get("error"))
        st = {}
        converged = False
        samples = []   # (wall, wpd cpu, target sys, pages saved): KSM's criterion below
        while time.monotonic() - t0 < timeout:
            time.sleep(0.05)
            st = _wpd_stats(conn, t.pid)
            samples.append((time.monotonic() - t0, _proc_cpu(wpd.pid) - cpu0, procfs.cpu_seconds(t.pid) - tsys0,
                            st.get("pages_sharing", 0) + st.get("zero_pages", 0)))
            if st.get("merge_stopped") and st.get("full_scans", 0) >= 3:
                converged = True
                break
        # Converged when the saving reached its final value (99.9%), as the
        # KSM half counts it; the pass that finds nothing more is not.
        final = samples[-1][3] if samples else 0
        wall, cpu, tsys, _ = next(x for x in samples if x[3] >= 0.999 * final) if samples else (0, 0, 0, 0)
        wall_stopped = time.monotonic() - t0
        pss1 = t.pss_kb()
        vmas1 = t.vmas()
        mmc_during = _read_int("/proc/sys/vm/max_map_count")
        # Converged: what does wpd cost while nothing changes? Once the
        # pass interval has backed off to its longest (max_interval).
        t1 = time.monotonic()
        while time.monotonic() - t1 < 120:
            s2 = _wpd_stats(conn, t.pid)
            if s2.get("pass_interval_s", 0) >= s2.get("knobs", {}).get("max_interval", 0):
                break
            time.sleep(0.5)
        c0, i0 = _proc_cpu(wpd.pid), time.monotonic()
        time.sleep(idle_s)
        idle_cpu = (_proc_cpu(wpd.pid) - c0) / (time.monotonic() - i0)
        st = _wpd_stats(conn, t.pid)
        bad = t.check()
        lat_avg, lat_max = t.first_write_ns() if hasattr(t, "first_write_ns") else (None, None)
        tc = time.monotonic()
        r = conn.request({"op": "detach", "pid": t.pid})
        unmerge_s = time.monotonic() - tc
        conn.close()
        bad_after_detach = t.check()
        return {
            "path": "wpd + wp attach PID --protector dedupe (default options)",
            "pss_before_kib": pss0, "pss_after_kib": pss1,
            "pss_saved_mib": round((pss0 - pss1) / 1024, 1),
            "cpu_s": round(cpu + tsys, 3), "cpu_daemon_s": round(cpu, 3),
            "cpu_target_sys_s": round(tsys, 3), "wall_s": round(wall, 3), "converged": converged,
            "wall_to_merge_stopped_s": round(wall_stopped, 3), "merge_stopped": st.get("merge_stopped"), "full_scans": st.get("full_scans"),
            "pages_shared": st.get("pages_shared"), "pages_sharing": st.get("pages_sharing"),
            "zero_pages": st.get("zero_pages"), "general_profit": st.get("general_profit"),
            "stopped_ms": round(st.get("stopped_ms", 0), 1),
            "dropped_meanwhile": st.get("dropped_meanwhile"),
            "wpd_cpu_converged": round(idle_cpu, 4), "pass_interval_s": st.get("pass_interval_s"),
            "first_write_ns_avg": lat_avg, "first_write_ns_max": lat_max,
            "vmas_added": vmas1 - vmas0,
            "max_map_count_found": mmc_found, "max_map_count_during": mmc_during,
            "max_map_count_after": _read_int("/proc/sys/vm/max_map_count"),
            "detach_ok": bool(r.get("ok")), "unmerge_s": round(unmerge_s, 3),
            "target_check_bad_pages": bad, "bad_pages_after_detach": bad_after_detach,
        }
    finally:
        if t is not None:
            t.close()
        if wpd.poll() is None:
            wpd.terminate()
            try:
                wpd.wait(60)
            except subprocess.TimeoutExpired:
                wpd.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


class _Redis:
    """A redis-server holding `values` values of `size` bytes drawn from
    `contents` distinct contents (the issue's real program)."""

    def __init__(self, values=20000, size=16384, contents=50):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.p = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                   "--save", "", "--appendonly", "no"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.p.pid
        self.values, self.size, self.contents = values, size, contents
        for _ in range(200):
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                break
            except OSError:
                time.sleep(0.02)
        blobs = [bytes([65 + c % 26]) * 16 + (b"%08d" % c) * ((size - 16) // 8) for c in range(contents)]
        self.blobs = blobs
        cmds = []
        for i in range(values):
            v = blobs[i % contents]
            cmds.append(b"*3\r\n$3\r\nSET\r\n$%d\r\nk%d\r\n$%d\r\n%s\r\n"
                        % (len(b"k%d" % i), i, len(v), v))
        self.sock.sendall(b"".join(cmds))
        got = b""
        while got.count(b"+OK\r\n") < values:
            got += self.sock.recv(1 << 20)

    def _get(self, i):
        self.sock.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\nk%d\r\n" % (len(b"k%d" % i), i))
        buf = b""
        while not buf.endswith(b"\r\n") or len(buf) < self.size + 8:
            buf += self.sock.recv(1 << 20)
        return buf.split(b"\r\n", 1)[1][:-2]

    def check(self):
        return sum(1 for i in range(0, self.values, 97) if self._get(i) != self.blobs[i % self.contents])

    def pss_kb(self):
        return procfs.pss_kb(self.pid)

    def vmas(self):
        return maps.count_vmas(self.pid)

    def close(self):
        self.sock.close()
        self.p.kill()
        self.p.wait()


def run_redis(values=20000, size=16384, contents=50, timeout=300):
    """redis-server holding duplicate values: kernel KSM (enabled from
    outside, wp.ksm.enable: prctl(PR_SET_MEMORY_MERGE) injected) against
    wp dedupe through wpd, each on a fresh redis-server. Returns a dict."""
    out = {"workload": {"values": values, "value_bytes": size, "contents": contents}}
    r = _Redis(values, size, contents)
    try:
        pss0 = r.pss_kb()
        with ksm.KsmSettings(sleep_millisecs=0, pages_to_scan=4000, use_zero_pages=1,
                             max_page_sharing=256, run=1):
            cpu0 = ksm.ksmd_cpu_seconds()
            t0 = time.monotonic()
            ksm.enable(r.pid)
            try:
                ksm.wait_converged(timeout=timeout, poll=0.01, stable_scans=2)
                converged = True
            except TimeoutError:
                converged = False
            wall = time.monotonic() - t0
            cpu = ksm.ksmd_cpu_seconds() - cpu0
            pss1 = r.pss_kb()
            bad = r.check()
            ksm.disable(r.pid)
        out["ksm"] = {"pss_before_kib": pss0, "pss_after_kib": pss1,
                      "pss_saved_mib": round((pss0 - pss1) / 1024, 1), "cpu_s": round(cpu, 3),
                      "wall_s": round(wall, 3), "converged": converged, "bad_values": bad}
    finally:
        r.close()
    r = _Redis(values, size, contents)
    try:
        out["wp"] = run_wpd(target=r, timeout=timeout, idle_s=10.0)
    finally:
        r.close()
    k, w = out["ksm"], out["wp"]
    out["ratios"] = {
        "savings_vs_ksm": round(w["pss_saved_mib"] / k["pss_saved_mib"], 3) if k["pss_saved_mib"] else None,
        "cpu_vs_ksm": round(w["cpu_s"] / k["cpu_s"], 3) if k["cpu_s"] else None,
        "wall_vs_ksm": round(w["wall_s"] / k["wall_s"], 3) if k["wall_s"] else None}
    return out


def _read_int(path):
    with open(path) as f:
        return int(f.read())


def run(size_mib=1024, distinct=1000, only=None, inprocess=False):
    """Runs kernel KSM and wp dedupe through the user's path (or only "ksm"
    / "wp"); with inprocess, also the in-process passes as a second,
    labelled row. Returns the JSON dict: {"workload", "ksm", "wp",
    "wp_inprocess", "ratios", "goals_met", "machine"}."""
    out = {"workload": {"size_mib": size_mib, "distinct": distinct, "page_size": PAGE,
                        "layout": "groups of 4 pages: dup, dup, zero, unique",
                        "expected_saved_mib": round(_expected_saved(size_mib * 256, distinct)
                                                    * PAGE / 2**20, 1),
                        "cpus": os.cpu_count(),
                        "max_map_count_found": _read_int("/proc/sys/vm/max_map_count")}}
    if only == "redis":
        out = run_redis()
        out["machine"] = machine()
        return out
    if only in (None, "ksm"):
        out["ksm"] = run_ksm(size_mib, distinct)
    if only in (None, "wp"):
        out["wp"] = run_wpd(size_mib, distinct)
        if inprocess:
            out["wp_inprocess"] = dict(run_wp(size_mib, distinct),
                                       path="in-process passes back to back, vm.max_map_count raised "
                                            "for the run (not the user's path)")
    if "ksm" in out and "wp" in out:
        k, w = out["ksm"], out["wp"]
        out["ratios"] = {
            "savings_vs_ksm": round(w["pss_saved_mib"] / k["pss_saved_mib"], 3) if k["pss_saved_mib"] else None,
            "cpu_vs_ksm": round(w["cpu_s"] / k["cpu_s"], 3) if k["cpu_s"] else None,
            "wall_vs_ksm": round(w["wall_s"] / k["wall_s"], 3) if k["wall_s"] else None,
            "first_write_vs_ksm": round(w["first_write_ns_avg"] / k["first_write_ns_avg"], 3)
            if k["first_write_ns_avg"] else None,
        }
        out["goals_met"] = {
            "savings_ge_95pct": out["ratios"]["savings_vs_ksm"] is not None
            and out["ratios"]["savings_vs_ksm"] >= 0.95,
            "cpu_le_2x": out["ratios"]["cpu_vs_ksm"] is not None and out["ratios"]["cpu_vs_ksm"] <= 2,
            "wall_le_2x": out["ratios"]["wall_vs_ksm"] is not None and out["ratios"]["wall_vs_ksm"] <= 2,
            "wpd_converged_cpu_le_2pct": out["wp"]["wpd_cpu_converged"] <= 0.02,
        }
    out["machine"] = machine()
    return out


DEMO_HOLDER = r"""
import hashlib, sys
data = b"".join(hashlib.sha256(b"%d" % (i % 500)).digest() * 128 for i in range(16384))
want = hashlib.sha256(data).hexdigest()
print("ready", flush=True)
for line in sys.stdin:
    print("ok" if hashlib.sha256(data).hexdigest() == want else "BAD", flush=True)
"""


def demo(nproc=3, out=sys.stdout):
    """Shows memory saved: nproc python3 processes hold the same 64 MiB;
    dedupe merges them; each checks its data; detach gives it back.
    Returns {"pss_before_kib", "pss_merged_kib", "pss_after_detach_kib", "checks"}."""
    from wp.protectors.dedupe import DedupeProtector
    from wp.session import Session
    from wp.space import ProcessSpace

    pss = procfs.pss_kb
    procs = [subprocess.Popen([sys.executable, "-c", DEMO_HOLDER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(nproc)]
    sessions = []
    try:
        for p in procs:
            p.stdout.readline()

        def check():
            res = []
            for p in procs:
                p.stdin.write("check\n")
                p.stdin.flush()
                res.append(p.stdout.readline().strip())
            return res

        before = sum(pss(p.pid) for p in procs)
        print("%d python3 processes holding the same 64 MiB: PSS %d MiB" % (nproc, before // 1024),
              file=out)
        for p in procs:
            prot = DedupeProtector(auto=False)
            s = Session(ProcessSpace.attached(p.pid), prot, regions=["anon"])
            s.start()
            sessions.append((s, prot))
            prot.scan_once()
            prot.scan_once()
        for _, prot in sessions:
            prot.scan_once()
        merged = sum(pss(p.pid) for p in procs)
        checks = check()
        print("merged by wp dedupe:                  PSS %d MiB (saved %d MiB); their own checks: %s"
              % (merged // 1024, (before - merged) // 1024, " ".join(checks)), file=out)
        for s, _ in sessions:
            s.close()
        sessions = []
        after = sum(pss(p.pid) for p in procs)
        checks += check()
        print("detached (unmerged):                  PSS %d MiB; checks: %s"
              % (after // 1024, " ".join(checks[nproc:])), file=out)
        return {"pss_before_kib": before, "pss_merged_kib": merged, "pss_after_detach_kib": after,
                "checks": checks}
    finally:
        for s, _ in sessions:
            s.close()
        for p in procs:
            p.kill()
            p.wait()



def add_parser(subparsers):
    """Registers `dedupe` on the subparsers of `wp bench` (main parses the words)."""
    from wp.commands import passthrough
    return passthrough(subparsers, "dedupe", "dedupe vs kernel KSM on 1 GiB", main)


def main(args=None):
    """wp bench dedupe [--size MiB] [--distinct N] [--only ksm|wp|redis] [--json] [--demo]

    Args (argv list, or None for sys.argv[1:]):
        --size MiB      anonymous memory of the target (default 1024)
        --distinct N    distinct duplicate contents (default 1000)
        --only WHICH    run only "ksm" or only "wp"
        --json          print the result as JSON (else a short table)
        --demo          instead: three python3 processes holding the same
                        64 MiB, merged, checked by themselves, unmerged
                        (what scripts/demo can show)
    Returns the exit status (0).
    """
    ap = argparse.ArgumentParser(prog="wp bench dedupe", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="examples:\n"
                                        "  wp bench dedupe --json              1 GiB, KSM then wp dedupe\n"
                                        "  wp bench dedupe --size 256 --only wp\n"
                                        "  wp bench dedupe --demo              three python3 processes\n")
    ap.add_argument("--size", type=int, default=1024, help="MiB of anonymous memory (1024)")
    ap.add_argument("--distinct", type=int, default=1000, help="distinct duplicate contents")
    ap.add_argument("--only", choices=("ksm", "wp", "redis"),
                    help="ksm or wp alone; redis: redis-server with duplicate values, KSM and wp")
    ap.add_argument("--inprocess", action="store_true",
                    help="also run the in-process passes (a second, labelled row)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--demo", action="store_true",
                    help="instead: python3 processes holding the same data, merged and checked")
    a = ap.parse_args(args)
    if a.demo:
        res = demo()
        if a.json:
            print(json.dumps(res, indent=2))
        return 0 if all(c == "ok" for c in res["checks"]) else 1
    res = run(a.size, a.distinct, a.only, a.inprocess)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for half in ("ksm", "wp", "wp_inprocess"):
            if half in res:
                r = res[half]
                print("%-4s saved %7.1f MiB  cpu %6.3f s  wall %6.3f s  first write %6s ns  VMAs +%s"
                      % (half, r["pss_saved_mib"], r["cpu_s"], r["wall_s"], r.get("first_write_ns_avg"),
                         r.get("vmas_added")))
        if "ratios" in res:
            print("ratios", res["ratios"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
