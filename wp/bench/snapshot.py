"""wp bench snapshot: a live snapshot of a target that writes continuously,
against gdb's gcore on the same target, in the same run.

The target is a forked child that maps SIZE bytes of anonymous memory and
sweeps it for ever, filling 64 KiB at a time with its generation number; a
shared counter says how many bytes it has written. A sampler in this process
reads the counter every millisecond, which gives the target's progress
(bytes written per second) and its longest stall: for gcore the stall is the
whole dump, for wp snapshot it is the stop while protection goes on.

Placement (2 CPUs here): the target on CPU 0, the fault handler and the
copier on the last CPU; gcore is left to the scheduler.
"""
import json
import mmap
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

from wp._native import check, ffi, lib
from wp.bench import machine

__all__ = ["run", "main", "add_parser"]

_CHUNK = 64 << 10


class Sweeper:
    """A forked child sweeping ``size`` bytes with generation numbers."""

    def __init__(self, size, cpu=0):
        self.size = size
        self.counter = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        self._ctr = ffi.cast("volatile uint64_t *", ffi.from_buffer(self.counter))
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                self._child(w, cpu)
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        self.pid = pid
        data = b""
        while len(data) < 24:
            chunk = os.read(r, 24 - len(data))
            if not chunk:
                raise RuntimeError("sweeper %d died" % pid)
            data += chunk
        os.close(r)
        self.addr, u1, u2 = (int.from_bytes(data[i:i + 8], "little") for i in (0, 8, 16))
        self.uffds = [u1, u2]

    def _child(self, wfd, cpu):
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        mem = mmap.mmap(-1, self.size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        addr = int(ffi.cast("uint64_t", ffi.from_buffer(mem)))
        lib.wp_fill(addr, self.size, 0)
        u1 = check(lib.wp_uffd_create(os.O_CLOEXEC | os.O_NONBLOCK), "userfaultfd")
        u2 = check(lib.wp_uffd_create(os.O_CLOEXEC | os.O_NONBLOCK), "userfaultfd")
        os.write(wfd, b"".join(x.to_bytes(8, "little") for x in (addr, u1, u2)))
        os.close(wfd)
        ctr = self._ctr
        fill = lib.wp_fill
        size = self.size
        gen = 1
        while True:
            for off in range(0, size, _CHUNK):
                fill(addr + off, _CHUNK, gen & 0xFF)
                ctr[0] += _CHUNK
            gen += 1

    def written(self):
        return self._ctr[0]

    def close(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        self.counter.close()


class Sampler:
    """Reads the sweeper's counter every ``period`` s on a thread; gives the
    bytes written and the longest stall between two start/stop marks."""

    def __init__(self, sweeper, period=0.001):
        self.sweeper = sweeper
        self.period = period
        self.samples = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.sweeper.written()))
            time.sleep(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def window(self, t0, t1):
        """Returns (bytes written per second, longest stall in s) in [t0, t1]."""
        pts = [(t, n) for t, n in self.samples if t0 <= t <= t1]
        if len(pts) < 2:
            return 0.0, 0.0
        rate = (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
        stall = 0.0
        last_t, last_n = pts[0]
        for t, n in pts[1:]:
            if n != last_n:
                stall = max(stall, t - last_t)
                last_t, last_n = t, n
        stall = max(stall, pts[-1][0] - last_t)
        return rate, stall


def _warm(out_dir, size):
    """Writes and deletes size bytes in out_dir. On this VM the first touch
    of guest memory is slow (the host backs it then: ~0.35 GB/s into tmpfs,
    against 6-12 GB/s after), which would charge whichever dump runs first."""
    path = os.path.join(out_dir, "wp-bench-warm.%d" % os.getpid())
    block = b"\1" * (4 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for off in range(0, size + (64 << 20), len(block)):
            os.pwrite(fd, block, off)
    finally:
        os.close(fd)
        os.unlink(path)


def run(size=1 << 30, out_dir=None, baseline_s=1.0, gcore=True, handler_cpu=None):
    """Returns one dict: wp snapshot and gcore on the same sweeping target."""
    from wp.commands.snapshot import snapshot
    from wp.space import ProcessSpace
    ncpu = os.cpu_count()
    handler_cpu = ncpu - 1 if handler_cpu is None else handler_cpu
    out_dir = out_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
    result = {"size_bytes": size, "out_dir": out_dir, "cpus": ncpu,
              "placement": {"target_cpu": 0, "handler_cpu": handler_cpu, "copier_cpu": handler_cpu}}
    sw = Sweeper(size, cpu=0)
    core = os.path.join(out_dir, "wp-bench-snap.%d" % sw.pid)
    gpath = os.path.join(out_dir, "wp-bench-gcore.%d" % sw.pid)
    try:
        with Sampler(sw) as smp:
            time.sleep(0.2)   # let it reach full speed
            t0 = time.monotonic()
            time.sleep(baseline_s)
            t1 = time.monotonic()
            base_rate, base_stall = smp.window(t0, t1)
            result["baseline"] = {"bytes_per_s": round(base_rate), "max_stall_ms": round(base_stall * 1e3, 2)}

            _warm(out_dir, size)
            t0 = time.monotonic()
            st = snapshot(ProcessSpace.cooperative(sw.pid, sw.uffds), core, cpu=handler_cpu,
                          copier_cpu=handler_cpu)
            t1 = time.monotonic()
            rate, stall = smp.window(t0, t1)
            result["wp_snapshot"] = {
                "wall_s": round(t1 - t0, 3), "copy_s": st["copy_s"], "stop_ms": st["stop_ms"],
                "max_stall_ms": round(stall * 1e3, 2), "bytes_per_s": round(rate),
                "progress_vs_baseline": round(rate / base_rate, 3) if base_rate else None,
                "copied_bytes": st["copied_bytes"], "faults": st["faults"],
                "copied_on_write_pages": st["copied_on_write_pages"],
                "file_bytes": os.path.getsize(core), "threads": st["threads"]}
            os.unlink(core)
            time.sleep(0.3)

            if gcore and shutil.which("gcore"):
                _warm(out_dir, size)
                t0 = time.monotonic()
                p = subprocess.run(["gcore", "-o", gpath, str(sw.pid)], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True)
                t1 = time.monotonic()
                rate, stall = smp.window(t0, t1)
                fname = "%s.%d" % (gpath, sw.pid)
                result["gcore"] = {
                    "wall_s": round(t1 - t0, 3), "max_stall_ms": round(stall * 1e3, 2),
                    "bytes_per_s": round(rate),
                    "progress_vs_baseline": round(rate / base_rate, 3) if base_rate else None,
                    "exit": p.returncode,
                    "file_bytes": os.path.getsize(fname) if os.path.exists(fname) else None}
                if os.path.exists(fname):
                    os.unlink(fname)
            else:
                result["gcore"] = None
    finally:
        sw.close()
        for f in (core,):
            if os.path.exists(f):
                os.unlink(f)
    if result.get("gcore") and result["wp_snapshot"]["max_stall_ms"]:
        result["stall_ratio_gcore_over_wp"] = round(
            result["gcore"]["max_stall_ms"] / max(result["wp_snapshot"]["max_stall_ms"], 0.001), 1)
    result["machine"] = machine()
    return result


def add_parser(subparsers):
    """Registers `snapshot` on the subparsers of `wp bench`."""
    p = subparsers.add_parser("snapshot", help="live snapshot of a writing target vs gcore")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--size", type=int, default=1024, help="MiB the target sweeps (default 1024)")
    p.add_argument("--dir", help="where the cores go (default /dev/shm)")
    p.add_argument("--no-gcore", action="store_true", help="skip the gcore comparison")
    p.set_defaults(func=main)
    return p


def main(args):
    """`wp bench snapshot`: see add_parser for args. Returns the exit code."""
    res = run(size=args.size << 20, out_dir=args.dir, gcore=not args.no_gcore)
    if args.json:
        print(json.dumps(res))
        return 0
    w, g = res["wp_snapshot"], res.get("gcore")
    print("target sweeping %d MiB; baseline %.0f MiB/s" % (args.size, res["baseline"]["bytes_per_s"] / 2**20))
    print("wp snapshot: %.2f s, target stopped %.1f ms (longest stall %.1f ms), progress %.0f%% of baseline"
          % (w["wall_s"], w["stop_ms"] or 0, w["max_stall_ms"], 100 * (w["progress_vs_baseline"] or 0)))
    if g:
        print("gcore:       %.2f s, longest stall %.1f ms, progress %.0f%% of baseline"
              % (g["wall_s"], g["max_stall_ms"], 100 * (g["progress_vs_baseline"] or 0)))
    return 0
