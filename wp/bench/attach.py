"""wp bench attach: what syscall injection costs (wp.remote).

Rows per CPU placement of target and tracer and per wait mode:
  attach_us   seize + interrupt + find the vdso syscall + restore + detach
  single_us   one injected getpid (two ptrace stops), median
  batch_us    per syscall in a batch of 10,000 getppid run by the blob
              (one ptrace stop for the lot, plus writing and reading records)
  madvise_us  the same with a no-op madvise(MADV_NORMAL) on one page
Wait modes: "poll" (a timeout is set: waitpid WNOHANG, yielding, then
sleeping) and "block" (timeout=None: a plain blocking waitpid).

The target is /bin/sleep, so the thread we stop sits in clock_nanosleep.
Run as root: python -m wp.bench.attach [--json] [--quick]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from wp import procfs
from wp.bench import machine
from wp.remote import SYS, RemoteProcess

__all__ = ["add_parser", "run", "main"]

PLACEMENTS = ("same", "split", "unpinned")


def _cpus(where):
    ncpu = os.cpu_count()
    if where == "same":
        return 0, 0
    if where == "split":
        return 0, ncpu - 1
    return None, None


def measure(where="same", wait="poll", singles=2000, batch=10000, rounds=5):
    tcpu, mycpu = _cpus(where)
    old_aff = os.sched_getaffinity(0)
    target = subprocess.Popen(["sleep", "1000"])
    try:
        if tcpu is not None:
            os.sched_setaffinity(target.pid, {tcpu})
            os.sched_setaffinity(0, {mycpu})
        time.sleep(0.05)
        timeout = None if wait == "block" else 10.0
        attach = []
        for _ in range(20):
            t = time.perf_counter()
            with RemoteProcess(target.pid, timeout=timeout):
                pass
            attach.append(time.perf_counter() - t)
        with RemoteProcess(target.pid, timeout=timeout) as rp:
            single = []
            for _ in range(singles):
                t = time.perf_counter()
                rp.syscall_raw(SYS["getpid"])
                single.append(time.perf_counter() - t)
            rp.syscalls([(SYS["getppid"], ())])   # maps the blob
            page = rp.mmap_scratch(4096)
            getppid = [(SYS["getppid"], ())] * batch
            madvise = [(SYS["madvise"], (page, 4096, 0))] * batch
            per_get, per_madv = [], []
            for _ in range(rounds):
                t = time.perf_counter()
                res = rp.syscalls(getppid)
                per_get.append((time.perf_counter() - t) / batch)
                assert res[0] == os.getpid() and len(res) == batch
                t = time.perf_counter()
                res = rp.syscalls(madvise)
                per_madv.append((time.perf_counter() - t) / batch)
                assert res[-1] == 0
            rp.munmap(page, 4096)
            stops = rp.stops
    finally:
        os.sched_setaffinity(0, old_aff)
        target.kill()
        target.wait()
    us = 1e6
    return {"placement": where, "wait": wait,
            "attach_us": round(statistics.median(attach) * us, 1),
            "single_us": round(statistics.median(single) * us, 2),
            "single_p90_us": round(sorted(single)[int(len(single) * 0.9)] * us, 2),
            "batch_us": round(statistics.median(per_get) * us, 3),
            "madvise_us": round(statistics.median(per_madv) * us, 3),
            "batch_size": batch, "stops": stops}


def _describe(where):
    tcpu, mycpu = _cpus(where)
    if tcpu is None:
        return "unpinned: target and tracer where the scheduler puts them"
    return "%s: target pinned to CPU %d, tracer to CPU %d" % (where, tcpu, mycpu)


BIG_TARGET = r"""
import sys, threading
mem = bytearray(1 << 30)
for i in range(0, len(mem), 4096):
    mem[i] = 1
ev = threading.Event()
threads = [threading.Thread(target=ev.wait, daemon=True) for _ in range(63)]
for t in threads:
    t.start()
print("ready", flush=True)
sys.stdin.readline()
ev.set()
print(sum(mem[::4096]), flush=True)
"""


def attach_big(rounds=3):
    """Attach (inject uffds, register, write-protect all writable memory)
    and detach on a python3 target with 1 GiB mapped and 64 threads."""
    from wp.protectors.trace import TraceProtector
    from wp.session import Session
    from wp.space import ProcessSpace
    target = subprocess.Popen([sys.executable, "-c", BIG_TARGET], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert target.stdout.readline().strip() == "ready"
        threads = len(procfs.tids(target.pid))
        attach, detach, mapped = [], [], 0
        for _ in range(rounds):
            t = time.perf_counter()
            s = Session(ProcessSpace.attached(target.pid), TraceProtector(exact=True)).start()
            attach.append(time.perf_counter() - t)
            mapped = sum(r.length for r in s.regions)
            t = time.perf_counter()
            s.close()
            detach.append(time.perf_counter() - t)
        target.stdin.write("\n")
        target.stdin.flush()
        ok = target.stdout.readline().strip() == str(1 << 18)
    finally:
        target.kill()
        target.wait()
    return {"threads": threads, "protected_mib": mapped >> 20,
            "attach_ms": round(statistics.median(attach) * 1e3, 1),
            "detach_ms": round(statistics.median(detach) * 1e3, 1), "target_intact": ok}


def wp_round_trip(pages=2048, rounds=3):
    """The sync WP round trip (python handler, same CPU) of a target whose
    uffd was injected (attached) vs one it created and passed over (the
    core's in-process figure), in the same run."""
    from wp.bench._writer import Writer
    from wp.bench.faults import Unprotect, placement
    from wp.session import Session
    from wp.space import ProcessSpace
    wcpu, hcpu, spin = placement("same")
    out = {}
    for how in ("in_process", "attached", "in_process", "attached"):
        w = Writer("anon", pages, cpu=wcpu)
        try:
            lat = []
            for _ in range(rounds):
                space = ProcessSpace(w.pid, w.take_uffd) if how == "in_process" else ProcessSpace.attached(w.pid)
                with Session(space, Unprotect(), regions=[(w.addr, w.addr + w.length)],
                             cpu=hcpu, spin=spin):
                    lat.extend(w.write())
        finally:
            w.close()
        out.setdefault(how, []).extend(lat)
    res = {k: round(statistics.median(v) / 1000, 3) for k, v in out.items()}
    return {"us_per_fault_in_process": res["in_process"], "us_per_fault_attached": res["attached"],
            "ratio_attached_over_in_process": round(res["attached"] / res["in_process"], 3),
            "cpu_placement": "writer and handler thread pinned to CPU %d" % wcpu}


def run(quick=False, progress=None):
    rows = []
    for where in (("same",) if quick else PLACEMENTS):
        for wait in ("poll", "block"):
            if progress:
                progress("%s/%s" % (where, wait))
            rows.append(measure(where, wait))
    if progress:
        progress("attach/detach of 1 GiB, 64 threads")
    big = attach_big()
    if progress:
        progress("WP round trip, attached vs in-process")
    rt = wp_round_trip()
    return {"placements": {w: _describe(w) for w in PLACEMENTS}, "rows": rows,
            "attach_1gib_64_threads": big, "wp_round_trip": rt, "machine": machine()}



def add_parser(subparsers):
    """Registers `attach` on the subparsers of `wp bench` (main parses the words)."""
    from wp.commands import passthrough
    return passthrough(subparsers, "attach", "cost of attaching and of injected syscalls", main)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="wp bench attach", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--quick", action="store_true", help="same-CPU placement only")
    args = ap.parse_args(argv)
    prog = None if args.json else (lambda s: print("bench attach: " + s, file=sys.stderr))
    out = run(args.quick, prog)
    if args.json:
        print(json.dumps(out))
        return
    print("attach 1 GiB / %d threads: %s ms, detach %s ms (target intact: %s)" % (
        out["attach_1gib_64_threads"]["threads"], out["attach_1gib_64_threads"]["attach_ms"],
        out["attach_1gib_64_threads"]["detach_ms"], out["attach_1gib_64_threads"]["target_intact"]))
    rt = out["wp_round_trip"]
    print("WP round trip: attached %.2f us, in-process %.2f us, ratio %.3f (%s)" % (
        rt["us_per_fault_attached"], rt["us_per_fault_in_process"], rt["ratio_attached_over_in_process"],
        rt["cpu_placement"]))
    for w in out["placements"].values():
        print("placement " + w)
    print("%-9s %-5s %9s %9s %9s %9s %10s" % ("placement", "wait", "attach_us", "single_us",
                                              "p90_us", "batch_us", "madvise_us"))
    for r in out["rows"]:
        print("%-9s %-5s %9.1f %9.2f %9.2f %9.3f %10.3f" % (
            r["placement"], r["wait"], r["attach_us"], r["single_us"], r["single_p90_us"],
            r["batch_us"], r["madvise_us"]))


if __name__ == "__main__":
    main()
