"""wp bench ksm: kernel KSM for a running redis that did not opt in, and the
advisor's estimate against what KSM then saves. One run, three phases:

1. reference: redis-server started by a launcher that called
   prctl(PR_SET_MEMORY_MERGE, 1) before exec (the way a process opts in
   today), loaded with KEYS values of VALUE_KIB KiB drawn from DISTINCT
   contents (see _values for why each is a cache line repeated); ksmd merges it; KSM's saving is read (pages_sharing +
   ksm_zero_pages, before/after). Then that redis exits.
2. wp: the same redis started plainly and loaded the same way, then
   `wp ksm enable PID --start` (one-shot injection); the same measure;
   redis-benchmark GETs the values meanwhile; `DEBUG DIGEST` is read after
   loading, after enable, after merging, after the benchmark and after
   `wp ksm disable PID` (which must leave ksm_merging_pages at 0).
3. estimate: three python3 processes holding the same values (copies);
   `wp ksm estimate` of redis and the three (CPU of the whole command),
   then `wp ksm enable` of all four and KSM's saving against the estimate.

KSM is set to pages_to_scan=PAGES_TO_SCAN, sleep_millisecs=0 (other knobs
as found) and every knob is put back at the end. Run it alone (it changes
KSM's knobs: flock -x /tmp/wp-cpu.lock).

    wp bench ksm [--json] [--keys N] [--value-kib K] [--distinct D]
"""
import argparse
import json
import os
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from wp import ksm
from wp.bench import machine

__all__ = ["add_parser", "run", "main"]

PAGE = 4096
PAGES_TO_SCAN = 4000
LAUNCHER = ("import ctypes, os, sys\n"
            "if ctypes.CDLL(None, use_errno=True).prctl(67, 1, 0, 0, 0):\n"
            "    sys.exit('prctl(PR_SET_MEMORY_MERGE): errno %d' % ctypes.get_errno())\n"
            "os.execvp(sys.argv[1], sys.argv[1:])\n")
PY_HOLDER = ("import os, random, sys, time\n"
             "keys, kib, distinct, seed = map(int, sys.argv[1:5])\n"
             "rnd = random.Random(seed)\n"
             "vals = [rnd.randbytes(64) * (kib * 16) for _ in range(distinct)]\n"
             "held = [bytearray(vals[i % distinct]) for i in range(keys)]\n"
             "print('ready', flush=True)\n"
             "sys.stdin.readline()\n")


def _wp(*args):
    return [sys.executable, "-m", "wp.cli"] + [str(a) for a in args]


class Redis:
    """A redis-server of our own on a free port, spoken to in RESP."""

    def __init__(self, workdir, prctl_first=False):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        self.port = s.getsockname()[1]
        s.close()
        argv = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", workdir, "--enable-debug-command", "local",
                "--protected-mode", "no"]
        if prctl_first:
            argv = [sys.executable, "-c", LAUNCHER] + argv
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pid = self.proc.pid
        deadline = time.monotonic() + 20
        try:
            while True:
                try:
                    self.sock = socket.create_connection(("127.0.0.1", self.port))
                    break
                except ConnectionRefusedError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError("redis-server did not start")
                    time.sleep(0.05)
        except BaseException:    # Ctrl-C too: no redis left behind
            self.proc.kill()
            self.proc.wait()
            raise
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self):
        line = self._line()
        if line[:1] == b"$":
            n = int(line[1:])
            while len(self.buf) < n + 2:
                self.buf += self.sock.recv(1 << 20)
            data, self.buf = self.buf[:n], self.buf[n + 2:]
            return data
        if line[:1] == b"-":
            raise RuntimeError(line.decode())
        return line[1:]

    @staticmethod
    def encode(*parts):
        parts = [p if isinstance(p, bytes) else str(p).encode() for p in parts]
        return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)

    def command(self, *parts):
        self.sock.sendall(self.encode(*parts))
        return self.reply()

    def load(self, keys, values):
        """SETs keys values, one at a time (each reply awaited). Pipelined,
        redis's query buffer takes the values in pieces that depend on
        timing, and the process's anonymous memory after the same load
        varied by 10% (RssAnon 68,207 to 74,920 pages here); one at a time
        it is the same to a page, so two redis hold the same data in the
        same pages and their KSM savings compare."""
        for i in range(keys):
            self.command("SET", "k:%012d" % i, values[i % len(values)])

    def digest(self):
        return self.command("DEBUG", "DIGEST").decode()

    def stop(self):
        try:
            self.sock.close()
        except OSError:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _saved():
    """KSM's saving, system wide: pages_sharing + ksm_zero_pages."""
    s = ksm.stats()
    return s["pages_sharing"] + s.get("ksm_zero_pages", 0)


def _merging(pids):
    """The pids' pages KSM merged, per process: ksm_merging_pages +
    ksm_zero_pages summed (/proc/PID/ksm_stat)."""
    m = 0
    for p in pids:
        st = ksm.process_stat(p)
        m += st["ksm_merging_pages"] + st.get("ksm_zero_pages", 0)
    return m


def _rss_anon_pages(pid):
    with open("/proc/%d/status" % pid) as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) * 1024 // PAGE


def _converge(pids, timeout=180):
    """Waits until the pids' merged pages (:func:`_merging`) stay the same
    while ksmd's full_scans advances twice. Returns (seconds, merged pages)."""
    t0 = time.monotonic()
    last, scans_at = None, None
    while time.monotonic() - t0 < timeout:
        m = _merging(pids)
        scans = ksm.read("full_scans")
        if m != last:
            last, scans_at = m, scans
        elif m and scans - scans_at >= 2:
            return time.monotonic() - t0, m
        time.sleep(0.05)
    raise TimeoutError("KSM did not converge within %d s (%s pages merged)" % (timeout, last))


def _settle(floor, timeout=60):
    """Waits (ksmd running) until the saved pages fall to floor or stop
    falling for two full scans. ksmd drops a dead process's merged pages
    at its next pass; with no mergeable process left, full_scans stops
    (ksmd has nothing to pass over): then half a second without change
    is enough."""
    t0 = time.monotonic()
    last, scans_at, changed_at = None, None, t0
    while time.monotonic() - t0 < timeout:
        m = _saved()
        if m <= floor:
            return
        scans = ksm.read("full_scans")
        now = time.monotonic()
        if m != last:
            last, scans_at, changed_at = m, scans, now
        elif scans - scans_at >= 2 or (scans == scans_at and now - changed_at > 0.5):
            return
        time.sleep(0.05)


def _values(kib, distinct, seed=16):
    """distinct values of kib KiB: each a random 64-byte block repeated.
    jemalloc starts a large allocation at a random cache line of its first
    page (opt.cache_oblivious), so two copies of a random value would share
    no page; a value made of one cache line repeated has the same pages at
    every such offset (the python holders copy them the same way)."""
    rnd = random.Random(seed)
    return [rnd.randbytes(64) * (kib * 16) for _ in range(distinct)]


def _benchmark(r, keys, requests):
    out = subprocess.run(["redis-benchmark", "-p", str(r.port), "-n", str(requests), "-c", "8", "-r", str(keys),
                          "--csv", "GET", "k:__rand_int__"], capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    rps = None
    for ln in lines[1:]:
        cols = [c.strip('"') for c in ln.split(",")]
        try:
            rps = float(cols[1])
        except (IndexError, ValueError):
            pass
    errors = out.returncode != 0 or "rror" in out.stdout + out.stderr
    return {"requests": requests, "rps": rps, "errors": errors, "returncode": out.returncode,
            "stderr": out.stderr.strip()[-300:]}


def _children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _check(cond, what, out):
    out["checks"][what] = "ok" if cond else "FAILED"


def _where(pid):
    """Where pid's KSM pages are: per mapping with present anonymous pages,
    {"mapping", "present", "ksm"} (KPF_KSM in /proc/kpageflags), largest
    first. Tells a whole-process opt-in from a later one page by page."""
    import numpy as np
    from wp import pagemap
    from wp.maps import SPECIAL, read_maps
    rows = []
    with open("/proc/%d/pagemap" % pid, "rb", buffering=0) as pm, open("/proc/kpageflags", "rb", buffering=0) as kf:
        for m in read_maps(pid):
            if m.kind == SPECIAL or m.shared:
                continue
            n = (m.end - m.start) // PAGE
            e = np.frombuffer(os.pread(pm.fileno(), n * 8, m.start // PAGE * 8), dtype=np.uint64)
            pfns = (e[(e & np.uint64(pagemap.PRESENT)) != 0] & np.uint64(pagemap.PFN_MASK)).astype(np.int64)
            if not len(pfns):
                continue
            nksm = 0
            for pfn in pfns.tolist():
                if int.from_bytes(os.pread(kf.fileno(), 8, pfn * 8), "little") & KPF_KSM:
                    nksm += 1
            rows.append({"mapping": "%x-%x %s %s" % (m.start, m.end, m.perms, m.path or "[anon]"),
                         "present": int(len(pfns)), "ksm": nksm})
    rows.sort(key=lambda r: -r["present"])
    return rows


KPF_KSM = 1 << 21


def run(keys=1024, value_kib=256, distinct=16, pythons=3, bench_requests=4000):
    """Runs the three phases; returns the JSON dict. Every KSM knob is put
    back as found when it returns, fails, or is interrupted (Ctrl-C,
    SIGTERM, SIGHUP); knobs_before/knobs_after in the dict show it."""
    if not ksm.available():
        raise RuntimeError("this kernel has no KSM")
    if shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None:
        raise RuntimeError("redis-server and redis-benchmark are needed (scripts/setup installs them)")
    ksm.require_root("wp bench ksm")
    values = _values(value_kib, distinct)
    workdir = tempfile.mkdtemp(prefix="wp-bench-ksm-")
    out = {"machine": machine(), "workload": {"keys": keys, "value_kib": value_kib, "distinct": distinct,
                                               "redis_data_mib": keys * value_kib / 1024, "pythons": pythons},
           "knobs": None, "checks": {}}
    procs = []
    # SIGTERM and SIGHUP end the bench as Ctrl-C does: through the finally
    # below, which puts the knobs back (the default action would kill us
    # with ksmd left running fast).
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            handlers[sig] = signal.signal(sig, _interrupted)
    # Tests that change KSM knobs take the same lock (wp.ksm.knob_lock).
    try:
        with ksm.knob_lock():
            saved = ksm.knobs()
            out["knobs_before"] = saved
            # The `wp ksm` commands we run record the knobs they change in
            # a record of our own (not the machine's /run/wp one).
            env = dict(os.environ, WP_KSM_RECORD=os.path.join(workdir, "ksm-knobs.json"))
            try:
                return _run(out, procs, env, keys, value_kib, distinct, pythons, bench_requests, values, workdir)
            finally:
                # Nothing (a second Ctrl-C) interrupts putting things back.
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
                try:
                    for p in procs:
                        try:
                            if isinstance(p, Redis):
                                p.stop()
                            else:
                                p.kill()
                                p.wait()
                        except OSError:
                            pass
                    _reap_children()
                    try:
                        ksm.restore_knobs(record=env["WP_KSM_RECORD"])
                    except OSError:
                        pass
                    left = ksm.put_back(saved)
                    out["knobs_after"] = ksm.knobs()
                    _check(not left, "every KSM knob put back", out)
                    if left:
                        print("wp bench ksm: KSM knobs not put back: %s (were %s)" % (left, saved), file=sys.stderr)
                    shutil.rmtree(workdir, ignore_errors=True)
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def _reap_children():
    """Kills and reaps every child of this process still there: one that an
    interrupt caught between fork and Popen's return has no Popen object to
    stop it by. (The bench runs as a process of its own, `wp bench ksm`:
    all its children are its own.)"""
    from wp import procfs
    try:
        kids = procfs.children(os.getpid())
    except OSError:
        return
    for pid in kids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def _interrupted(signum, frame):
    raise KeyboardInterrupt("signal %d" % signum)


def _run(out, procs, env, keys, value_kib, distinct, pythons, bench_requests, values, workdir):
    def wp(*args, timeout=600):
        return subprocess.run(_wp(*args), capture_output=True, text=True, timeout=timeout, env=env)

    # ksmd stopped while each redis loads (nothing merges before we
    # measure), scanning fast once started; other knobs as found.
    ksm.write("pages_to_scan", PAGES_TO_SCAN)
    ksm.write("sleep_millisecs", 0)
    ksm.write("run", 0)
    out["knobs"] = ksm.knobs()
    others = [p["pid"] for p in ksm.status()["processes"] if p.get("ksm_merge_any") or p.get("ksm_mergeable")]
    out["other_mergeable_pids"] = others

    t_phase = time.monotonic()
    out["phase_s"] = {}

    def phase(name):
        nonlocal t_phase
        now = time.monotonic()
        out["phase_s"][name] = round(now - t_phase, 2)
        t_phase = now

    # 1. The reference: opted in by prctl before exec.
    ref = Redis(workdir, prctl_first=True)
    procs.append(ref)
    _check(ksm.process_stat(ref.pid)["ksm_merge_any"], "reference redis opted in through exec", out)
    ref.load(keys, values)
    ref_digest = ref.digest()
    s0 = _saved()
    ksm.write("run", 1)
    secs, m_ref = _converge([ref.pid])
    st = ksm.process_stat(ref.pid)
    out["reference"] = {"pid": ref.pid, "merging_pages": m_ref, "merging_mib": m_ref * PAGE / 2**20,
                        "rss_anon_pages": _rss_anon_pages(ref.pid),
                        "global_saved_pages": _saved() - s0, "converge_s": round(secs, 2), "ksm_stat": st,
                        "where": _where(ref.pid)[:8]}
    ref.stop()
    procs.remove(ref)
    # ksmd drops a dead process's merged pages at its next pass: let it,
    # so that the next phase starts from the same counters.
    _settle(s0 + 16)
    ksm.write("run", 0)
    phase("reference")

    # 2. The same redis started plainly, enabled from outside.
    r = Redis(workdir)
    procs.append(r)
    _check(not ksm.process_stat(r.pid)["ksm_merge_any"], "plain redis not opted in", out)
    r.load(keys, values)
    digests = {"loaded": r.digest()}
    _check(digests["loaded"] == ref_digest, "both redis hold the same data (DEBUG DIGEST)", out)
    s0 = _saved()
    t = time.monotonic()
    en = wp("ksm", "enable", r.pid, "--start", "--no-daemon", timeout=120)
    enable_s = time.monotonic() - t
    _check(en.returncode == 0, "wp ksm enable --start", out)
    _check("run 0 -> 1" in en.stderr, "wp ksm enable --start says it started ksmd", out)
    digests["enabled"] = r.digest()
    secs, m_wp = _converge([r.pid])
    merged_stat = ksm.process_stat(r.pid)
    rss_wp = _rss_anon_pages(r.pid)
    saved_wp = _saved() - s0
    where = _where(r.pid)[:8]
    digests["merged"] = r.digest()
    bench = _benchmark(r, keys, bench_requests)
    digests["benchmarked"] = r.digest()
    t = time.monotonic()
    dis = wp("ksm", "disable", r.pid, "--no-daemon")
    disable_s = time.monotonic() - t
    # The pages are unmerged inside the injected prctl; the counter
    # follows at ksmd's next pass over the process.
    t = time.monotonic()
    while ksm.process_stat(r.pid)["ksm_merging_pages"] and time.monotonic() - t < 30:
        time.sleep(0.02)
    zero_after_s = time.monotonic() - t
    after = ksm.process_stat(r.pid)
    digests["disabled"] = r.digest()
    stop = wp("ksm", "stop", "--no-daemon", timeout=60)
    out["wp"] = {"pid": r.pid, "merging_pages": m_wp, "merging_mib": m_wp * PAGE / 2**20, "rss_anon_pages": rss_wp,
                 "global_saved_pages": saved_wp, "converge_s": round(secs, 2), "enable_s": round(enable_s, 3),
                 "enable_said": (en.stdout + en.stderr).strip(), "ksm_stat_merged": merged_stat, "where": where,
                 "benchmark": bench, "disable_s": round(disable_s, 3),
                 "ksm_merging_pages_after_disable": after["ksm_merging_pages"],
                 "ksm_merging_pages_zero_after_s": round(zero_after_s, 3),
                 "digests": digests, "stop_said": (stop.stdout + stop.stderr).strip()}
    # Like with like: the same per-process counter (ksm_merging_pages +
    # ksm_zero_pages), each read once ksmd converged on that process.
    out["ratio_wp_vs_prctl_before_exec"] = round(m_wp / m_ref, 4) if m_ref else None
    # The same, each as a fraction of the process's anonymous memory.
    f_ref = m_ref / out["reference"]["rss_anon_pages"]
    out["ratio_merged_fraction"] = round((m_wp / rss_wp) / f_ref, 4) if f_ref else None
    out["ratio_global_saved"] = (round(saved_wp / out["reference"]["global_saved_pages"], 4)
                                 if out["reference"]["global_saved_pages"] > 0 else None)
    _check(out["ratio_wp_vs_prctl_before_exec"] is not None
           and out["ratio_wp_vs_prctl_before_exec"] >= 0.95, "wp merges >= 0.95 of prctl before exec", out)
    _check(not bench["errors"], "redis-benchmark without errors", out)
    _check(len(set(digests.values())) == 1, "DEBUG DIGEST unchanged", out)
    _check(dis.returncode == 0 and after["ksm_merging_pages"] == 0, "ksm_merging_pages 0 after disable", out)
    _check(ksm.read("run") == 0, "wp ksm stop put run back", out)

    phase("wp")

    # 3. The estimate: redis and python3 processes holding the same data.
    holders = []
    for i in range(pythons):
        p = subprocess.Popen([sys.executable, "-c", PY_HOLDER, str(keys), str(value_kib), str(distinct), "16"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(p)
        holders.append(p)
    for p in holders:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("a python3 holder did not start")
    pids = [r.pid] + [p.pid for p in holders]
    # Let ksmd drop what it still held of redis's earlier merge.
    ksm.write("run", 1)
    _settle(0, timeout=30)
    ksm.write("run", 0)
    c0 = _children_cpu()
    t = time.monotonic()
    es = wp("ksm", "estimate", *pids, "--json", "--quiet")
    est_wall = time.monotonic() - t
    est_cpu = _children_cpu() - c0
    if es.returncode:
        raise RuntimeError("wp ksm estimate failed: %s" % es.stderr)
    est = json.loads(es.stdout)
    gib = est["scanned_bytes"] / 2**30
    s0 = _saved()
    for i, pid in enumerate(pids):
        en = wp("ksm", "enable", pid, "--no-daemon", *(["--start"] if i == 0 else []), timeout=120)
        _check(en.returncode == 0, "wp ksm enable %s" % ("redis" if i == 0 else "python3 %d" % i), out)
    secs, m_set = _converge(pids)
    saved_set = _saved() - s0
    per = []
    for pe in est["processes"]:
        st = ksm.process_stat(pe["pid"])
        per.append({"pid": pe["pid"], "comm": pe["comm"], "estimated_merging_pages":
                    pe["set_ksm_merging_pages"] + pe["set_ksm_zero_pages"],
                    "ksm_merging_pages": st["ksm_merging_pages"] + st.get("ksm_zero_pages", 0),
                    "kernel_ksm_would_save_bytes_alone": pe["kernel_ksm_would_save_bytes"],
                    "wp_dedupe_would_save_bytes_alone": pe["wp_dedupe_would_save_bytes"]})
    for pid in pids:
        wp("ksm", "disable", pid, "--no-daemon")
    wp("ksm", "stop", "--no-daemon", timeout=60)
    phase("estimate")
    k_est = est["set"]["kernel_ksm_would_save_bytes"]
    m_est = sum(x["estimated_merging_pages"] for x in per)
    out["estimate"] = {
        "pids": pids, "scanned_mib": round(est["scanned_bytes"] / 2**20, 1),
        "command_cpu_s": round(est_cpu, 3), "command_wall_s": round(est_wall, 3),
        "command_cpu_s_per_gib": round(est_cpu / gib, 3) if gib else None,
        "inner_cpu_s_per_gib": est["cpu_s_per_gib"],
        "kernel_ksm_would_save_bytes": k_est,
        "wp_dedupe_would_save_bytes": est["set"]["wp_dedupe_would_save_bytes"],
        "ksm_saved_bytes": saved_set * PAGE, "converge_s": round(secs, 2),
        "ratio_ksm_saved_vs_estimate": round(saved_set * PAGE / k_est, 4) if k_est else None,
        "estimated_merging_pages": m_est, "ksm_merging_pages": m_set,
        "ratio_merging_vs_estimate": round(m_set / m_est, 4) if m_est else None,
        "processes": per, "set": est["set"]}
    ratio = out["estimate"]["ratio_ksm_saved_vs_estimate"]
    _check(ratio is not None and 0.9 <= ratio <= 1.1, "estimate within 10% of what KSM saved", out)
    _check(out["estimate"]["command_cpu_s_per_gib"] is not None
           and out["estimate"]["command_cpu_s_per_gib"] < 2.0, "estimate < 2 s CPU per GiB", out)
    return out



def add_parser(subparsers):
    """Registers `ksm` on the subparsers of `wp bench` (main parses the words)."""
    from wp.commands import passthrough
    return passthrough(subparsers, "ksm", "wp ksm enable on a running redis vs prctl before exec; the estimate", main)


def main(args=None):
    """wp bench ksm [--json] [--keys N] [--value-kib K] [--distinct D]. Returns 0 if every check passed."""
    ap = argparse.ArgumentParser(prog="wp bench ksm", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  flock -x /tmp/wp-cpu.lock wp bench ksm --json\n")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keys", type=int, default=1024, help="redis keys (1024)")
    ap.add_argument("--value-kib", type=int, default=256, help="KiB per value (256)")
    ap.add_argument("--distinct", type=int, default=16, help="distinct values (16)")
    ap.add_argument("--pythons", type=int, default=3, help="python3 processes holding the same data (3)")
    a = ap.parse_args(args)
    try:
        res = run(a.keys, a.value_kib, a.distinct, a.pythons)
    except KeyboardInterrupt:
        print("wp bench ksm: interrupted; KSM knobs put back: %s" % ksm.knobs(), file=sys.stderr)
        return 130
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        w, e = res["wp"], res["estimate"]
        print("ksm_merging_pages: reference (prctl before exec) %.1f MiB, wp ksm enable %.1f MiB (%.3f)"
              % (res["reference"]["merging_mib"], w["merging_mib"], res["ratio_wp_vs_prctl_before_exec"]))
        print("redis-benchmark GET: %s rps, errors %s; digests %s" % (w["benchmark"]["rps"], w["benchmark"]["errors"],
                                                                     sorted(set(w["digests"].values()))))
        print("estimate: %.1f MiB read, %.2f s CPU per GiB; KSM would save %.1f MiB, saved %.1f MiB (%.3f)"
              % (e["scanned_mib"], e["command_cpu_s_per_gib"], e["kernel_ksm_would_save_bytes"] / 2**20,
                 e["ksm_saved_bytes"] / 2**20, e["ratio_ksm_saved_vs_estimate"]))
        for k, v in res["checks"].items():
            print("  %-45s %s" % (k, v))
    return 0 if all(v == "ok" for v in res["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
