"""wp bench faults: what a write costs the writer under each kind of protection.

One row per memory type and handler. The writer is a forked process pinned
to one CPU; the handler is this process. Handlers: none (no protection),
async (kernel-resolved WP, pages read back with PAGEMAP_SCAN), c (the C fast
path resolves each fault), python (a Python on_write that only unprotects).
"""
import json
import os
import statistics
import sys

from wp.bench import machine
from wp.bench._writer import Writer
from wp.protector import UNPROTECT, WriteProtector
from wp.session import Session
from wp.space import ProcessSpace

__all__ = ["run", "main"]


class Unprotect(WriteProtector):
    name = "unprotect"

    def on_write(self, fault):
        return UNPROTECT


def placement(placement_name):
    """Returns (writer_cpu, handler_cpu, spin) for a named CPU placement."""
    ncpu = os.cpu_count()
    if placement_name == "split":        # writer and handler on different CPUs
        return 0, ncpu - 1, False
    if placement_name == "split-spin":   # ... and the handler busy-polls
        return 0, ncpu - 1, True
    if placement_name == "same":
        return 0, 0, False
    if placement_name == "unpinned":
        return None, None, False
    raise ValueError("unknown placement %r: split, split-spin, same, unpinned" % placement_name)


def measure(memory, handler, npages, where="same", rounds=3):
    """Returns one row: the writer's median cost per page write."""
    wcpu, hcpu, spin = placement(where)
    w = Writer(memory, npages, cpu=wcpu)
    lat = []
    faults = 0
    try:
        for _ in range(rounds):
            if handler == "none":
                lat.extend(w.write())
                faults += npages
                continue
            space = ProcessSpace(w.pid, w.take_uffd)
            mode = "async" if handler == "async" else None
            s = Session(space, Unprotect(), regions=[(w.addr, w.addr + w.length)], mode=mode,
                        handler="c" if handler == "c" else "python", spin=spin, cpu=hcpu)
            with s:
                lat.extend(w.write())
                if handler == "async":
                    faults += sum(r.written for r in s.scan_written())
                else:
                    faults += s.faults()
    finally:
        w.close()
    return {"memory": memory, "mode": "async" if handler in ("async",) or memory == "file" else "sync",
            "handler": handler, "pages": npages, "faults": faults // rounds,
            "us_per_fault": round(statistics.median(lat) / 1000, 3),
            "us_p90": round(sorted(lat)[int(len(lat) * 0.9)] / 1000, 3)}


def measure_fresh(npages, where="same", rounds=3, handler="python"):
    """The first touch of fresh (never populated) private anonymous memory
    under sync protection, with MISSING registered as the session does
    (sees writes after MADV_DONTNEED) and without it (WP and WP_UNPOPULATED
    markers only: the state before). Rounds interleave the two. Returns
    {variant: {"write": us, "read": us}} (medians, per first touch) and the
    faults each took."""
    wcpu, hcpu, spin = placement(where)
    w = Writer("anon", npages, cpu=wcpu, populate=False)
    lat = {(v, op): [] for v in ("wp_missing", "wp_only", "none") for op in ("write", "read")}
    faults = {k: 0 for k in lat}
    try:
        for _ in range(rounds):
            for variant in ("wp_missing", "wp_only", "none"):
                for op in ("write", "read"):
                    w.drop()
                    if variant == "none":
                        lat[variant, op].extend(w.write() if op == "write" else w.read())
                        continue
                    space = ProcessSpace(w.pid, w.take_uffd)
                    s = Session(space, Unprotect(), regions=[(w.addr, w.addr + w.length)],
                                handler=handler, spin=spin, cpu=hcpu)
                    s.anon_missing = variant == "wp_missing"
                    with s:
                        lat[variant, op].extend(w.write() if op == "write" else w.read())
                        st = s.stats()
                        faults[variant, op] += st["faults"] + st["missing_reads"]
    finally:
        w.close()
    return {v: {op: round(statistics.median(lat[v, op]) / 1000, 3) for op in ("write", "read")}
            | {"faults_" + op: faults[v, op] // rounds for op in ("write", "read")}
            for v in ("wp_missing", "wp_only", "none")}


class _Hugepages:
    """Reserves n 2 MiB pages for the run and restores the setting."""

    PATH = "/proc/sys/vm/nr_hugepages"

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        with open(self.PATH) as f:
            self.old = int(f.read())
        with open(self.PATH, "w") as f:
            f.write(str(self.old + self.n))
        return self

    def __exit__(self, *exc):
        with open(self.PATH, "w") as f:
            f.write(str(self.old))


def run(pages=2048, huge_pages=32, where="same", compare_placements=True, progress=None):
    rows = []
    plan = [(m, h) for m in ("anon", "shmem", "hugetlb") for h in ("none", "c", "python")]
    plan.append(("file", "none"))
    plan.append(("file", "async"))
    plan.insert(1, ("anon", "async"))
    with _Hugepages(huge_pages):
        for memory, handler in plan:
            if progress:
                progress("%s/%s" % (memory, handler))
            n = huge_pages if memory == "hugetlb" else pages
            rows.append(measure(memory, handler, n, where))
    out = {"cpu_placement": _describe(where), "rows": rows}
    by = {(r["memory"], r["handler"]): r["us_per_fault"] for r in rows}
    out["ratios"] = {
        "anon_python_over_c": round(by[("anon", "python")] / by[("anon", "c")], 2),
        "anon_c_over_async": round(by[("anon", "c")] / by[("anon", "async")], 2),
    }
    if progress:
        progress("fresh anon: first touch, with and without MISSING")
    fresh = measure_fresh(pages, where)
    out["fresh_anon"] = fresh
    out["fresh_anon_c"] = measure_fresh(pages, where, handler="c")
    out["ratios"]["fresh_write_missing_over_wp_only"] = round(
        fresh["wp_missing"]["write"] / fresh["wp_only"]["write"], 2)
    out["ratios"]["fresh_read_missing_over_wp_only"] = round(
        fresh["wp_missing"]["read"] / fresh["wp_only"]["read"], 2)
    if compare_placements:
        out["placements"] = {}
        for p in ("split", "split-spin", "same", "unpinned"):
            if progress:
                progress("placement " + p)
            out["placements"][p] = {h: measure("anon", h, pages, p)["us_per_fault"] for h in ("c", "python")}
    out["machine"] = machine()
    return out


def _describe(where):
    wcpu, hcpu, spin = placement(where)
    if wcpu is None:
        return "unpinned: writer and handler wherever the scheduler puts them"
    return "%s: writer pinned to CPU %d, handler thread pinned to CPU %d%s" % (
        where, wcpu, hcpu, ", busy-polling the uffd" if spin else ", sleeping in poll()")


def main(args):
    prog = None if args.json else (lambda s: print("bench faults: " + s, file=sys.stderr))
    out = run(pages=args.pages, where=args.placement, compare_placements=not args.quick, progress=prog)
    if args.json:
        print(json.dumps(out))
    else:
        print("cpu placement: " + out["cpu_placement"])
        print("%-8s %-6s %-7s %6s %7s %10s" % ("memory", "mode", "handler", "pages", "faults", "us/fault"))
        for r in out["rows"]:
            print("%-8s %-6s %-7s %6d %7d %10.2f" % (r["memory"], r["mode"], r["handler"], r["pages"],
                                                    r["faults"], r["us_per_fault"]))
        print("fresh anon, us per first touch: " + json.dumps(out["fresh_anon"]))
        print("fresh anon, handler c: " + json.dumps(out["fresh_anon_c"]))
        print("ratios: " + json.dumps(out["ratios"]))
        if "placements" in out:
            print("anon us/fault by placement: " + json.dumps(out["placements"]))
    return 0
