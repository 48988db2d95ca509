"""wp bench workloads: what write protection costs real programs.

Real programs from Debian, each run unattached and under every shipped
protector through the user's path, in interleaved rounds (none, trace,
track, dedupe, snapshot, none, trace, ...):

- none      the program alone;
- trace, track, dedupe: protected through a wpd this bench starts on its
            own socket, with default options: `wp run --protector P -- CMD`
            (the client side of `wp run`, in this process: wpd seizes the
            child before exec and protects it from its first instruction),
            `wp attach PID --protector P` for a server (redis-server);
- snapshot  `wp snapshot PID` (its own process, as a user runs it) taken
            once during the run, `snapshot_at` of the way in.

Workloads (the seed reviewer's: bonnie++ and dbench sized to fit in the page
cache, so the cost of write protection is not hidden behind I/O; reaim is not
packaged in Debian and mmtests dropped it as bit-rotted, so the page-fault
loop in the style of will-it-scale's page_fault1 stands in for it):

- redis-d64, redis-d1024, redis-d4096: redis-server (attached after start)
  loaded by redis-benchmark -P 16 -r 100000 -t set,get,lpush with values of
  64, 1024, 4096 bytes; requests/s of each test (a fresh server per run);
- dbench-tmpfs, dbench-ext4: dbench with Debian's loadfile, 2 clients; MB/s;
- bonnie-file, bonnie-dir: bonnie++ -f (block write, rewrite, read) on a
  256 MiB file (-r 128: fits the page cache), and its create/stat/delete of
  files (-n); on tmpfs; the work over the wall time (bonnie++ itself prints
  +++++ for tests shorter than 0.5 s);
- fio-{rand,seq}-{ext4,tmpfs}: fio --ioengine=mmap random and sequential 4k
  writes to a 128 MiB file: writes through a file mapping, the RFC's own
  case (ext4: async WP, the only mode a regular file takes; tmpfs: shmem,
  sync WP); MiB/s;
- pagefault-t1, pagefault-t2: wp/bench/pagefault.c, 1 and 2 threads; pages/s;
- python-dict: python3 building and mutating a dict of 200,000 entries over
  and over; operations/s.

Each run reports its throughput (the program's own figure), the ratio to
the median unattached run, wpd's CPU per second of the run (for snapshot:
the `wp snapshot` process's), the target's CPU per second, faults handled
(sync faults plus async pages reported written) and the program's longest
latency where it prints one (redis-benchmark, dbench, fio, the loops'
longest iteration). ``--cpus 1`` pins everything (wpd, the programs, the
load generators, wp snapshot) to CPU 0: the "lower-end machine".

Every result carries the machine. The measurement is noisy (a shared VM):
compare ratios from one run. Pieces can be run apart (``--workload``,
``--protector``) and joined with ``--from FILE ...`` for the table and plot.
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from wp import procfs
from wp.bench import machine

__all__ = ["run", "main", "add_parser", "WORKLOADS", "PROTECTORS"]

PROTECTORS = ("none", "trace", "track", "dedupe", "snapshot")
_HERE = os.path.dirname(os.path.abspath(__file__))

PYTHON_DICT = r"""
import sys, time
secs, n = float(sys.argv[1]), int(sys.argv[2])
t0 = time.monotonic()
end = t0 + secs
ops, iters = 0, []
while time.monotonic() < end:
    t = time.monotonic()
    d = {}
    for i in range(n):                  # build: fresh memory
        d["k%d" % i] = bytearray(64)
    for v in d.values():                # mutate in place
        v[0] = 1
    for i in range(0, n, 2):            # replace half
        d["k%d" % i] = b"x" * 100
    del d                               # free it (pymalloc returns arenas)
    ops += 2.5 * n
    iters.append(time.monotonic() - t)
el = time.monotonic() - t0
iters.sort()
print("ops=%d seconds=%.3f ops_per_s=%.0f max_iter_ms=%.3f median_iter_ms=%.3f"
      % (ops, el, ops / el, iters[-1] * 1e3, iters[len(iters) // 2] * 1e3))
"""


# -- the programs ------------------------------------------------------------

def _kv(text):
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", text)}


def _pagefault_binary():
    """Builds wp/bench/pagefault.c once into /var/tmp; returns its path."""
    import hashlib
    src = os.path.join(_HERE, "pagefault.c")
    with open(src, "rb") as f:
        out = "/var/tmp/wp-bench-pagefault-" + hashlib.sha1(f.read()).hexdigest()[:12]
    if not os.path.exists(out):
        tmp = out + ".%d" % os.getpid()
        subprocess.run(["gcc", "-O2", "-Wall", "-pthread", "-o", tmp, src], check=True)
        os.rename(tmp, out)
    return out


class Workload:
    """A program run from exec to exit (kind "run") or a server loaded from
    outside (kind "server"). ``metrics`` names what parse() returns."""

    kind = "run"
    metrics = ("throughput",)
    unit = ""

    def __init__(self, name, seconds):
        self.name = name
        self.seconds = seconds

    def prepare(self, dirs):
        pass

    def argv(self, dirs):
        raise NotImplementedError

    def parse(self, out, wall):
        """Returns {metric: value, ..., "max_latency_ms": x or None}."""
        raise NotImplementedError

    def snapshot_pid(self, pid):
        """The process a snapshot copies (dbench: its first client)."""
        return pid

    def cleanup(self, dirs):
        pass


class PageFault(Workload):
    unit = "pages/s"

    def __init__(self, name, seconds, threads):
        super().__init__(name, seconds)
        self.threads = threads

    def argv(self, dirs):
        return [_pagefault_binary(), str(self.threads), str(self.seconds)]

    def parse(self, out, wall):
        kv = _kv(out)
        return {"throughput": kv["pages_per_s"], "max_latency_ms": kv["max_iter_ms"]}


class PythonDict(Workload):
    unit = "ops/s"

    def argv(self, dirs):
        return ["/usr/bin/python3", "-c", PYTHON_DICT, str(self.seconds), "200000"]

    def parse(self, out, wall):
        kv = _kv(out)
        return {"throughput": kv["ops_per_s"], "max_latency_ms": kv["max_iter_ms"]}


class Dbench(Workload):
    unit = "MB/s"
    LOADFILE = "/usr/share/dbench/client.txt"

    def __init__(self, name, seconds, fs):
        super().__init__(name, seconds)
        self.fs = fs

    def argv(self, dirs):
        return ["dbench", "-t", str(max(1, round(self.seconds))), "-D", dirs[self.fs],
                "-c", self.LOADFILE, "2"]

    def parse(self, out, wall):
        m = re.search(r"Throughput ([0-9.]+) MB/sec.*max_latency=([0-9.]+) ms", out)
        return {"throughput": float(m.group(1)), "max_latency_ms": float(m.group(2))}

    def snapshot_pid(self, pid):
        # dbench forks a process per client; the parent only waits.
        try:
            kids = procfs.children(pid)
        except OSError:
            kids = []
        return kids[0] if kids else pid


class Bonnie(Workload):
    """bonnie++ on tmpfs: the file tests (-f: block write, rewrite, block
    read of a 256 MiB file; -r 128 tells it the RAM it must exceed) or the
    directory tests (-n: create, stat, delete files)."""

    def __init__(self, name, seconds, test):
        super().__init__(name, seconds)
        self.test = test
        self.unit = "MiB/s" if test == "file" else "files/s"
        # the work, scaled to about `seconds` on this VM
        self.mib = 256
        self.files = max(4, int(48 * seconds))   # units of 1024 files

    def argv(self, dirs):
        d = dirs["tmpfs"]
        if self.test == "file":
            return ["bonnie++", "-d", d, "-s", str(self.mib), "-r", "128", "-n", "0", "-f",
                    "-x", str(max(1, round(self.seconds / 3))), "-u", "root", "-q"]
        return ["bonnie++", "-d", d, "-s", "0", "-n", "%d:0:0:1" % self.files, "-u", "root", "-q",
                "-x", "1"]

    def parse(self, out, wall):
        rounds = max(1, sum(1 for line in out.splitlines() if line.startswith("1.98,")))
        if self.test == "file":
            work = 3 * self.mib * rounds     # written, rewritten, read
        else:
            work = 3 * self.files * 1024 * rounds   # created, stat'ed, deleted
        lat = []
        for line in out.splitlines():
            if line.startswith("1.98,"):
                for f in line.split(",")[-12:]:
                    m = re.match(r"([0-9.]+)(us|ms)$", f)
                    if m:
                        lat.append(float(m.group(1)) / (1000 if m.group(2) == "us" else 1))
        return {"throughput": work / wall, "max_latency_ms": max(lat) if lat else None}


class Fio(Workload):
    unit = "MiB/s"

    def __init__(self, name, seconds, rw, fs):
        super().__init__(name, seconds)
        self.rw, self.fs = rw, fs

    def _file(self, dirs):
        return os.path.join(dirs[self.fs], "fio.dat")

    def prepare(self, dirs):
        # Lay the file out once (fio would otherwise fill it inside the run).
        path = self._file(dirs)
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.truncate(128 << 20)
                for off in range(0, 128 << 20, 1 << 20):
                    f.seek(off)
                    f.write(b"\0" * (1 << 20))

    def argv(self, dirs):
        return ["fio", "--name=wp", "--ioengine=mmap", "--rw=" + self.rw, "--bs=4k", "--size=128M",
                "--filename=" + self._file(dirs), "--thread", "--time_based",
                "--runtime=%gs" % self.seconds, "--output-format=json"]

    def parse(self, out, wall):
        job = json.loads(out[out.index("{"):])["jobs"][0]["write"]
        lat = job.get("clat_ns") or job.get("lat_ns") or {}
        return {"throughput": job["bw"] / 1024.0,
                "max_latency_ms": lat["max"] / 1e6 if lat.get("max") else None}


class Redis(Workload):
    """redis-server (attached after it starts) loaded by redis-benchmark."""

    kind = "server"
    metrics = ("SET", "GET", "LPUSH")
    unit = "requests/s"

    def __init__(self, name, seconds, size):
        super().__init__(name, seconds)
        self.size = size
        # ~`seconds` of load for the three tests on this VM (~500k SET/s at -P 16)
        self.requests = max(20000, int(seconds * 500000 / 3) // 10000 * 10000)

    def start(self, dirs, port):
        argv = ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no",
                "--dir", dirs["tmpfs"], "--daemonize", "no", "--loglevel", "warning"]
        return argv

    def load_argv(self, port):
        return ["redis-benchmark", "-p", str(port), "--csv", "-n", str(self.requests),
                "-t", "set,get,lpush", "-d", str(self.size), "-r", "100000", "-P", "16"]

    def parse(self, out, wall):
        res, lat = {}, []
        for line in out.splitlines():
            f = [x.strip('"') for x in line.split('","')]
            if len(f) >= 2 and f[0].strip('"') in self.metrics:
                res[f[0].strip('"')] = float(f[1])
                if len(f) >= 8:
                    lat.append(float(f[7].strip('"')))
        res["max_latency_ms"] = max(lat) if lat else None
        return res


def workloads(seconds):
    """Returns the workloads by name (seconds: the length of one run)."""
    ws = [Redis("redis-d64", seconds, 64), Redis("redis-d1024", seconds, 1024),
          Redis("redis-d4096", seconds, 4096),
          Dbench("dbench-tmpfs", seconds, "tmpfs"), Dbench("dbench-ext4", seconds, "ext4"),
          Bonnie("bonnie-file", seconds, "file"), Bonnie("bonnie-dir", seconds, "dir"),
          Fio("fio-rand-ext4", seconds, "randwrite", "ext4"), Fio("fio-seq-ext4", seconds, "write", "ext4"),
          Fio("fio-rand-tmpfs", seconds, "randwrite", "tmpfs"), Fio("fio-seq-tmpfs", seconds, "write", "tmpfs"),
          PageFault("pagefault-t1", seconds, 1), PageFault("pagefault-t2", seconds, 2),
          PythonDict("python-dict", seconds)]
    return {w.name: w for w in ws}


WORKLOADS = tuple(workloads(1))
QUICK = ("redis-d1024", "pagefault-t1", "python-dict")


# -- wpd and the user's path ---------------------------------------------------

class Wpd:
    """A wpd of this bench's own, on a private socket; its CPU time."""

    def __init__(self, workdir):
        from wp import protocol
        self.socket = os.path.join(workdir, "wpd.sock")
        self.log = open(os.path.join(workdir, "wpd.log"), "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "wp.daemon", "--socket", self.socket],
                                     stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while True:
            try:
                protocol.Connection.connect(self.socket, timeout=5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("wpd did not start: see %s" % self.log.name)
                time.sleep(0.05)

    def connect(self):
        from wp import protocol
        return protocol.Connection.connect(self.socket, timeout=120)

    def request(self, req):
        conn = self.connect()
        try:
            reply = conn.request(req)
        finally:
            conn.close()
        if not reply.get("ok"):
            raise RuntimeError("wpd: %s" % reply.get("error"))
        return reply

    def cpu_s(self):
        return procfs.cpu_seconds(self.proc.pid)

    def final_stats(self, pid):
        """The session's stats: live, or kept by wpd once the target ended
        (the watcher drops the session a moment after the exit)."""
        for _ in range(100):
            try:
                return self.request({"op": "stats", "pid": pid})["stats"]
            except RuntimeError:
                time.sleep(0.02)
        return None

    def close(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _faults(stats):
    if not stats:
        return None
    return stats.get("faults", 0) + stats.get("written_pages", 0)


def _gated_child(argv, out_path, env=None):
    """Forks a child that waits for a byte on a pipe, then execs argv with
    stdout and stderr to out_path. Returns (pid, gate write fd)."""
    r, w = os.pipe()
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(w)
            os.dup2(out, 1)
            os.dup2(out, 2)
            os.close(out)
            if os.read(r, 1) != b"x":
                os._exit(126)
            os.close(r)
            os.execvpe(argv[0], argv, env or os.environ)
        finally:
            os._exit(127)
    os.close(r)
    os.close(out)
    return pid, w


# `wp snapshot PID -o FILE --json --quiet`, by wp's own main() in a python3
# started ahead (its imports done, waiting for the pid): the run measures
# the snapshot, not the interpreter's start-up.
SNAPSHOT_HELPER = """
import sys
import wp.cli, wp.commands.snapshot
pid = sys.stdin.readline().strip()
sys.exit(wp.cli.main(["snapshot", pid, "-o", sys.argv[1] + "." + pid, "--json", "--quiet"]))
"""


class _Snapshotter:
    """A `wp snapshot` ready to go: start() gives it the pid."""

    def __init__(self, workdir):
        self.core = os.path.join(workdir, "core")
        self.proc = subprocess.Popen([sys.executable, "-c", SNAPSHOT_HELPER, self.core],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.started = None
        self._cpu0 = 0.0

    def start(self, pid):
        self.core += ".%d" % pid
        try:
            self._cpu0 = procfs.cpu_seconds(self.proc.pid)   # its imports: not the snapshot's
        except OSError:
            pass
        self.started = time.monotonic()
        self.proc.stdin.write("%d\n" % pid)
        self.proc.stdin.close()

    def finish(self):
        """Waits for it; returns (stats dict, its CPU seconds since start())."""
        if self.started is None:
            self.proc.stdin.close()
        _, status, ru = os.wait4(self.proc.pid, 0)
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        out, err = self.proc.stdout.read(), self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        try:
            os.unlink(self.core)
        except FileNotFoundError:
            pass
        if self.started is None:
            return {"error": "the run ended before the snapshot"}, 0.0
        st = None
        if self.proc.returncode == 0:
            try:
                st = json.loads(out)
            except ValueError:
                st = None
        if st is None:
            st = {"error": (err.strip().splitlines() or ["exit %d" % self.proc.returncode])[-1]}
        return st, max(0.0, ru.ru_utime + ru.ru_stime - self._cpu0)


def _run_program(w, protector, wpd, dirs, workdir, snapshot_at):
    """One run of a "run" workload; returns its record."""
    out_path = os.path.join(workdir, "out.txt")
    argv = w.argv(dirs)
    snap = _Snapshotter(workdir) if protector == "snapshot" else None
    pid, gate = _gated_child(argv, out_path)
    conn = None
    rec = {"protector": protector}
    try:
        if protector not in ("none", "snapshot"):
            conn = wpd.connect()
            conn.send({"op": "run", "pid": pid, "argv": argv, "protector": protector, "regions": None,
                       "mode": None, "handler": "python", "follow_fork": True, "options": {}})
            armed = conn.recv()
            if not armed or not armed.get("ok"):
                raise RuntimeError("wpd refused %s: %s" % (protector, (armed or {}).get("error")))
        cpu0 = wpd.cpu_s()
        os.write(gate, b"x")
        os.close(gate)
        gate = None
        if conn is not None:
            done = conn.recv()
            if not done or not done.get("ok"):
                raise RuntimeError("wpd could not protect %s: %s" % (w.name, (done or {}).get("error")))
        t0 = time.monotonic()
        status = ru = None
        while True:
            got, status, ru = os.wait4(pid, os.WNOHANG)
            if got:
                break
            if snap is not None and snap.started is None and time.monotonic() - t0 >= snapshot_at * w.seconds:
                snap.start(w.snapshot_pid(pid))
            time.sleep(0.01)
        t1 = time.monotonic()
        pid = None
        wall = t1 - t0
        cpu1 = wpd.cpu_s()
        with open(out_path) as f:
            out = f.read()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError("%s exited %d: %s" % (w.name, os.waitstatus_to_exitcode(status), out[-500:]))
        rec.update(w.parse(out, wall))
        rec["wall_s"] = round(wall, 3)
        rec["target_cpu_per_s"] = round((ru.ru_utime + ru.ru_stime) / wall, 3)
        if protector == "snapshot":
            rec.update(_snapshot_fields(snap, wall))
            snap = None
        else:
            rec["wp_cpu_per_s"] = round((cpu1 - cpu0) / wall, 3)
            if conn is not None:
                rec["faults"] = _faults(wpd.final_stats(int(done["pid"])))
    finally:
        if gate is not None:
            os.close(gate)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
        if snap is not None:
            snap.finish()
        if conn is not None:
            conn.close()
    return rec


def _snapshot_fields(snap, wall):
    st, cpu = snap.finish()
    return {"wp_cpu_per_s": round(cpu / wall, 3),
            "faults": st.get("faults"),
            "snapshot": {k: st.get(k) for k in ("stop_ms", "copy_s", "copied_bytes",
                                                "copied_on_write_pages", "faults", "error")}}


def _free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _run_server(w, protector, wpd, dirs, workdir, snapshot_at):
    """One run of a server workload: a fresh server, attached (or not),
    loaded, detached, stopped."""
    import socket
    port = _free_port()
    log = open(os.path.join(workdir, "server.log"), "w")
    srv = subprocess.Popen(w.start(dirs, port), stdout=log, stderr=log)
    rec = {"protector": protector}
    snap = _Snapshotter(workdir) if protector == "snapshot" else None
    attached = False
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if srv.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("%s did not start" % w.name)
                time.sleep(0.02)
        if protector not in ("none", "snapshot"):
            wpd.request({"op": "attach", "pid": srv.pid, "protector": protector, "regions": None,
                         "mode": None, "handler": "python", "follow_fork": True, "options": {}})
            attached = True
        cpu0, tcpu0 = wpd.cpu_s(), procfs.cpu_seconds(srv.pid)
        t0 = time.monotonic()
        load = subprocess.Popen(w.load_argv(port), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        if snap is not None:
            time.sleep(snapshot_at * w.seconds)
            snap.start(srv.pid)   # the server is there even if the load is done
        out, err = load.communicate()
        t1 = time.monotonic()
        wall = t1 - t0
        cpu1, tcpu1 = wpd.cpu_s(), procfs.cpu_seconds(srv.pid)
        if load.returncode != 0:
            raise RuntimeError("redis-benchmark exited %d: %s" % (load.returncode, err[-500:]))
        rec.update(w.parse(out, wall))
        rec["wall_s"] = round(wall, 3)
        rec["target_cpu_per_s"] = round((tcpu1 - tcpu0) / wall, 3)
        if protector == "snapshot":
            rec.update(_snapshot_fields(snap, wall))
            snap = None
        else:
            rec["wp_cpu_per_s"] = round((cpu1 - cpu0) / wall, 3)
            if attached:
                st = wpd.request({"op": "detach", "pid": srv.pid})["stats"]
                attached = False
                rec["faults"] = _faults(st)
    finally:
        if snap is not None:
            snap.finish()
        if attached:
            try:
                wpd.request({"op": "detach", "pid": srv.pid})
            except RuntimeError:
                pass
        srv.kill()
        srv.wait()
        log.close()
    return rec


# -- the bench -------------------------------------------------------------------

def _summarize(name, w, recs):
    """Medians per protector and their ratios to unattached, per metric."""
    out = {"workload": name, "unit": w.unit if w else recs[0].get("unit", ""), "protectors": {}}
    by = {}
    for r in recs:
        by.setdefault(r["protector"], []).append(r)
    metrics = [m for m in (w.metrics if w else ("throughput", "SET", "GET", "LPUSH"))
               if any(m in r for r in recs)]
    base = {m: statistics.median([r[m] for r in by.get("none", []) if r.get(m) is not None] or [0])
            for m in metrics}
    for p, rs in by.items():
        s = {"rounds": len(rs)}
        for m in metrics:
            vals = [r[m] for r in rs if r.get(m) is not None]
            if not vals:
                continue
            med = statistics.median(vals)
            s[m] = round(med, 2)
            s["ratio" if m == "throughput" else "ratio_" + m] = round(med / base[m], 3) if base[m] else None
        for k in ("wp_cpu_per_s", "target_cpu_per_s", "faults", "max_latency_ms"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                s[k] = round(statistics.median(vals), 3) if k != "max_latency_ms" else round(max(vals), 3)
        snaps = [r["snapshot"] for r in rs if r.get("snapshot")]
        if snaps:
            stops = [x["stop_ms"] for x in snaps if x.get("stop_ms") is not None]
            s["snapshot_stop_ms_max"] = max(stops) if stops else None
            s["snapshot_errors"] = [x["error"] for x in snaps if x.get("error")]
        out["protectors"][p] = s
    return out


def run(names=None, protectors=PROTECTORS, rounds=3, seconds=4.0, cpus=None, snapshot_at=0.3,
        progress=None):
    """Runs the bench; returns one dict (see the module docstring).

    Args:
        names: workload names (default: all of WORKLOADS).
        protectors: which of PROTECTORS ("none" is always run: the reference).
        rounds: interleaved rounds per workload.
        seconds: the length of one run.
        cpus: None (unpinned: the scheduler's choice) or 1 (everything on CPU 0).
    """
    table = workloads(seconds)
    names = list(names or table)
    for n in names:
        if n not in table:
            raise ValueError("unknown workload %r: use one of %s" % (n, ", ".join(table)))
    protectors = ["none"] + [p for p in protectors if p != "none"]
    old_aff = os.sched_getaffinity(0)
    if cpus == 1:
        os.sched_setaffinity(0, {0})    # inherited by wpd, the programs, wp snapshot
    prefix = "wp-bench-wl.%d." % os.getpid()
    workdir = tempfile.mkdtemp(prefix=prefix)
    dirs = {"ext4": tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"),
            "tmpfs": tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")}
    wpd = None
    results, raw = [], {}
    try:
        wpd = Wpd(workdir)
        for name in names:
            w = table[name]
            w.prepare(dirs)
            recs = []
            for rnd in range(rounds):
                for p in protectors:
                    if progress:
                        progress("%s round %d/%d: %s" % (name, rnd + 1, rounds, p))
                    fn = _run_server if w.kind == "server" else _run_program
                    try:
                        rec = fn(w, p, wpd, dirs, workdir, snapshot_at)
                    except RuntimeError as err:
                        rec = {"protector": p, "error": str(err)}
                        if progress:
                            progress("  failed: %s" % err)
                    rec["round"] = rnd
                    recs.append(rec)
            raw[name] = recs
            results.append(_summarize(name, w, [r for r in recs if "error" not in r]))
            w.cleanup(dirs)
    finally:
        if wpd is not None:
            wpd.close()
        os.sched_setaffinity(0, old_aff)
        for d in list(dirs.values()) + [workdir]:
            shutil.rmtree(d, ignore_errors=True)
    return {"placement": "all processes on CPU 0" if cpus == 1 else
            "unpinned: wpd, the programs and the load generators where the scheduler puts them",
            "cpus_used": 1 if cpus == 1 else os.cpu_count(), "rounds": rounds, "seconds": seconds,
            "snapshot_at": snapshot_at, "protectors": protectors,
            "reaim": "not packaged in Debian (mmtests dropped it as bit-rotted): pagefault-t1/t2 "
                     "(will-it-scale page_fault1 style) stand in for it",
            "workloads": results, "raw": raw, "machine": machine()}


# -- output ------------------------------------------------------------------------

def _rows(res):
    """(workload/metric, unit, {protector: ratio}, {protector: summary}) per row."""
    for wl in res["workloads"]:
        prots = wl["protectors"]
        metrics = [k for k in ("throughput", "SET", "GET", "LPUSH") if k in prots.get("none", {})]
        for m in metrics:
            label = wl["workload"] if m == "throughput" else "%s %s" % (wl["workload"], m)
            rk = "ratio" if m == "throughput" else "ratio_" + m
            yield label, wl["unit"], m, {p: s.get(rk) for p, s in prots.items()}, prots


def table(results):
    """Returns a Markdown table of every workload x protector ratio."""
    prots = []
    for res in results:
        for p in res["protectors"]:
            if p != "none" and p not in prots:
                prots.append(p)
    lines = ["| run | workload | unattached | " + " | ".join(prots) + " |",
             "|---|---|---|" + "---|" * len(prots)]
    for res in results:
        tag = "1 CPU" if res["cpus_used"] == 1 else "%d CPUs" % res["cpus_used"]
        for label, unit, m, ratios, full in _rows(res):
            base = full["none"].get(m)
            cells = []
            for p in prots:
                r = ratios.get(p)
                cells.append("–" if r is None else "%.2f" % r)
            lines.append("| %s | %s | %s %s | %s |" % (tag, label, _fmt(base), unit, " | ".join(cells)))
    return "\n".join(lines)


def costs(results):
    """Returns a Markdown table per workload: wpd's CPU per second under
    each protector (snapshot: wp snapshot's), the faults it handled, and
    the program's longest latency unattached and during the snapshot."""
    prots = [p for p in PROTECTORS[1:] if any(p in w["protectors"] for r in results for w in r["workloads"])]
    head = ["run", "workload"] + ["%s CPU/s, faults" % p for p in prots if p != "snapshot"]
    head += ["longest latency ms: unattached / snapshot (its stop)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        tag = "1 CPU" if res["cpus_used"] == 1 else "%d CPUs" % res["cpus_used"]
        for wl in res["workloads"]:
            ps = wl["protectors"]
            cells = [tag, wl["workload"]]
            for p in prots:
                if p == "snapshot":
                    continue
                st = ps.get(p, {})
                cells.append("–" if not st else "%.2f, %s" % (st.get("wp_cpu_per_s", 0),
                                                              _fmt(st.get("faults"))))
            snap = ps.get("snapshot", {})
            cells.append("%s / %s (%s)" % (_fmt(ps.get("none", {}).get("max_latency_ms")),
                                           _fmt(snap.get("max_latency_ms")),
                                           _fmt(snap.get("snapshot_stop_ms_max"))))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v):
    if v is None:
        return "?"
    if v >= 10000:
        return "%.0fk" % (v / 1000)
    if v >= 100:
        return "%.0f" % v
    return "%.3g" % v


def plot(results, path):
    """A bar chart of ratios to unattached, one group per workload row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = []
    for res in results:
        tag = "" if res["cpus_used"] != 1 else " (1 CPU)"
        for label, _unit, _m, ratios, _full in _rows(res):
            rows.append((label + tag, ratios))
    prots = [p for p in PROTECTORS if p != "none" and any(p in r for _, r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(rows) + 2), 5))
    width = 0.8 / max(1, len(prots))
    for i, p in enumerate(prots):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [r.get(p) or 0 for _, r in rows], width, label=p)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.9, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([label for label, _ in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("throughput / unattached")
    m = results[0]["machine"]
    ax.set_title("wp bench workloads: %s, %s CPUs, kernel %s" % (m["cpu_model"], m["cpus"], m["kernel"]),
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(subparsers):
    """Registers `workloads` on the subparsers of `wp bench`."""
    p = subparsers.add_parser("workloads", help="what each protector costs real programs",
                              description=__doc__.split("\n")[0],
                              epilog="examples:\n  wp bench workloads --quick --json\n"
                                     "  wp bench workloads --workload redis-d1024 --cpus 1\n"
                                     "  wp bench workloads --from a.json b.json --plot wl.png\n",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="PNG", help="bar chart of the ratios")
    p.add_argument("--quick", action="store_true",
                   help="%s, 1 round of 1 s (a smoke test)" % ", ".join(QUICK))
    p.add_argument("--workload", action="append", metavar="NAME", choices=WORKLOADS,
                   help="only these (repeatable): " + ", ".join(WORKLOADS))
    p.add_argument("--protector", action="append", choices=PROTECTORS[1:],
                   help="only these besides unattached (repeatable; default all)")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--seconds", type=float, help="length of one run (default 4; quick 1)")
    p.add_argument("--cpus", type=int, choices=[1], help="1: every process on CPU 0")
    p.add_argument("--from", dest="from_", nargs="+", metavar="FILE",
                   help="no run: join these --json results into the table (and --plot)")
    p.set_defaults(func=main)
    return p


def main(args):
    """`wp bench workloads`: see add_parser for args. Returns the exit code."""
    if args.from_:
        results = []
        for path in args.from_:
            with open(path) as f:
                results.append(json.load(f))
    else:
        if os.geteuid() != 0:
            print("wp bench workloads: run as root (wpd needs it)", file=sys.stderr)
            return 4
        missing = [p for p in ("redis-server", "redis-benchmark", "dbench", "bonnie++", "fio", "gcc")
                   if shutil.which(p) is None]
        if missing:
            print("wp bench workloads: %s not installed: run scripts/setup" % ", ".join(missing),
                  file=sys.stderr)
            return 1
        names = args.workload or (QUICK if args.quick else None)
        prog = None if args.json else (lambda s: print("bench workloads: " + s, file=sys.stderr))
        res = run(names, args.protector or PROTECTORS, rounds=args.rounds or (1 if args.quick else 3),
                  seconds=args.seconds or (1.0 if args.quick else 4.0), cpus=args.cpus, progress=prog)
        results = [res]
    if args.plot:
        plot(results, args.plot)
    if args.json and not args.from_:
        print(json.dumps(results[0]))
        return 0
    m = results[0]["machine"]
    print("machine: %s, %s CPUs, kernel %s" % (m["cpu_model"], m["cpus"], m["kernel"]))
    for res in results:
        print("placement: %s; %d rounds of %g s" % (res["placement"], res["rounds"], res["seconds"]))
    print(table(results))
    print()
    print(costs(results))
    return 0
