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
import fcntl
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
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port))
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
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
        for i in range(keys):
            self.sock.sendall(self.encode("SET", "k:%012d" % i, values[i % len(values)]))
            if i % 64 == 63:
                for _ in range(64):
                    self.reply()
        for _ in range(keys % 64):
            self.reply()

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
    s = ksm.stats()
    return s["pages_sharing"] + s.get("ksm_zero_pages", 0)


def _converge(pids, timeout=180):
    """Waits until the pids' merged pages stop growing over two full scans
    past the last growth. Returns (seconds, global saved pages)."""
    t0 = time.monotonic()
    last, scans_at = None, None
    while time.monotonic() - t0 < timeout:
        m = 0
        for p in pids:
            st = ksm.process_stat(p)
            m += st["ksm_merging_pages"] + st.get("ksm_zero_pages", 0)
        scans = ksm.read("full_scans")
        if m != last:
            last, scans_at = m, scans
        elif m and scans - scans_at >= 2:
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError("KSM did not converge within %d s" % timeout)


def _settle(floor, timeout=60):
    """Waits (ksmd running) until the saved pages fall to floor or stop
    falling for two full scans."""
    t0 = time.monotonic()
    last, scans_at = None, None
    while time.monotonic() - t0 < timeout:
        m = _saved()
        if m <= floor:
            return
        scans = ksm.read("full_scans")
        if m != last:
            last, scans_at = m, scans
        elif scans - scans_at >= 2:
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


def run(keys=1024, value_kib=256, distinct=16, pythons=3, bench_requests=4000):
    """Runs the three phases; returns the JSON dict."""
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
    # Tests that change KSM knobs take this lock too (tests/test_ksm_process.py).
    lock = os.open("/tmp/wp-ksm.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        return _run(out, procs, keys, value_kib, distinct, pythons, bench_requests, values, workdir)
    finally:
        os.close(lock)


def _run(out, procs, keys, value_kib, distinct, pythons, bench_requests, values, workdir):
    with ksm.KsmSettings(unmerge=False, pages_to_scan=PAGES_TO_SCAN, sleep_millisecs=0):
        out["knobs"] = ksm.knobs()
        run0 = ksm.read("run")
        try:
            # 1. The reference: opted in by prctl before exec.
            ref = Redis(workdir, prctl_first=True)
            procs.append(ref)
            st = ksm.process_stat(ref.pid)
            _check(st["ksm_merge_any"], "reference redis opted in through exec", out)
            ref.load(keys, values)
            s0 = _saved()
            ksm.write("run", 1)
            secs = _converge([ref.pid])
            saved_ref = _saved() - s0
            out["reference"] = {"pid": ref.pid, "saved_pages": saved_ref, "saved_mib": saved_ref * PAGE / 2**20,
                                "converge_s": round(secs, 2), "ksm_stat": ksm.process_stat(ref.pid)}
            ref.stop()
            procs.remove(ref)
            # ksmd drops a dead process's merged pages at its next pass:
            # let it, so that the next phase starts from the same counters.
            _settle(s0 + 16)
            ksm.write("run", run0)

            # 2. The same redis started plainly, enabled from outside.
            r = Redis(workdir)
            procs.append(r)
            _check(not ksm.process_stat(r.pid)["ksm_merge_any"], "plain redis not opted in", out)
            r.load(keys, values)
            digests = {"loaded": r.digest()}
            s0 = _saved()
            t = time.monotonic()
            en = subprocess.run(_wp("ksm", "enable", r.pid, "--start", "--no-daemon"), capture_output=True,
                                text=True, timeout=120)
            enable_s = time.monotonic() - t
            _check(en.returncode == 0, "wp ksm enable --start", out)
            digests["enabled"] = r.digest()
            secs = _converge([r.pid])
            saved_wp = _saved() - s0
            merging = ksm.process_stat(r.pid)
            digests["merged"] = r.digest()
            bench = _benchmark(r, keys, bench_requests)
            digests["benchmarked"] = r.digest()
            t = time.monotonic()
            dis = subprocess.run(_wp("ksm", "disable", r.pid, "--no-daemon"), capture_output=True, text=True,
                                 timeout=600)
            disable_s = time.monotonic() - t
            # The pages are unmerged inside the injected prctl; the counter
            # follows at ksmd's next pass over the process.
            t = time.monotonic()
            while ksm.process_stat(r.pid)["ksm_merging_pages"] and time.monotonic() - t < 30:
                time.sleep(0.02)
            zero_after_s = time.monotonic() - t
            after = ksm.process_stat(r.pid)
            digests["disabled"] = r.digest()
            stop = subprocess.run(_wp("ksm", "stop"), capture_output=True, text=True, timeout=60)
            out["wp"] = {"pid": r.pid, "saved_pages": saved_wp, "saved_mib": saved_wp * PAGE / 2**20,
                         "converge_s": round(secs, 2), "enable_s": round(enable_s, 3),
                         "enable_said": (en.stdout + en.stderr).strip(), "ksm_stat_merged": merging,
                         "benchmark": bench, "disable_s": round(disable_s, 3),
                         "ksm_merging_pages_after_disable": after["ksm_merging_pages"],
                         "ksm_merging_pages_zero_after_s": round(zero_after_s, 3),
                         "digests": digests, "stop_said": (stop.stdout + stop.stderr).strip()}
            out["ratio_wp_vs_prctl_before_exec"] = round(saved_wp / saved_ref, 4) if saved_ref else None
            _check(out["ratio_wp_vs_prctl_before_exec"] is not None
                   and out["ratio_wp_vs_prctl_before_exec"] >= 0.95, "wp saves >= 0.95 of prctl before exec", out)
            _check(not bench["errors"], "redis-benchmark without errors", out)
            _check(len(set(digests.values())) == 1, "DEBUG DIGEST unchanged", out)
            _check(dis.returncode == 0 and after["ksm_merging_pages"] == 0,
                   "ksm_merging_pages 0 after disable", out)
            _check(ksm.read("run") == run0, "wp ksm stop put run back", out)

            # 3. The estimate: redis and python3 processes holding the same data.
            holders = []
            for i in range(pythons):
                p = subprocess.Popen([sys.executable, "-c", PY_HOLDER, str(keys), str(value_kib), str(distinct),
                                      "16"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                procs.append(p)
                holders.append(p)
            for p in holders:
                if p.stdout.readline().strip() != "ready":
                    raise RuntimeError("a python3 holder did not start")
            pids = [r.pid] + [p.pid for p in holders]
            c0 = _children_cpu()
            t = time.monotonic()
            es = subprocess.run(_wp("ksm", "estimate", *pids, "--json", "--quiet"), capture_output=True,
                                text=True, timeout=600)
            est_wall = time.monotonic() - t
            est_cpu = _children_cpu() - c0
            if es.returncode:
                raise RuntimeError("wp ksm estimate failed: %s" % es.stderr)
            est = json.loads(es.stdout)
            gib = est["scanned_bytes"] / 2**30
            s0 = _saved()
            for i, pid in enumerate(pids):
                en = subprocess.run(_wp("ksm", "enable", pid, "--no-daemon", *(["--start"] if i == 0 else [])),
                                    capture_output=True, text=True, timeout=120)
                _check(en.returncode == 0, "wp ksm enable %s" % ("redis" if i == 0 else "python3 %d" % i), out)
            secs = _converge(pids)
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
                subprocess.run(_wp("ksm", "disable", pid, "--no-daemon"), capture_output=True, timeout=600)
            subprocess.run(_wp("ksm", "stop"), capture_output=True, timeout=60)
            k_est = est["set"]["kernel_ksm_would_save_bytes"]
            out["estimate"] = {
                "pids": pids, "scanned_mib": round(est["scanned_bytes"] / 2**20, 1),
                "command_cpu_s": round(est_cpu, 3), "command_wall_s": round(est_wall, 3),
                "command_cpu_s_per_gib": round(est_cpu / gib, 3) if gib else None,
                "inner_cpu_s_per_gib": est["cpu_s_per_gib"],
                "kernel_ksm_would_save_bytes": k_est,
                "wp_dedupe_would_save_bytes": est["set"]["wp_dedupe_would_save_bytes"],
                "ksm_saved_bytes": saved_set * PAGE, "converge_s": round(secs, 2),
                "ratio_ksm_saved_vs_estimate": round(saved_set * PAGE / k_est, 4) if k_est else None,
                "processes": per, "set": est["set"]}
            ratio = out["estimate"]["ratio_ksm_saved_vs_estimate"]
            _check(ratio is not None and 0.9 <= ratio <= 1.1, "estimate within 10% of KSM", out)
            _check(out["estimate"]["command_cpu_s_per_gib"] is not None
                   and out["estimate"]["command_cpu_s_per_gib"] < 2.0, "estimate < 2 s CPU per GiB", out)
        finally:
            for p in procs:
                try:
                    if isinstance(p, Redis):
                        p.stop()
                    else:
                        p.kill()
                        p.wait()
                except OSError:
                    pass
            if ksm.changed_knobs():
                ksm.restore_knobs()
            shutil.rmtree(workdir, ignore_errors=True)
    out["knobs_after"] = ksm.knobs()
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
    res = run(a.keys, a.value_kib, a.distinct, a.pythons)
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        w, e = res["wp"], res["estimate"]
        print("reference (prctl before exec): %.1f MiB saved; wp ksm enable: %.1f MiB (%.3f)"
              % (res["reference"]["saved_mib"], w["saved_mib"], res["ratio_wp_vs_prctl_before_exec"]))
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
